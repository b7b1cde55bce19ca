"""The SQLite conversation store: what it keeps, in what order, that it lasts, its branches,
search, and that one user never sees another's conversations."""

from __future__ import annotations

import sqlite3
import threading
from contextlib import closing

import pytest

from chatstack.conversations import (
    COMPLETE, DEFAULT_TITLE, FAILED, LOCAL_USER, STOPPED, UNDO_DELETE_S, ConversationStore, default_db_path,
    title_from,
)
from chatstack.usage import Usage


U = LOCAL_USER


@pytest.fixture
def store(tmp_path) -> ConversationStore:
    return ConversationStore(tmp_path / "chat.db")


def test_messages_come_back_in_order_with_their_answer_details(store):
    chat = store.create(U)
    store.add_user_message(U, chat.id, "What is TorchServe?")
    usage = Usage(prompt_tokens=20, completion_tokens=5, total_tokens=25, context_length=2048, messages_dropped=0,
                  tokens_per_second=41.5)
    saved = store.add_answer(U, chat.id, "A model server.", status=COMPLETE, model="llama", usage=usage)
    user, answer = store.messages(U, chat.id)
    assert (user.role, user.content, user.usage) == ("user", "What is TorchServe?", Usage())
    assert (answer.role, answer.content, answer.status, answer.model) == ("assistant", "A model server.", COMPLETE, "llama")
    assert answer.usage == usage
    assert answer == saved


def test_conversations_survive_reopening_the_database(tmp_path):
    path = tmp_path / "nested" / "chat.db"
    first = ConversationStore(path)
    chat = first.create(U)
    first.add_user_message(U, chat.id, "remember me")

    reopened = ConversationStore(path)
    assert [c.id for c in reopened.list(U)] == [chat.id]
    assert [m.content for m in reopened.messages(U, chat.id)] == ["remember me"]


def test_first_message_names_the_conversation_unless_the_user_did(store):
    chat = store.create(U)
    store.add_user_message(U, chat.id, "How do\nI scale   workers?")
    store.add_user_message(U, chat.id, "And then?")
    assert store.get(U, chat.id).title == "How do I scale workers?"

    named = store.create(U)
    store.rename(U, named.id, "  My   notes ")
    store.add_user_message(U, named.id, "hello")
    assert store.get(U, named.id).title == "My notes"


def test_long_titles_are_cut_at_a_word():
    title = title_from("Please explain in detail how continuous batching works in TorchServe with llama.cpp")
    assert title.endswith("…") and len(title) <= 49
    assert title.startswith("Please explain in detail how continuous")
    assert title_from("   ") == DEFAULT_TITLE


def test_most_recently_used_conversation_comes_first(store):
    old, new = store.create(U), store.create(U)
    assert [c.id for c in store.list(U)] == [new.id, old.id]
    store.add_user_message(U, old.id, "back to this one")
    assert [c.id for c in store.list(U)] == [old.id, new.id]


def test_deleting_a_conversation_deletes_its_messages_only(store):
    kept, gone = store.create(U), store.create(U)
    store.add_user_message(U, kept.id, "stay")
    store.add_user_message(U, gone.id, "go")
    store.delete(U, gone.id)
    assert store.get(U, gone.id) is None and [c.id for c in store.list(U)] == [kept.id]
    with pytest.raises(KeyError):
        store.messages(U, gone.id)
    assert [m.content for m in store.messages(U, kept.id)] == ["stay"]


