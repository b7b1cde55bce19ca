"""The SQLite conversation store: what it keeps, in what order, and that it lasts."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from chatstack.conversations import (
    COMPLETE, DEFAULT_TITLE, FAILED, STOPPED, ConversationStore, default_db_path, title_from,
)
from chatstack.usage import Usage


@pytest.fixture
def store(tmp_path) -> ConversationStore:
    return ConversationStore(tmp_path / "chat.db")


def test_messages_come_back_in_order_with_their_answer_details(store):
    chat = store.create()
    store.add_user_message(chat.id, "What is TorchServe?")
    usage = Usage(prompt_tokens=20, completion_tokens=5, total_tokens=25, context_length=2048, messages_dropped=0,
                  tokens_per_second=41.5)
    saved = store.add_answer(chat.id, "A model server.", status=COMPLETE, model="llama", usage=usage)
    user, answer = store.messages(chat.id)
    assert (user.role, user.content, user.usage) == ("user", "What is TorchServe?", Usage())
    assert (answer.role, answer.content, answer.status, answer.model) == ("assistant", "A model server.", COMPLETE, "llama")
    assert answer.usage == usage
    assert answer == saved


def test_conversations_survive_reopening_the_database(tmp_path):
    path = tmp_path / "nested" / "chat.db"
    first = ConversationStore(path)
    chat = first.create()
    first.add_user_message(chat.id, "remember me")

    reopened = ConversationStore(path)
    assert [c.id for c in reopened.list()] == [chat.id]
    assert [m.content for m in reopened.messages(chat.id)] == ["remember me"]


def test_first_message_names_the_conversation_unless_the_user_did(store):
    chat = store.create()
    store.add_user_message(chat.id, "How do\nI scale   workers?")
    store.add_user_message(chat.id, "And then?")
    assert store.get(chat.id).title == "How do I scale workers?"

    named = store.create()
    store.rename(named.id, "  My   notes ")
    store.add_user_message(named.id, "hello")
    assert store.get(named.id).title == "My notes"


def test_long_titles_are_cut_at_a_word():
    title = title_from("Please explain in detail how continuous batching works in TorchServe with llama.cpp")
    assert title.endswith("…") and len(title) <= 49
    assert title.startswith("Please explain in detail how continuous")
    assert title_from("   ") == DEFAULT_TITLE


def test_most_recently_used_conversation_comes_first(store):
    old, new = store.create(), store.create()
    assert [c.id for c in store.list()] == [new.id, old.id]
    store.add_user_message(old.id, "back to this one")
    assert [c.id for c in store.list()] == [old.id, new.id]


def test_deleting_a_conversation_deletes_its_messages_only(store):
    kept, gone = store.create(), store.create()
    store.add_user_message(kept.id, "stay")
    store.add_user_message(gone.id, "go")
    store.delete(gone.id)
    assert store.get(gone.id) is None
    assert store.messages(gone.id) == []
    assert [m.content for m in store.messages(kept.id)] == ["stay"]


def test_remove_last_answer_takes_only_a_trailing_answer(store):
    chat = store.create()
    store.add_user_message(chat.id, "q1")
    store.add_answer(chat.id, "a1")
    store.add_user_message(chat.id, "q2")
    assert store.remove_last_answer(chat.id) is None  # the question is never removed
    store.add_answer(chat.id, "partial", status=STOPPED)
    assert store.remove_last_answer(chat.id).content == "partial"
    assert [m.content for m in store.messages(chat.id)] == ["q1", "a1", "q2"]


def test_answer_fields_are_checked(store):
    chat = store.create()
    with pytest.raises(TypeError, match="colour"):
        store.add_answer(chat.id, "x", colour="blue")
    store.add_answer(chat.id, "cut", status=FAILED, error="the stream broke off")
    assert store.messages(chat.id)[-1].error == "the stream broke off"


def test_sessions_in_several_threads_write_at_once(store):
    chats = [store.create() for _ in range(4)]

    def chat_in(conversation_id):
        for i in range(25):
            store.add_user_message(conversation_id, f"message {i}")

    threads = [threading.Thread(target=chat_in, args=(c.id,)) for c in chats]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(store.messages(c.id)) == 25 for c in chats)


def test_database_path_comes_from_the_environment(tmp_path):
    assert default_db_path({"CHAT_DB_PATH": str(tmp_path / "x.db")}) == tmp_path / "x.db"
    assert default_db_path({"XDG_DATA_HOME": str(tmp_path)}) == tmp_path / "chatstack" / "chat.db"


def test_settings_are_kept_and_updated(tmp_path):
    path = tmp_path / "chat.db"
    ConversationStore(path).save_settings({"temperature": 0.2, "system_prompt": "Be brief."})
    ConversationStore(path).save_settings({"temperature": 0.3})
    assert ConversationStore(path).load_settings() == {"temperature": 0.3, "system_prompt": "Be brief."}


# The database as the app wrote it before answers kept their figures in one Usage
# (chatstack/conversations.py up to commit 9204513): the same tables, column by column.
SCHEMA_BEFORE_USAGE = """
CREATE TABLE conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, title TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')), content TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'complete', model TEXT, prompt_tokens INTEGER, completion_tokens INTEGER,
    total_tokens INTEGER, context_length INTEGER, messages_dropped INTEGER, tokens_per_second REAL, error TEXT,
    created_at REAL NOT NULL);
CREATE INDEX messages_by_conversation ON messages (conversation_id, id);
CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO conversations VALUES (7, 'Old chat', 1.0, 4.0);
INSERT INTO messages (conversation_id, role, content, created_at) VALUES (7, 'user', 'Hello?', 2.0);
INSERT INTO messages (conversation_id, role, content, status, model, prompt_tokens, completion_tokens, total_tokens,
                      context_length, messages_dropped, tokens_per_second, error, created_at)
    VALUES (7, 'assistant', 'Hi there.', 'complete', 'llama', 30, 4, 34, 2048, 0, 55.5, NULL, 3.0);
INSERT INTO messages (conversation_id, role, content, status, model, completion_tokens, error, created_at)
    VALUES (7, 'assistant', 'Half an', 'failed', 'llama', 2, 'the stream broke off', 4.0);
INSERT INTO settings VALUES ('temperature', '0.2');
"""


def test_a_database_written_before_usage_opens_with_every_message(tmp_path):
    path = tmp_path / "chat.db"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA_BEFORE_USAGE)
    store = ConversationStore(path)

    [conversation] = store.list()
    assert (conversation.id, conversation.title) == (7, "Old chat")
    user, answer, broken = store.messages(7)
    assert (user.role, user.content, user.usage) == ("user", "Hello?", Usage())
    assert (answer.content, answer.status, answer.model) == ("Hi there.", COMPLETE, "llama")
    assert answer.usage == Usage(prompt_tokens=30, completion_tokens=4, total_tokens=34, context_length=2048,
                                 messages_dropped=0, tokens_per_second=55.5)
    assert (broken.status, broken.error, broken.usage.completion_tokens) == (FAILED, "the stream broke off", 2)
    assert store.load_settings() == {"temperature": 0.2}

    # And it goes on working: new answers are kept beside the old ones.
    assert store.remove_last_answer(7).content == "Half an"
    store.add_answer(7, "Hello!", usage=Usage(completion_tokens=2))
    assert [m.content for m in ConversationStore(path).messages(7)] == ["Hello?", "Hi there.", "Hello!"]
