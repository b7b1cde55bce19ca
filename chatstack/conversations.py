"""Conversations and their messages, kept in an embedded SQLite database.

Plain Python (no Streamlit). Every call opens its own short connection, so one
store can serve several Streamlit sessions (threads) at once; WAL mode lets a
reader in one session see another session's writes without blocking it.

A conversation is a tree: each message has a `parent_id` (the message it answers or
follows), so an edited question or a regenerated answer is a new branch beside the
old one, which is kept. The conversation's `leaf_id` is the last message of the
selected path: that path is what the page shows and what the model is sent.

Conversations belong to a user (`user_id`, "local" in single-user mode). Every
method takes the user first and only ever reads or changes that user's own
conversations: another user's conversation id behaves as if it did not exist.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

from chatstack.usage import USAGE_FIELDS, Usage

DEFAULT_TITLE = "New chat"
TITLE_LENGTH = 48
LOCAL_USER = "local"  # the one user of single-user mode
UNDO_DELETE_S = 600   # a deleted conversation can be restored this long, then it is removed for good
AFTER_LEAF = ...      # a new message's default parent: the selected path's last message

# An assistant message is COMPLETE when the model finished it, STOPPED when the
# user stopped it part-way (the text written so far is kept), FAILED when the
# server broke off mid-answer (kept so the user sees it, replaced on retry).
COMPLETE, STOPPED, FAILED = "complete", "stopped", "failed"

# The tables as the first version of the app made them; ADDED_COLUMNS below brings a database
# of any earlier version up to date, so old and new databases take the same path.
# AUTOINCREMENT: a deleted conversation's id (kept in old URLs) never names a new one.
# A message's Usage is kept in columns of the same names (prompt_tokens ... tokens_per_second).
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

ADDED_COLUMNS = {
    "conversations": {
        "user_id": f"TEXT NOT NULL DEFAULT '{LOCAL_USER}'",
        "pinned": "INTEGER NOT NULL DEFAULT 0",
        "deleted_at": "REAL",     # deleted, restorable until UNDO_DELETE_S later
        "leaf_id": "INTEGER",     # the last message of the selected path
    },
    "messages": {
        "parent_id": "INTEGER REFERENCES messages(id) ON DELETE CASCADE",
        "reasoning": "TEXT",      # the model's thinking, apart from the answer
        "tool_calls": "TEXT",     # JSON list, OpenAI-shaped
        "details": "TEXT",        # JSON dict: the server's timings, model_version, finish_reason
    },
}

# Made after the columns exist. Settings are per user (the old `settings` table held the one user's).
LATER_SCHEMA = """
CREATE INDEX IF NOT EXISTS messages_by_parent ON messages (parent_id);
CREATE INDEX IF NOT EXISTS conversations_by_user ON conversations (user_id, updated_at);
CREATE TABLE IF NOT EXISTS user_settings (
    user_id TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (user_id, name)
);
"""

# Search over every message's text, kept in step with `messages` by triggers.
SEARCH_SCHEMA = """
CREATE VIRTUAL TABLE messages_fts USING fts5(content, content='messages', content_rowid='id');
CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts (rowid, content) VALUES (new.id, new.content);
END;
CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
END;
CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
    INSERT INTO messages_fts (rowid, content) VALUES (new.id, new.content);
END;
INSERT INTO messages_fts (messages_fts) VALUES ('rebuild');
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
    user_id: str = LOCAL_USER
    pinned: bool = False
    deleted_at: float | None = None
    leaf_id: int | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Conversation":
        columns = dict(row)
        return cls(**{**columns, "pinned": bool(columns["pinned"])})


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
    parent_id: int | None = None
    reasoning: str | None = None
    tool_calls: list | None = None
    details: dict | None = None
    # Not stored: the ids of this message and its alternatives (same parent, same role), oldest
    # first, as `messages` finds them; the page shows them as ‹ 2/3 ›.
    alternatives: tuple[int, ...] = field(default=(), compare=False)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Message":
        columns = dict(row)
        usage = Usage(**{name: columns.pop(name) for name in USAGE_FIELDS})
        for name in ("tool_calls", "details"):
            columns[name] = json.loads(columns[name]) if columns[name] else None
        return cls(**columns, usage=usage)

    @property
    def finish_reason(self) -> str | None:
        return (self.details or {}).get("finish_reason")

    @property
    def cut_short(self) -> bool:
        """The answer ran into its max_tokens limit (finish_reason "length")."""
        return self.finish_reason == "length"

    @property
    def branch(self) -> tuple[int, int]:
        """(position, count) among its alternatives, counted from 1: (2, 3) is shown as 2/3."""
        if len(self.alternatives) < 2:
            return 1, 1
        return self.alternatives.index(self.id) + 1, len(self.alternatives)


