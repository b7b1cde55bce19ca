"""Export and import of conversations (chatstack/conversation_transfer.py) on real
SQLite stores: round trips keep everything, hostile files change nothing."""

from __future__ import annotations

import json

import pytest

from chatstack import conversation_transfer as transfer
from chatstack.conversation_transfer import (FORMAT, FORMAT_VERSION, TransferError, export_json, export_markdown,
                                             import_plan, read_import)
from chatstack.conversations import FAILED, LOCAL_USER, STOPPED, Conversation, ConversationStore, Message
from chatstack.usage import Usage

NOW = 1_764_000_000.0
TOOL_CALLS = [{"id": "call_0", "type": "function",
               "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]
DETAILS = {"prompt_n": 30, "cache_n": 12, "prompt_ms": 80.5, "prompt_per_second": 372.7, "predicted_n": 9,
           "predicted_ms": 300.0, "predicted_per_second": 30.0, "queue_ms": 1.5, "ttft_ms": 82.0,
           "model_version": "2.0", "finish_reason": "stop"}


@pytest.fixture
def store(tmp_path):
    return ConversationStore(tmp_path / "chat.db")


@pytest.fixture
def fresh(tmp_path):
    return ConversationStore(tmp_path / "fresh.db")


def filled(store: ConversationStore) -> ConversationStore:
    """Two conversations using everything the store keeps: branches (an edited question, a
    regenerated answer), reasoning, tool calls, the server's details, usage, stopped and
    failed answers, a pinned and renamed conversation, saved settings."""
    store.save_settings(LOCAL_USER, {"model": "llama", "temperature": 0.2, "max_tokens": 64})
    first = store.create(LOCAL_USER)
    question = store.add_user_message(LOCAL_USER, first.id, "What is the weather in Paris?")
    called = store.add_answer(LOCAL_USER, first.id, "", model="llama", tool_calls=TOOL_CALLS, reasoning="A tool knows.",
                     usage=Usage(prompt_tokens=30, completion_tokens=9, total_tokens=39, context_length=2048,
                                 messages_dropped=0, tokens_per_second=30.5), details=DETAILS)
    store.add_answer(LOCAL_USER, first.id, "Sunny | 20°C <b>", model="llama", status=STOPPED,
                     parent_id=question.id)  # regenerated: a second answer to the same question
    edited = store.add_user_message(LOCAL_USER, first.id, "And in Rome?", parent_id=None)  # an edited first question
    store.add_answer(LOCAL_USER, first.id, "The server broke off", model="llama", status=FAILED,
                     error="Worker died.", parent_id=edited.id)
    store.show_branch(LOCAL_USER, first.id, called.id)  # the tool call's branch is the one shown
    store.pin(LOCAL_USER, first.id)
    second = store.create(LOCAL_USER)
    store.add_user_message(LOCAL_USER, second.id, "Hi\n\nthere 👋")
    store.add_answer(LOCAL_USER, second.id, "Hello!", model="other")
    store.rename(LOCAL_USER, second.id, "Greetings")
    return store


def renumbered(exported: str) -> dict:
    """An export with each message id replaced by its position, so two stores' exports compare."""
    document = json.loads(exported)
    for conversation in document["conversations"]:
        position = {m["id"]: i for i, m in enumerate(conversation["messages"])}
        for message in conversation["messages"]:
            message["id"] = position[message["id"]]
            message["parent_id"] = position.get(message["parent_id"])
        conversation["leaf_id"] = position.get(conversation["leaf_id"])
    return document


def snapshot(store: ConversationStore, user: str = LOCAL_USER) -> str:
    return export_json(store, user, now=NOW)


# ---- round trips --------------------------------------------------------------------------

def test_round_trip_keeps_every_branch_and_field(store, fresh):
    original = snapshot(filled(store))
    plan = read_import(original)
    assert plan.summary() == "2 conversations with 7 messages (chatstack JSON)"
    added = import_plan(fresh, LOCAL_USER, plan)
    assert [c.title for c in added] == ["What is the weather in Paris?", "Greetings"]
    copy = renumbered(snapshot(fresh))
    assert copy["conversations"] == renumbered(original)["conversations"]
    # The selected paths and branch switches are the same too.
    for before, after in zip(store.list(LOCAL_USER), fresh.list(LOCAL_USER)):
        old_path, new_path = store.messages(LOCAL_USER, before.id), fresh.messages(LOCAL_USER, after.id)
        assert [(m.role, m.content, m.branch, m.details, m.tool_calls) for m in old_path] == \
               [(m.role, m.content, m.branch, m.details, m.tool_calls) for m in new_path]
        assert after.pinned == before.pinned


def test_a_second_import_adds_copies_beside_the_first(store):
    exported = snapshot(filled(store))
    import_plan(store, LOCAL_USER, read_import(exported.encode()))
    assert len(store.list(LOCAL_USER)) == 4


def test_one_conversation_exported_alone(store):
    filled(store)
    greetings = next(c for c in store.list(LOCAL_USER) if c.title == "Greetings")
    document = json.loads(export_json(store, LOCAL_USER, [greetings.id]))
    assert document["format"] == FORMAT and document["version"] == FORMAT_VERSION
    assert [c["title"] for c in document["conversations"]] == ["Greetings"]
    # Without branches, the messages are a plain OpenAI conversation (plus our fields).
    assert [(m["role"], m["content"]) for m in document["conversations"][0]["messages"]] == [
        ("user", "Hi\n\nthere 👋"), ("assistant", "Hello!")]
    assert document["settings"] == {"model": "llama", "temperature": 0.2, "max_tokens": 64}


def test_another_users_conversations_are_not_exported_and_imports_are_the_importers(store):
    exported = snapshot(filled(store))
    assert json.loads(export_json(store, "someone-else"))["conversations"] == []
    hidden = store.list(LOCAL_USER)[0].id
    assert json.loads(export_json(store, "someone-else", [hidden]))["conversations"] == []
    import_plan(store, "someone-else", read_import(exported))
    assert len(store.list("someone-else")) == 2 and len(store.list(LOCAL_USER)) == 2


def test_markdown_shows_the_selected_path_and_says_what_it_leaves_out(store):
    filled(store)
    text = export_markdown(store, LOCAL_USER)
    assert text.startswith("# What is the weather in Paris?\n")
    assert "*3 messages on other branches are not shown here; the JSON export keeps them.*" in text
    assert "## User\n\nWhat is the weather in Paris?" in text
    assert "## Assistant (llama 2.0)" in text
    assert "<details><summary>Reasoning</summary>\n\nA tool knows." in text
    assert "Tool call `get_weather`:\n\n```json\n{\"city\": \"Paris\"}\n```" in text
    assert "# Greetings\n" in text and "Hi\n\nthere 👋" in text
    assert "And in Rome?" not in text  # another branch


# ---- plain OpenAI messages ------------------------------------------------------------------

def test_openai_messages_array_becomes_one_conversation(fresh):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Paris?"}]},
                {"role": "assistant", "content": None, "tool_calls": TOOL_CALLS},
                {"role": "user", "content": "Thanks", "name": "ana"}]
    plan = read_import(json.dumps(messages))
    assert plan.notes == ["messages[0]: the system message was left out (the chat client's system prompt is a "
                          "setting, not part of a conversation)"]
    [conversation] = import_plan(fresh, LOCAL_USER, plan)
    assert conversation.title == "Weather in Paris?"
    path = fresh.messages(LOCAL_USER, conversation.id)
    assert [(m.role, m.content, m.tool_calls) for m in path] == [
        ("user", "Weather in Paris?", None), ("assistant", "", TOOL_CALLS), ("user", "Thanks", None)]


def test_openai_request_body_is_read_for_its_messages(fresh):
    plan = read_import(json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}))
    assert plan.summary() == "1 conversation with 1 message (OpenAI messages)"