def test_a_deleted_conversation_can_be_restored_until_the_undo_time_is_over(store, tmp_path):
    chat, other = store.create(U), store.create(U)
    store.add_user_message(U, chat.id, "keep me")
    store.delete(U, chat.id)
    assert store.search(U, "keep") == []
    assert store.restore(U, chat.id)
    assert [m.content for m in store.messages(U, chat.id)] == ["keep me"]
    assert [h.conversation.id for h in store.search(U, "keep")] == [chat.id]

    # Another delete after the undo time removes the first for good, messages and all.
    store.delete(U, chat.id, now=1000.0)
    store.delete(U, other.id, now=1000.0 + UNDO_DELETE_S + 1)
    assert not store.restore(U, chat.id) and store.restore(U, other.id)
    with sqlite3.connect(tmp_path / "chat.db") as db:
        assert db.execute("SELECT COUNT(*) FROM messages WHERE conversation_id = ?", (chat.id,)).fetchone() == (0,)


def test_remove_failed_answer_takes_only_a_trailing_failed_answer(store):
    chat = store.create(U)
    store.add_user_message(U, chat.id, "q1")
    store.add_answer(U, chat.id, "a1")
    store.add_user_message(U, chat.id, "q2")
    assert store.remove_failed_answer(U, chat.id) is None  # the question is never removed
    store.add_answer(U, chat.id, "partial", status=STOPPED)
    assert store.remove_failed_answer(U, chat.id) is None  # a stopped answer is what the user kept
    store.select(U, chat.id, store.messages(U, chat.id)[-2].id)
    store.add_answer(U, chat.id, "broke", status=FAILED, error="gone")
    assert store.remove_failed_answer(U, chat.id).content == "broke"
    assert [m.content for m in store.messages(U, chat.id)] == ["q1", "a1", "q2"]
    assert [m.content for m in store.all_messages(U, chat.id)] == ["q1", "a1", "q2", "partial"]


def test_answer_fields_are_checked(store):
    chat = store.create(U)
    with pytest.raises(TypeError, match="colour"):
        store.add_answer(U, chat.id, "x", colour="blue")
    store.add_answer(U, chat.id, "cut", status=FAILED, error="the stream broke off")
    assert store.messages(U, chat.id)[-1].error == "the stream broke off"


def test_sessions_in_several_threads_write_at_once(store):
    chats = [store.create(U) for _ in range(4)]

    def chat_in(conversation_id):
        for i in range(25):
            store.add_user_message(U, conversation_id, f"message {i}")

    threads = [threading.Thread(target=chat_in, args=(c.id,)) for c in chats]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(store.messages(U, c.id)) == 25 for c in chats)


def test_database_path_comes_from_the_environment(tmp_path):
    assert default_db_path({"CHAT_DB_PATH": str(tmp_path / "x.db")}) == tmp_path / "x.db"
    assert default_db_path({"XDG_DATA_HOME": str(tmp_path)}) == tmp_path / "chatstack" / "chat.db"


def test_settings_are_kept_and_updated(tmp_path):
    path = tmp_path / "chat.db"
    ConversationStore(path).save_settings(U, {"temperature": 0.2, "system_prompt": "Be brief."})
    ConversationStore(path).save_settings(U, {"temperature": 0.3})
    assert ConversationStore(path).load_settings(U) == {"temperature": 0.3, "system_prompt": "Be brief."}


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

    [conversation] = store.list(U)
    assert (conversation.id, conversation.title) == (7, "Old chat")
    user, answer, broken = store.messages(U, 7)
    assert (user.role, user.content, user.usage) == ("user", "Hello?", Usage())
    assert (answer.content, answer.status, answer.model) == ("Hi there.", COMPLETE, "llama")
    assert answer.usage == Usage(prompt_tokens=30, completion_tokens=4, total_tokens=34, context_length=2048,
                                 messages_dropped=0, tokens_per_second=55.5)
    assert (broken.status, broken.error, broken.usage.completion_tokens) == (FAILED, "the stream broke off", 2)
    assert store.load_settings(U) == {"temperature": 0.2}

    # And it goes on working: new answers are kept beside the old ones.
    assert store.remove_failed_answer(U, 7).content == "Half an"
    store.add_answer(U, 7, "Hello!", usage=Usage(completion_tokens=2))
    assert [m.content for m in ConversationStore(path).messages(U, 7)] == ["Hello?", "Hi there.", "Hello!"]