@dataclass
class SearchHit:
    conversation: Conversation
    snippet: str  # the matching text with the words found in **bold**, or the title


class ConversationStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            self._migrate(db)

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Bring a database made by an earlier version up to date, keeping every message: the
        messages of a conversation made before branches become one path, in the order written."""
        added = set()
        for table, columns in ADDED_COLUMNS.items():
            have = {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}
            for name, declaration in columns.items():
                if name not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")
                    added.add(name)
        if "parent_id" in added:
            db.execute("UPDATE messages SET parent_id = (SELECT MAX(earlier.id) FROM messages earlier "
                       "WHERE earlier.conversation_id = messages.conversation_id AND earlier.id < messages.id)")
        if "leaf_id" in added:
            db.execute("UPDATE conversations SET leaf_id = (SELECT MAX(id) FROM messages "
                       "WHERE conversation_id = conversations.id)")
        db.executescript(LATER_SCHEMA)
        if "user_id" in added:  # the single user's saved settings are the local user's
            db.execute("INSERT OR IGNORE INTO user_settings (user_id, name, value) "
                       "SELECT ?, name, value FROM settings", (LOCAL_USER,))
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'messages_fts'").fetchone():
            db.executescript(SEARCH_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # closing() closes the connection; the inner `with` commits or rolls back.
        with closing(sqlite3.connect(self.path, timeout=10)) as db:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA foreign_keys=ON")
            with db:
                yield db

    @staticmethod
    def _owned(db: sqlite3.Connection, user: str, conversation_id: int, *, deleted: bool = False) -> sqlite3.Row:
        """The user's conversation; KeyError for any other (another user's looks the same as none)."""
        row = db.execute("SELECT * FROM conversations WHERE id = ? AND user_id = ? AND "
                         + ("deleted_at IS NOT NULL" if deleted else "deleted_at IS NULL"),
                         (conversation_id, user)).fetchone()
        if row is None:
            raise KeyError(f"no conversation {conversation_id}")
        return row

    # ---- conversations ---------------------------------------------------------

    def create(self, user: str, title: str = DEFAULT_TITLE) -> Conversation:
        now = time.time()
        with self._connect() as db:
            cur = db.execute("INSERT INTO conversations (title, created_at, updated_at, user_id) VALUES (?, ?, ?, ?)",
                             (title, now, now, user))
        return Conversation(cur.lastrowid, title, now, now, user_id=user)

    def get(self, user: str, conversation_id: int) -> Conversation | None:
        with self._connect() as db:
            try:
                return Conversation.from_row(self._owned(db, user, conversation_id))
            except KeyError:
                return None

    def list(self, user: str) -> list[Conversation]:
        """The user's conversations: pinned ones first, then the most recently used."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM conversations WHERE user_id = ? AND deleted_at IS NULL "
                              "ORDER BY pinned DESC, updated_at DESC, id DESC", (user,)).fetchall()
        return [Conversation.from_row(row) for row in rows]

    def rename(self, user: str, conversation_id: int, title: str) -> None:
        title = " ".join(title.split()) or DEFAULT_TITLE
        with self._connect() as db:
            db.execute("UPDATE conversations SET title = ? WHERE id = ? AND user_id = ?", (title, conversation_id, user))

    def pin(self, user: str, conversation_id: int, pinned: bool = True) -> None:
        with self._connect() as db:
            db.execute("UPDATE conversations SET pinned = ? WHERE id = ? AND user_id = ?",
                       (int(pinned), conversation_id, user))

    def delete(self, user: str, conversation_id: int, now: float | None = None) -> None:
        """Deleted, but restorable for UNDO_DELETE_S; conversations deleted longer ago are removed now."""
        now = time.time() if now is None else now
        with self._connect() as db:
            db.execute("UPDATE conversations SET deleted_at = ? WHERE id = ? AND user_id = ? AND deleted_at IS NULL",
                       (now, conversation_id, user))
            db.execute("DELETE FROM conversations WHERE user_id = ? AND deleted_at < ?", (user, now - UNDO_DELETE_S))

    def restore(self, user: str, conversation_id: int) -> bool:
        """Undo a delete; False when it was removed for good (or never was the user's)."""
        with self._connect() as db:
            cur = db.execute("UPDATE conversations SET deleted_at = NULL WHERE id = ? AND user_id = ? "
                             "AND deleted_at IS NOT NULL", (conversation_id, user))
        return cur.rowcount == 1

    def search(self, user: str, text: str, limit: int = 20) -> list[SearchHit]:
        """The user's conversations whose title or any message (on any branch) holds every word
        of `text` (a word at the end may be the start of a longer one); best matches first."""
        words = text.split()
        if not words:
            return []
        # Each word quoted, so FTS5's own syntax (AND, NEAR, "*", ":") in what was typed is just text.
        query = " ".join('"' + word.replace('"', '""') + '"' for word in words) + "*"
        hits: dict[int, SearchHit] = {}
        with self._connect() as db:
            titled = db.execute("SELECT * FROM conversations WHERE user_id = ? AND deleted_at IS NULL "
                                "ORDER BY updated_at DESC", (user,)).fetchall()
            for row in titled:
                if all(word.casefold() in row["title"].casefold() for word in words):
                    hits.setdefault(row["id"], SearchHit(Conversation.from_row(row), row["title"]))
            found = db.execute(
                "SELECT c.*, snippet(messages_fts, 0, '**', '**', '…', 12) AS snippet FROM messages_fts "
                "JOIN messages m ON m.id = messages_fts.rowid JOIN conversations c ON c.id = m.conversation_id "
                "WHERE messages_fts MATCH ? AND c.user_id = ? AND c.deleted_at IS NULL ORDER BY rank LIMIT ?",
                (query, user, limit * 5)).fetchall()
        for row in found:
            columns = dict(row)
            snippet = columns.pop("snippet")
            hits.setdefault(row["id"], SearchHit(Conversation.from_row(columns), " ".join(snippet.split())))
        return list(hits.values())[:limit]

    # ---- messages ----------------------------------------------------------------

    def messages(self, user: str, conversation_id: int) -> list[Message]:
        """The selected path, oldest first, each message with its alternatives."""
        with self._connect() as db:
            leaf_id = self._owned(db, user, conversation_id)["leaf_id"]
            tree = self._tree(db, conversation_id)
        path = []
        message = tree.get(leaf_id)
        while message is not None:
            path.append(message)
            message = tree.get(message.parent_id)
        path.reverse()
        for message in path:
            message.alternatives = tuple(m.id for m in tree.values()
                                         if m.parent_id == message.parent_id and m.role == message.role)
        return path

    def all_messages(self, user: str, conversation_id: int) -> list[Message]:
        """Every message of every branch, oldest first (a parent always before its children)."""
        with self._connect() as db:
            self._owned(db, user, conversation_id)
            return list(self._tree(db, conversation_id).values())

    @staticmethod
    def _tree(db: sqlite3.Connection, conversation_id: int) -> dict[int, Message]:
        rows = db.execute("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,))
        return {row["id"]: Message.from_row(row) for row in rows}

    def message(self, user: str, message_id: int) -> Message | None:
        with self._connect() as db:
            row = db.execute("SELECT m.* FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                             "WHERE m.id = ? AND c.user_id = ? AND c.deleted_at IS NULL", (message_id, user)).fetchone()
        return Message.from_row(row) if row else None

    def add_user_message(self, user: str, conversation_id: int, content: str, *,
                         parent_id: int | None = AFTER_LEAF) -> Message:
        """Saved before the model is asked, so nothing typed is lost if the server fails. It follows
        the selected path's last message, or `parent_id` (an edited question: a new branch)."""
        return self._add(user, Message(0, conversation_id, "user", content), parent_id)

    def add_answer(self, user: str, conversation_id: int, content: str, *, status: str = COMPLETE,
                   model: str | None = None, usage: Usage | None = None, error: str | None = None,
                   reasoning: str | None = None, tool_calls: list | None = None, details: dict | None = None,
                   parent_id: int | None = AFTER_LEAF) -> Message:
        """An answer to the selected path's last message, or to `parent_id` (the question it answers)."""
        return self._add(user, Message(0, conversation_id, "assistant", content, status=status, model=model,
                                       usage=usage or Usage(), error=error, reasoning=reasoning,
                                       tool_calls=tool_calls, details=details), parent_id)

    def _add(self, user: str, message: Message, parent_id) -> Message:
        """Insert a new message (its id and time are set here), make it the selected path's end, return it."""
        message.created_at = time.time()
        with self._connect() as db:
            conversation = self._owned(db, user, message.conversation_id)
            message.parent_id = conversation["leaf_id"] if parent_id is AFTER_LEAF else parent_id
            if message.parent_id is not None and not db.execute(
                    "SELECT 1 FROM messages WHERE id = ? AND conversation_id = ?",
                    (message.parent_id, message.conversation_id)).fetchone():
                raise KeyError(f"no message {message.parent_id} in conversation {message.conversation_id}")
            message.id = _insert_message(db, message)
            db.execute("UPDATE conversations SET updated_at = ?, leaf_id = ? WHERE id = ?",
                       (message.created_at, message.id, message.conversation_id))
            if message.role == "user":
                # The first message names a conversation nobody has named yet.
                db.execute("UPDATE conversations SET title = ? WHERE id = ? AND title = ?",
                           (title_from(message.content), message.conversation_id, DEFAULT_TITLE))
        return message

    def extend_answer(self, user: str, message_id: int, more: str, *, status: str, usage: Usage | None = None,
                      details: dict | None = None) -> Message:
        """Add text to an answer (Continue, after it was cut short): its tokens are added up, the
        context figures and how it ended are the continuation's."""
        answer = self.message(user, message_id)
        if answer is None or answer.role != "assistant":
            raise KeyError(f"no answer {message_id}")
        usage = usage or Usage()
        merged = Usage(**{name: getattr(usage, name) if getattr(usage, name) is not None else getattr(answer.usage, name)
                          for name in USAGE_FIELDS})
        merged.completion_tokens = (answer.usage.completion_tokens or 0) + (usage.completion_tokens or 0)
        columns = {"content": answer.content + more, "status": status, **asdict(merged),
                   "details": json.dumps({**(answer.details or {}), **(details or {})})}
        with self._connect() as db:
            db.execute(f"UPDATE messages SET {', '.join(f'{name} = ?' for name in columns)} WHERE id = ?",
                       [*columns.values(), message_id])
        return self.message(user, message_id)

    def select(self, user: str, conversation_id: int, message_id: int | None) -> None:
        """End the selected path at this message (None: before the first), e.g. to answer it again."""
        with self._connect() as db:
            self._owned(db, user, conversation_id)
            if message_id is not None and not db.execute(
                    "SELECT 1 FROM messages WHERE id = ? AND conversation_id = ?", (message_id, conversation_id)
            ).fetchone():
                raise KeyError(f"no message {message_id} in conversation {conversation_id}")
            db.execute("UPDATE conversations SET leaf_id = ? WHERE id = ?", (message_id, conversation_id))

    def show_branch(self, user: str, conversation_id: int, message_id: int) -> None:
        """Select the path through this message, down to its newest last message."""
        with self._connect() as db:
            self._owned(db, user, conversation_id)
            tree = self._tree(db, conversation_id)
        if message_id not in tree:
            raise KeyError(f"no message {message_id} in conversation {conversation_id}")
        children: dict[int, int] = {}
        for message in tree.values():  # oldest first: the newest child wins
            if message.parent_id is not None:
                children[message.parent_id] = message.id
        leaf = message_id
        while leaf in children:
            leaf = children[leaf]
        self.select(user, conversation_id, leaf)

    def remove_failed_answer(self, user: str, conversation_id: int) -> Message | None:
        """Remove the selected path's last message if it is a failed answer (to retry it); returns it."""
        with self._connect() as db:
            leaf_id = self._owned(db, user, conversation_id)["leaf_id"]
            row = db.execute("SELECT * FROM messages WHERE id = ?", (leaf_id,)).fetchone()
            if row is None or row["role"] != "assistant" or row["status"] != FAILED:
                return None
            db.execute("UPDATE conversations SET leaf_id = ? WHERE id = ?", (row["parent_id"], conversation_id))
            db.execute("DELETE FROM messages WHERE id = ?", (row["id"],))
        return Message.from_row(row)

    # ---- settings -------------------------------------------------------------------

    def load_settings(self, user: str) -> dict:
        """The chat settings the user last saved (model, system prompt, sampling), by name."""
        with self._connect() as db:
            rows = db.execute("SELECT name, value FROM user_settings WHERE user_id = ?", (user,)).fetchall()
        return {row["name"]: json.loads(row["value"]) for row in rows}

    def save_settings(self, user: str, settings: dict) -> None:
        with self._connect() as db:
            db.executemany("INSERT INTO user_settings (user_id, name, value) VALUES (?, ?, ?) "
                           "ON CONFLICT (user_id, name) DO UPDATE SET value = excluded.value",
                           [(user, name, json.dumps(value)) for name, value in settings.items()])

    # ---- import (chatstack/conversation_transfer.py) -----------------------------------

    def insert_conversations(self, user: str, conversations: list[tuple[Conversation, list[Message]]]
                             ) -> list[Conversation]:
        """Add whole conversations (e.g. imported) for the user in one transaction: all of them or,
        on any error, none. Each conversation's messages come parents first; their ids, parent
        ids and the conversation's leaf_id are the caller's own numbering, replaced by the
        database's. Titles, times, pinning and every message's fields are kept as given."""
        added = []
        with self._connect() as db:
            for conversation, messages in conversations:
                conversation_id = db.execute(
                    "INSERT INTO conversations (title, created_at, updated_at, user_id, pinned) VALUES (?, ?, ?, ?, ?)",
                    (conversation.title, conversation.created_at, conversation.updated_at, user,
                     int(conversation.pinned))).lastrowid
                new_ids: dict[int, int] = {}
                for message in messages:
                    parent_id = None if message.parent_id is None else new_ids[message.parent_id]
                    new_ids[message.id] = _insert_message(db, replace(message, conversation_id=conversation_id,
                                                                      parent_id=parent_id))
                leaf_id = None if conversation.leaf_id is None else new_ids[conversation.leaf_id]
                db.execute("UPDATE conversations SET leaf_id = ? WHERE id = ?", (leaf_id, conversation_id))
                added.append(replace(conversation, id=conversation_id, user_id=user, deleted_at=None,
                                     leaf_id=leaf_id))
        return added


def _insert_message(db: sqlite3.Connection, message: Message) -> int:
    """Write a message's row as given (its id aside); returns the new id."""
    columns = {"conversation_id": message.conversation_id, "role": message.role, "content": message.content,
               "status": message.status, "model": message.model, **asdict(message.usage),
               "error": message.error, "created_at": message.created_at, "parent_id": message.parent_id,
               "reasoning": message.reasoning,
               "tool_calls": json.dumps(message.tool_calls) if message.tool_calls else None,
               "details": json.dumps(message.details) if message.details else None}
    cur = db.execute(f"INSERT INTO messages ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                     list(columns.values()))
    return cur.lastrowid