# ---- hostile and malformed files change nothing ----------------------------------------------

def ours(**conversation) -> str:
    record = {"title": "t", "messages": [{"id": 1, "parent_id": None, "role": "user", "content": "hi"}],
              "leaf_id": 1, **conversation}
    return json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "conversations": [record]})


def user_message(**fields) -> dict:
    return {"id": 1, "parent_id": None, "role": "user", "content": "hi", **fields}


REFUSED = {
    "not json": ("{'format': 1", "not valid JSON"),
    "not utf-8": (b"\xff\xfe\x00[", "not UTF-8"),
    "a number": ("42", "neither a chatstack export"),
    "NaN": ('[{"role": "user", "content": "hi", "x": NaN}]', "NaN is not a JSON number"),
    "deeply nested": ("[" * 100_000 + "]" * 100_000, "nests too deep"),
    "nested in details": (ours(messages=[user_message(role="assistant", details={"a": json.loads("[" * 40 + "]" * 40)})]),
                          "more than 32 levels"),
    "unknown version": (json.dumps({"format": FORMAT, "version": 2, "conversations": []}),
                        "version: this file is format version 2; this app reads version 1 (it was written by a newer"),
    "another format": (json.dumps({"format": "chatgpt", "version": 1}), "format: 'chatgpt' is not"),
    "conversations not a list": (json.dumps({"format": FORMAT, "version": 1, "conversations": {}}),
                                 "conversations: expected a list, found an object"),
    "wrong role": (ours(messages=[user_message(role="tool")]), "conversations[0].messages[0].role: 'tool' is not a role"),
    "system in ours": (ours(messages=[user_message(role="system")]), "'system' is not a role"),
    "content a number": (ours(messages=[user_message(content=5)]),
                         "conversations[0].messages[0].content: expected text, found a number"),
    "image part": (json.dumps([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
                   "messages[0].content[0].type: only text parts"),
    "id twice": (ours(messages=[user_message(), user_message()]), "messages[1].id: 1 is used twice"),
    "parent later": (ours(messages=[user_message(parent_id=2), user_message(id=2)]),
                     "messages[0].parent_id: 2 is not a message before this one"),
    "id not whole": (ours(messages=[user_message(id=1.5)]), "messages[0].id: expected a whole number"),
    "leaf unknown": (ours(leaf_id=7), "conversations[0].leaf_id: 7 is not one of"),
    "unknown field": (ours(messages=[user_message(secret="x")]), "unknown field 'secret'"),
    "negative usage": (ours(messages=[user_message(role="assistant", usage={"prompt_tokens": -3})]),
                       "usage.prompt_tokens: expected a number from 0 to 9007199254740992, found -3"),
    "usage too large for SQLite": (ours(messages=[user_message(role="assistant", usage={"total_tokens": 10 ** 30})]),
                                   "usage.total_tokens: expected a number from 0 to"),
    "tool calls a dict": (ours(messages=[user_message(role="assistant", tool_calls={"a": 1})]),
                          "tool_calls: expected a list, found an object"),
    "user with tool calls": (ours(messages=[user_message(tool_calls=TOOL_CALLS)]), "a user message carries no"),
    "bad status": (ours(messages=[user_message(role="assistant", status="lost")]), "'lost' is not one of"),
    "pinned text": (ours(pinned="yes"), "pinned: expected true/false"),
    "huge text": (ours(messages=[user_message(content="x" * (transfer.MAX_TEXT_CHARS + 1))]),
                  "1,000,001 characters; at most 1,000,000"),
    "no messages": (json.dumps([{"role": "system", "content": "only"}]), "no user or assistant message"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_a_bad_file_is_refused_saying_why_and_nothing_changes(name, store):
    filled(store)
    before = snapshot(store)
    data, reason = REFUSED[name]
    with pytest.raises(TransferError) as refused:
        import_plan(store, LOCAL_USER, read_import(data))
    assert reason in str(refused.value)
    assert snapshot(store) == before


def test_a_file_too_large_is_refused_before_it_is_read(store):
    with pytest.raises(TransferError, match=r"the file is 20.0 MB; at most 20 MB"):
        read_import(b" " * (transfer.MAX_IMPORT_BYTES + 1))


def test_too_many_messages_are_refused(monkeypatch):
    monkeypatch.setattr(transfer, "MAX_MESSAGES", 2)
    with pytest.raises(TransferError, match="holds 3 messages; at most 2"):
        read_import(json.dumps([{"role": "user", "content": "a"}] * 3))


def test_a_bad_second_conversation_keeps_the_good_first_one_out(store):
    good = json.loads(ours())["conversations"][0]
    bad = {**good, "messages": [user_message(role="robot")]}
    with pytest.raises(TransferError, match=r"conversations\[1\]\.messages\[0\]\.role"):
        read_import(json.dumps({"format": FORMAT, "version": 1, "conversations": [good, bad]}))
    assert store.list(LOCAL_USER) == []


def test_the_write_is_one_transaction(store):
    """Even past the checks (a plan built by hand), a failure while writing leaves nothing."""
    filled(store)
    before = snapshot(store)
    good = (Conversation(0, "good", NOW, NOW, leaf_id=1), [Message(1, 0, "user", "hi")])
    broken = (Conversation(0, "broken", NOW, NOW, leaf_id=2), [Message(2, 0, "user", "x", parent_id=99)])
    with pytest.raises(KeyError):
        store.insert_conversations(LOCAL_USER, [good, broken])
    assert snapshot(store) == before