# ---- branches ----------------------------------------------------------------------------

def test_an_edited_question_and_a_regenerated_answer_are_branches_beside_the_old_ones(store):
    chat = store.create(U)
    q1 = store.add_user_message(U, chat.id, "q1")
    a1 = store.add_answer(U, chat.id, "a1")
    q2 = store.add_user_message(U, chat.id, "q2")
    a2 = store.add_answer(U, chat.id, "a2")
    assert [m.content for m in store.messages(U, chat.id)] == ["q1", "a1", "q2", "a2"]
    assert [m.branch for m in store.messages(U, chat.id)] == [(1, 1)] * 4

    # Regenerate a1 (not the last answer): a new answer to q1, the rest of the old path kept aside.
    store.select(U, chat.id, q1.id)
    assert [m.content for m in store.messages(U, chat.id)] == ["q1"]
    a1b = store.add_answer(U, chat.id, "a1 again")
    path = store.messages(U, chat.id)
    assert [m.content for m in path] == ["q1", "a1 again"] and path[1].branch == (2, 2)
    assert path[1].alternatives == (a1.id, a1b.id)

    # Edit q2 on the first branch: a sibling of q2.
    store.show_branch(U, chat.id, a1.id)
    assert [m.content for m in store.messages(U, chat.id)] == ["q1", "a1", "q2", "a2"]  # down to its newest end
    q2b = store.add_user_message(U, chat.id, "q2 edited", parent_id=q2.parent_id)
    path = store.messages(U, chat.id)
    assert [m.content for m in path] == ["q1", "a1", "q2 edited"]
    assert (path[1].branch, path[2].branch) == ((1, 2), (2, 2))

    store.show_branch(U, chat.id, q2.id)
    assert [m.content for m in store.messages(U, chat.id)] == ["q1", "a1", "q2", "a2"]
    # Nothing is ever lost: every message of every branch, parents first.
    assert [m.id for m in store.all_messages(U, chat.id)] == [q1.id, a1.id, q2.id, a2.id, a1b.id, q2b.id]
    with pytest.raises(KeyError):
        store.show_branch(U, chat.id, 10_000)


def test_an_edited_first_question_is_a_second_root(store):
    chat = store.create(U)
    store.add_user_message(U, chat.id, "first")
    store.add_answer(U, chat.id, "one")
    store.add_user_message(U, chat.id, "first, reworded", parent_id=None)
    [question] = store.messages(U, chat.id)
    assert (question.content, question.branch) == ("first, reworded", (2, 2))
    assert store.get(U, chat.id).title == "first"  # named by its first message, not changed by edits


def test_an_answer_keeps_reasoning_tool_calls_and_the_servers_details(store):
    chat = store.create(U)
    store.add_user_message(U, chat.id, "weather?")
    calls = [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]
    details = {"prompt_n": 12, "ttft_ms": 80.5, "model_version": "2.0", "finish_reason": "tool_calls"}
    store.add_answer(U, chat.id, "", reasoning="They want the weather.", tool_calls=calls, details=details)
    answer = store.messages(U, chat.id)[-1]
    assert (answer.reasoning, answer.tool_calls, answer.details) == ("They want the weather.", calls, details)
    assert answer.finish_reason == "tool_calls" and not answer.cut_short


def test_continue_adds_to_an_answer_that_was_cut_short(store):
    chat = store.create(U)
    store.add_user_message(U, chat.id, "story")
    cut = store.add_answer(U, chat.id, "Once upon", usage=Usage(prompt_tokens=10, completion_tokens=2, total_tokens=12),
                           details={"finish_reason": "length", "model_version": "1.0"})
    assert store.messages(U, chat.id)[-1].cut_short
    store.extend_answer(U, cut.id, " a time.", status=COMPLETE,
                        usage=Usage(prompt_tokens=20, completion_tokens=3, total_tokens=23),
                        details={"finish_reason": "stop"})
    answer = store.messages(U, chat.id)[-1]
    assert (answer.content, answer.cut_short, answer.details["model_version"]) == ("Once upon a time.", False, "1.0")
    assert (answer.usage.completion_tokens, answer.usage.total_tokens) == (5, 23)


