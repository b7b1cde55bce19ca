"""Conversations and their messages, kept in an embedded SQLite database.

Plain Python (no Streamlit). Every call opens its own short connection, so one
store can serve several Streamlit sessions (threads) at once; WAL mode lets a
reader in one session see another session's writes without blocking it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from chatstack.usage import USAGE_FIELDS, Usage

DEFAULT_TITLE = "New chat"
TITLE_LENGTH = 48

# An assistant message is COMPLETE when the model finished it, STOPPED when the
# user stopped it part-way (the text written so far is kept), FAILED when the
# server broke off mid-answer (kept so the user sees it, replaced on retry).
COMPLETE, STOPPED, FAILED = "complete", "stopped", "failed"

# AUTOINCREMENT: a deleted conversation's id (kept in old URLs) never names a new one.
# A message's Usage is kept in columns of the same names (prompt_tokens ... tokens_per_second):
# databases written by earlier versions of the app open unchanged.
SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'complete',
    model TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    total_tokens INTEGER,
    context_length INTEGER,
    messages_dropped INTEGER,
    tokens_per_second REAL,
    error TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, id);
CREATE TABLE IF NOT EXISTS settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


def default_db_path(env: dict | None = None) -> Path:
    """CHAT_DB_PATH, else chat.db in the user's data folder (XDG)."""
    env = os.environ if env is None else env
    if env.get("CHAT_DB_PATH"):
        return Path(env["CHAT_DB_PATH"]).expanduser()
    data_home = Path(env.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data_home / "chatstack" / "chat.db"


def title_from(text: str) -> str:
    """A conversation title made from its first message: one line, shortened at a word."""
    line = " ".join(text.split())
    if len(line) <= TITLE_LENGTH:
        return line or DEFAULT_TITLE
    return line[:TITLE_LENGTH].rsplit(" ", 1)[0].rstrip(",.;:") + "…"


@dataclass
class Conversation:
    id: int
    title: str
    created_at: float
    updated_at: float


@dataclass
class Message:
    id: int
    conversation_id: int
    role: str
    content: str
    status: str = COMPLETE
    model: str | None = None
    usage: Usage = field(default_factory=Usage)  # an answer's; empty for the user's messages
    error: str | None = None
    created_at: float = 0.0

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Message":
        columns = dict(row)
        usage = Usage(**{name: columns.pop(name) for name in USAGE_FIELDS})
        return cls(**columns, usage=usage)


class ConversationStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # closing() closes the connection; the inner `with` commits or rolls back.
        with closing(sqlite3.connect(self.path, timeout=10)) as db:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA foreign_keys=ON")
            with db:
                yield db

    # ---- conversations ---------------------------------------------------------

    def create(self, title: str = DEFAULT_TITLE) -> Conversation:
        now = time.time()
        with self._connect() as db:
            cur = db.execute("INSERT INTO conversations (title, created_at, updated_at) VALUES (?, ?, ?)",
                             (title, now, now))
        return Conversation(cur.lastrowid, title, now, now)

    def get(self, conversation_id: int) -> Conversation | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        return Conversation(**row) if row else None

    def list(self) -> list[Conversation]:
        """Most recently used first."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM conversations ORDER BY updated_at DESC, id DESC").fetchall()
        return [Conversation(**row) for row in rows]

    def rename(self, conversation_id: int, title: str) -> None:
        title = " ".join(title.split()) or DEFAULT_TITLE
        with self._connect() as db:
            db.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, conversation_id))

    def delete(self, conversation_id: int) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    # ---- messages ----------------------------------------------------------------

    def messages(self, conversation_id: int) -> list[Message]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id",
                              (conversation_id,)).fetchall()
        return [Message.from_row(row) for row in rows]

    def add_user_message(self, conversation_id: int, content: str) -> Message:
        """Saved before the model is asked, so nothing typed is lost if the server fails."""
        return self._add(Message(0, conversation_id, "user", content))

    def add_answer(self, conversation_id: int, content: str, *, status: str = COMPLETE, model: str | None = None,
                   usage: Usage | None = None, error: str | None = None) -> Message:
        return self._add(Message(0, conversation_id, "assistant", content, status=status, model=model,
                                 usage=usage or Usage(), error=error))

    def _add(self, message: Message) -> Message:
        """Insert a new message (its id and time are set here) and return it."""
        message.created_at = time.time()
        columns = {"conversation_id": message.conversation_id, "role": message.role, "content": message.content,
                   "status": message.status, "model": message.model, **asdict(message.usage),
                   "error": message.error, "created_at": message.created_at}
        with self._connect() as db:
            cur = db.execute(f"INSERT INTO messages ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                             list(columns.values()))
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?",
                       (message.created_at, message.conversation_id))
            if message.role == "user":
                # The first message names a conversation nobody has named yet.
                db.execute("UPDATE conversations SET title = ? WHERE id = ? AND title = ?",
                           (title_from(message.content), message.conversation_id, DEFAULT_TITLE))
        message.id = cur.lastrowid
        return message

    def remove_last_answer(self, conversation_id: int) -> Message | None:
        """Remove the answer after the last user message (to regenerate or retry it); returns it."""
        with self._connect() as db:
            row = db.execute("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id DESC LIMIT 1",
                             (conversation_id,)).fetchone()
            if row is None or row["role"] != "assistant":
                return None
            db.execute("DELETE FROM messages WHERE id = ?", (row["id"],))
        return Message.from_row(row)

    # ---- settings -------------------------------------------------------------------

    def load_settings(self) -> dict:
        """The chat settings last saved (model, system prompt, sampling), by name."""
        with self._connect() as db:
            rows = db.execute("SELECT name, value FROM settings").fetchall()
        return {row["name"]: json.loads(row["value"]) for row in rows}

    def save_settings(self, settings: dict) -> None:
        with self._connect() as db:
            db.executemany("INSERT INTO settings (name, value) VALUES (?, ?) "
                           "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                           [(name, json.dumps(value)) for name, value in settings.items()])
