"""The chat client's logic, run with Streamlit's AppTest against a real TorchServe
serving the default model (the session `torchserve` fixture)."""

from __future__ import annotations

import threading

import pytest
from streamlit.runtime.scriptrunner_utils.exceptions import StopException
from streamlit.testing.v1 import AppTest

from chatstack import chat_session as chat
from chatstack.conversations import COMPLETE, STOPPED, ConversationStore
from chatstack.torchserve_client import Keys
from conftest import ROOT, free_port

APP = str(ROOT / "client_app.py")


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "chat.db"


@pytest.fixture
def app_env(torchserve, db_path, monkeypatch):
    """The app's environment: the test TorchServe, its key file, a fresh database."""
    monkeypatch.setenv("TORCHSERVE_URL", torchserve.address("inference"))
    monkeypatch.setenv("TORCHSERVE_MANAGEMENT_URL", torchserve.address("management"))
    monkeypatch.setenv("TORCHSERVE_KEY_FILE", str(torchserve.key_file))
    monkeypatch.setenv("CHAT_DB_PATH", str(db_path))
    for name in ("TORCHSERVE_INFERENCE_KEY", "TORCHSERVE_MANAGEMENT_KEY", "TORCHSERVE_MODEL"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def open_app(max_tokens: int = 8, query: dict | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update(query or {})
    at.run()
    # Short, repeatable answers keep the tests quick on a small CPU.
    at.number_input(key="max_tokens").set_value(max_tokens)
    at.slider(key="temperature").set_value(0.0)
    return at.run()


def send(at: AppTest, text: str) -> AppTest:
    at.chat_input[0].set_value(text)
    return at.run()


def transcript(at: AppTest) -> list[tuple[str, str]]:
    return [(m.name, m.markdown[0].value) for m in at.chat_message]


def texts(elements) -> str:
    return " ".join(e.value for e in elements)


def test_a_message_gets_a_streamed_answer_that_is_saved(app_env, db_path):
    at = open_app()
    assert not at.error, texts(at.error)
    send(at, "Name three colours.")

    assert not at.exception
    (user_role, user_text), (bot_role, answer) = transcript(at)
    assert (user_role, user_text) == ("user", "Name three colours.")
    assert bot_role == "assistant" and answer.strip()
    caption = at.chat_message[1].caption[0].value
    assert "tokens/s" in caption and "llama" in caption

    store = ConversationStore(db_path)
    [conversation] = store.list()
    assert conversation.title == "Name three colours."
    user, saved_answer = store.messages(conversation.id)
    assert (user.role, user.content) == ("user", "Name three colours.")
    assert (saved_answer.role, saved_answer.status) == ("assistant", COMPLETE)
    assert chat.as_markdown(saved_answer.content) == answer
    # The copy control holds the answer's exact text.
    assert at.chat_message[1].code[0].value == saved_answer.content
    assert at.query_params["conversation"] == str(conversation.id)
    assert "Name three colours." in [b.label for b in at.sidebar.button]


def test_settings_reach_the_server_and_the_context_use_is_shown(app_env, db_path):
    at = open_app(max_tokens=5)
    assert at.selectbox(key="model").options == ["llama"]  # from the management API
    send(at, "Count from one to twenty in words.")

    [answer] = [m for m in ConversationStore(db_path).messages(1) if m.role == "assistant"]
    assert answer.completion_tokens == 5  # max_tokens was applied
    assert answer.context_length == 2048
    assert at.chat_message[1].caption[0].value.startswith("5 tokens")
    progress_label = at.sidebar.get("progress")[0].proto.text
    assert progress_label == f"Context: {answer.total_tokens:,} of 2,048 tokens ({answer.total_tokens / 2048:.0%})"


def test_a_reopened_page_shows_the_conversation_from_the_url(app_env, db_path):
    store = ConversationStore(db_path)
    older = store.create()
    store.add_user_message(older.id, "the older chat")
    chat_ = store.create()
    store.add_user_message(chat_.id, "hello again")
    store.add_answer(chat_.id, "Hello! Welcome back.", completion_tokens=5, tokens_per_second=12.0)

    at = open_app(query={"conversation": str(chat_.id)})
    assert transcript(at) == [("user", "hello again"), ("assistant", "Hello! Welcome back.")]
    assert [b.label for b in at.sidebar.button][1:3] == ["hello again", "the older chat"]

    at.sidebar.button(key=f"open-{older.id}").click().run()
    assert transcript(at) == [("user", "the older chat")]
    at.sidebar.button[0].click().run()  # New chat
    assert transcript(at) == [] and "conversation" not in at.query_params


def test_rename_and_delete_a_conversation(app_env, db_path):
    store = ConversationStore(db_path)
    chat_ = store.create()
    store.add_user_message(chat_.id, "first name")
    at = open_app(query={"conversation": str(chat_.id)})

    at.sidebar.text_input(key=f"title-{chat_.id}").set_value("Renamed").run()
    assert store.get(chat_.id).title == "Renamed"
    assert "Renamed" in [b.label for b in at.sidebar.button]

    [delete] = [b for b in at.sidebar.button if b.label == "Delete conversation"]
    delete.click().run()
    assert store.list() == [] and transcript(at) == []


def test_regenerate_replaces_the_last_answer(app_env, db_path):
    at = send(open_app(), "Say hi.")
    store = ConversationStore(db_path)
    first_answer = store.messages(1)[-1]

    [regenerate] = [b for b in at.button if b.label == "Regenerate"]
    regenerate.click().run()
    messages = store.messages(1)
    assert [m.role for m in messages] == ["user", "assistant"]
    assert messages[-1].id > first_answer.id
    assert transcript(at)[-1] == ("assistant", chat.as_markdown(messages[-1].content))


def test_server_down_keeps_the_message_and_the_answer_can_be_retried(app_env, db_path, torchserve):
    app_env.setenv("TORCHSERVE_URL", f"http://127.0.0.1:{free_port()}")
    at = open_app()
    assert "TorchServe is not running" in texts(at.error)  # said before the first message

    send(at, "Are you there?")
    assert "TorchServe is not running" in texts(at.error)
    assert transcript(at) == [("user", "Are you there?")]
    assert [m.content for m in ConversationStore(db_path).messages(1)] == ["Are you there?"]

    # The server is back: Retry answers the message that was kept.
    app_env.setenv("TORCHSERVE_URL", torchserve.address("inference"))
    [retry] = [b for b in at.button if b.label == "Retry"]
    retry.click().run()
    assert not at.error, texts(at.error)
    assert [m.role for m in ConversationStore(db_path).messages(1)] == ["user", "assistant"]


@pytest.mark.parametrize("key_is_right, model, says", [
    (False, "llama", "refused the inference key"),
    (True, "no-such-model", "\"no-such-model\" is not registered"),
])
def test_bad_key_and_missing_model_are_explained(app_env, torchserve, key_is_right, model, says):
    app_env.delenv("TORCHSERVE_KEY_FILE")  # no management key: the configured model is the only choice
    right_key = Keys.from_key_file(torchserve.key_file).inference
    app_env.setenv("TORCHSERVE_INFERENCE_KEY", right_key if key_is_right else "not-the-key")
    app_env.setenv("TORCHSERVE_MODEL", model)
    at = open_app()
    assert says in texts(at.error)  # said before the first message
    send(at, "Hello?")
    assert says in texts(at.error)
    assert transcript(at) == [("user", "Hello?")]
    assert any(b.label == "Retry" for b in at.button)


def test_context_use_and_dropped_messages_are_shown(app_env, db_path):
    # The server reports, with each answer, how full the context was and how many
    # old messages its rolling window left out; the app shows the latest report.
    store = ConversationStore(db_path)
    chat_ = store.create()
    for turn in range(3):
        store.add_user_message(chat_.id, f"question {turn}")
        store.add_answer(chat_.id, f"answer {turn}", total_tokens=1900 + turn, context_length=2048,
                         messages_dropped=turn * 2)
    at = open_app(query={"conversation": str(chat_.id)})
    assert at.sidebar.get("progress")[0].proto.text == "Context: 1,902 of 2,048 tokens (93%)"
    assert "the 4 oldest messages were left out" in texts(at.warning)


# ---- the logic under the app, on its own ----------------------------------------------

@pytest.fixture
def server_settings(torchserve) -> chat.ServerSettings:
    return chat.ServerSettings.from_sources(env={
        "TORCHSERVE_URL": torchserve.address("inference"),
        "TORCHSERVE_MANAGEMENT_URL": torchserve.address("management"),
        "TORCHSERVE_KEY_FILE": str(torchserve.key_file)})


def test_stopping_part_way_keeps_what_was_written(server_settings, tmp_path):
    store = ConversationStore(tmp_path / "chat.db")
    conversation = store.create()
    store.add_user_message(conversation.id, "Tell a long story about a dragon.")
    settings = chat.ChatSettings(max_tokens=400, temperature=0.0)
    messages = chat.request_messages(settings.system_prompt, store.messages(conversation.id))

    # Streamlit ends a script run by raising StopException at its next st.* call.
    with pytest.raises(StopException):
        with chat.Answer(store, conversation.id, server_settings, settings, messages) as answer:
            for n, _ in enumerate(answer.stream):
                if n == 5:
                    raise StopException()
    assert answer.wait_until_saved(timeout=0)
    saved = store.messages(conversation.id)[-1]
    assert saved.status == STOPPED and saved.content == answer.reply.text and saved.content
    assert saved.completion_tokens == 6 and not answer.reply.finished

    # The connection was closed, so the slot is free and the next answer comes at once.
    reply = chat.Reply(model="llama")
    "".join(chat.stream_reply(server_settings, chat.ChatSettings(max_tokens=4), messages, reply))
    assert reply.finish_reason == "length"


def test_health_check_says_ready_or_names_the_problem(server_settings):
    assert chat.check_health(server_settings, "llama").state == chat.READY
    assert chat.check_health(server_settings, "nope").state == chat.MISSING
    wrong_key = chat.ServerSettings(server_settings.inference_url, inference_key="wrong")
    assert chat.check_health(wrong_key, "llama").state == chat.BAD_KEY
    nobody = chat.ServerSettings(f"http://127.0.0.1:{free_port()}")
    assert chat.check_health(nobody, "llama").state == chat.DOWN


def test_models_come_from_the_server_or_the_configured_name(server_settings):
    assert chat.available_models(server_settings) == ["llama"]
    no_management = chat.ServerSettings(server_settings.inference_url, management_url=f"http://127.0.0.1:{free_port()}",
                                        management_key="k", default_model="mine")
    assert chat.available_models(no_management) == ["mine"]


def test_an_answer_waits_while_the_model_has_no_worker(server_settings, client):
    client.scale("llama", 0)
    waits = []

    def worker_back(health, pause):
        waits.append(health.state)
        if len(waits) == 1:
            threading.Thread(target=client.scale, args=("llama", 1)).start()

    try:
        assert chat.check_health(server_settings, "llama").state == chat.LOADING
        reply = chat.Reply(model="llama")
        text = "".join(chat.stream_reply(server_settings, chat.ChatSettings(max_tokens=4),
                                         [{"role": "user", "content": "hi"}], reply, on_wait=worker_back))
    finally:
        client.scale("llama", 1)
    assert waits and set(waits) == {chat.LOADING}
    assert reply.finish_reason and text == reply.text


def test_saved_settings_are_checked_before_use():
    saved = {"model": "gone", "system_prompt": "Be brief.", "temperature": 9, "top_p": "x", "max_tokens": 64.0}
    settings = chat.ChatSettings.from_saved(saved, ["llama", "other"])
    assert settings == chat.ChatSettings(model="llama", system_prompt="Be brief.", temperature=2.0, max_tokens=64)
    assert chat.ChatSettings.from_saved({"model": "other"}, ["llama", "other"]).model == "other"


def test_settings_last_across_page_loads(app_env, db_path):
    at = open_app(max_tokens=48)
    at.text_area(key="system_prompt").set_value("Answer like a pirate.").run()
    reopened = AppTest.from_file(APP, default_timeout=120).run()
    assert reopened.text_area(key="system_prompt").value == "Answer like a pirate."
    assert reopened.number_input(key="max_tokens").value == 48


def test_single_line_breaks_survive_markdown_but_code_is_untouched():
    assert chat.as_markdown("Roses are red,\nviolets blue.\n\nNew verse") == \
        "Roses are red,  \nviolets blue.\n\nNew verse"
    assert chat.as_markdown("Run:\n```\na = 1\nb = 2\n```") == "Run:  \n```\na = 1\nb = 2\n```"