# ---- find and pin ----------------------------------------------------------------------

def test_search_finds_conversations_by_any_message_or_title(store):
    boats, trains, quiet = store.create(U), store.create(U), store.create(U)
    store.add_user_message(U, boats.id, "How do sailboats tack against the wind?")
    store.add_answer(U, boats.id, "They zig-zag across it.")
    store.add_user_message(U, trains.id, "Fastest trains?")
    store.add_answer(U, trains.id, "Maglev trains run fastest; sailing is slower.")
    store.rename(U, quiet.id, "Notes on wind power")

    assert [h.conversation.id for h in store.search(U, "zig")] == [boats.id]   # the start of a word
    assert {h.conversation.id for h in store.search(U, "wind")} == {boats.id, quiet.id}
    [hit] = store.search(U, "maglev")
    assert hit.conversation.id == trains.id and "**Maglev**" in hit.snippet
    # What is typed is text, not FTS5 syntax.
    assert store.search(U, 'AND "') == [] and store.search(U, "NEAR(x y)") == [] and store.search(U, "  ") == []
    # Text of a branch that is not shown is found too.
    store.select(U, boats.id, store.messages(U, boats.id)[0].id)
    store.add_answer(U, boats.id, "By turning the bow through the wind.")
    assert [h.conversation.id for h in store.search(U, "zig-zag")] == [boats.id]


def test_pinned_conversations_come_first(store):
    first, second = store.create(U), store.create(U)
    store.pin(U, first.id)
    assert [c.id for c in store.list(U)] == [first.id, second.id] and store.get(U, first.id).pinned
    store.pin(U, first.id, False)
    assert [c.id for c in store.list(U)] == [second.id, first.id]


# ---- people --------------------------------------------------------------------------

def test_one_user_can_never_read_or_change_another_users_conversations(store):
    alice, bob = "https://idp.example|alice", "https://idp.example|bob"
    secret = store.create(alice)
    question = store.add_user_message(alice, secret.id, "my private plans")
    store.save_settings(alice, {"system_prompt": "Alice's"})

    assert store.list(bob) == [] and store.get(bob, secret.id) is None
    assert store.search(bob, "private") == [] and store.message(bob, question.id) is None
    assert store.load_settings(bob) == {}
    for attempt in (lambda: store.messages(bob, secret.id), lambda: store.all_messages(bob, secret.id),
                    lambda: store.add_user_message(bob, secret.id, "hi"),
                    lambda: store.add_answer(bob, secret.id, "hi"),
                    lambda: store.select(bob, secret.id, None), lambda: store.show_branch(bob, secret.id, question.id),
                    lambda: store.extend_answer(bob, question.id, "x", status=COMPLETE),
                    lambda: store.remove_failed_answer(bob, secret.id)):
        with pytest.raises(KeyError):
            attempt()
    store.rename(bob, secret.id, "mine now")
    store.pin(bob, secret.id)
    store.delete(bob, secret.id)
    assert not store.restore(bob, secret.id)
    # A message of Bob's own conversation cannot hang under Alice's messages either.
    own = store.create(bob)
    with pytest.raises(KeyError):
        store.add_user_message(bob, own.id, "graft", parent_id=question.id)

    conversation = store.get(alice, secret.id)
    assert (conversation.title, conversation.pinned, conversation.deleted_at) == ("my private plans", False, None)
    assert [m.content for m in store.messages(alice, secret.id)] == ["my private plans"]
    assert store.load_settings(alice) == {"system_prompt": "Alice's"}


# ---- migration -----------------------------------------------------------------------------

# The database exactly as the app wrote it before branches, search and users: the SCHEMA of
# chatstack/conversations.py at commit 6721d55, filled the way that code filled it (a failed
# answer removed on retry, a regenerated answer replacing the old one, settings in `settings`).
SCHEMA_BEFORE_BRANCHES = """
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


def fill_like_the_old_app(db: sqlite3.Connection) -> dict[int, list[tuple]]:
    """Three conversations written in turns (their messages interleave by id, as when several
    chats run at once); returns each conversation's (role, content, status) in order."""
    db.executescript(SCHEMA_BEFORE_BRANCHES)
    expected: dict[int, list[tuple]] = {}
    for n, title in enumerate(("Boats", "Trains", "Planes")):
        db.execute("INSERT INTO conversations (title, created_at, updated_at) VALUES (?, ?, ?)", (title, n, n))
        expected[n + 1] = []
    clock = 10.0
    for turn in range(4):
        for conversation_id in expected:
            for role, status in (("user", "complete"), ("assistant", "stopped" if turn == 2 else "complete")):
                content = f"{role} {turn} of {conversation_id}"
                clock += 1
                db.execute("INSERT INTO messages (conversation_id, role, content, status, model, completion_tokens,"
                           " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (conversation_id, role, content, status, "llama" if role == "assistant" else None,
                            turn + 1 if role == "assistant" else None, clock))
                expected[conversation_id].append((role, content, status))
    # The old app's retry: the failed answer deleted, a new one added after the question.
    db.execute("DELETE FROM messages WHERE id = (SELECT MAX(id) FROM messages WHERE conversation_id = 2)")
    db.execute("INSERT INTO messages (conversation_id, role, content, created_at) "
               "VALUES (2, 'assistant', 'retried answer', 99.0)")
    expected[2][-1] = ("assistant", "retried answer", "complete")
    db.execute("INSERT INTO settings VALUES ('system_prompt', '\"Be brief.\"'), ('max_tokens', '64')")
    return expected


def test_a_database_written_before_branches_opens_with_every_message_in_order(tmp_path):
    path = tmp_path / "chat.db"
    with closing(sqlite3.connect(path)) as db, db:
        expected = fill_like_the_old_app(db)
        rows_before = db.execute("SELECT * FROM messages ORDER BY id").fetchall()

    store = ConversationStore(path)
    assert [c.title for c in store.list(LOCAL_USER)] == ["Planes", "Trains", "Boats"]
    for conversation_id, messages in expected.items():
        path_shown = store.messages(LOCAL_USER, conversation_id)
        assert [(m.role, m.content, m.status) for m in path_shown] == messages
        assert all(m.branch == (1, 1) for m in path_shown)
        assert len(store.all_messages(LOCAL_USER, conversation_id)) == len(messages)
    assert store.load_settings(LOCAL_USER) == {"system_prompt": "Be brief.", "max_tokens": 64}
    # The old rows are all there, unchanged but for the new columns.
    with closing(sqlite3.connect(path)) as db:
        rows_after = db.execute("SELECT * FROM messages ORDER BY id").fetchall()
    assert [row[:14] for row in rows_after] == rows_before
    # Old messages are searchable, and the migrated conversations grow branches like new ones.
    assert [h.conversation.id for h in store.search(LOCAL_USER, "retried")] == [2]
    first_question = store.messages(LOCAL_USER, 1)[0]
    store.add_user_message(LOCAL_USER, 1, "edited", parent_id=first_question.parent_id)
    assert [m.content for m in store.messages(LOCAL_USER, 1)] == ["edited"]
    store.show_branch(LOCAL_USER, 1, first_question.id)
    assert [(m.role, m.content, m.status) for m in store.messages(LOCAL_USER, 1)] == expected[1]
    # Opening it again changes nothing.
    assert [(m.role, m.content, m.status) for m in ConversationStore(path).messages(LOCAL_USER, 2)] == expected[2]
