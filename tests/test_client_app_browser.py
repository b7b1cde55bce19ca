"""End to end: `streamlit run client_app.py` in headless Chromium (Playwright),
chatting with the real TorchServe of the session `torchserve` fixture.

Screenshots of what a user sees are saved into screenshots/chat_*.png.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from chatstack.conversations import LOCAL_USER as U, ConversationStore
from chatstack.model_archive import ModelSettings
from chatstack.model_registry import swap_settings
from chatstack.torchserve_client import Keys
from chatstack.usage import Usage
from conftest import ROOT, free_port, start_server, start_streamlit

SCREENSHOTS = ROOT / "screenshots"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
# Generous: the test machine may be busy with other work.
ANSWER_TIMEOUT_MS = 180_000
# The default model answers this at length (greedy decoding).
LONG_ANSWER_PROMPT = "Tell a long story about a dragon who learns to fly."


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def start_app(tmp_path):
    """Start `streamlit run client_app.py` on a free port with the given settings;
    stopped at the end of the test."""
    processes = []

    def start(db_path, **env) -> str:
        clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHSERVE_", "CHAT_", "CHATSTACK_"))}
        # An empty run folder unless the test names one: a TorchServe this checkout started stays out of it.
        env = {"CHAT_DB_PATH": str(db_path), "CHATSTACK_RUN_DIR": str(tmp_path / "no_run"), **env}
        process, url = start_streamlit("client_app.py", {**clean_env, **env},
                                       tmp_path / f"streamlit-{len(processes)}.log")
        processes.append(process)
        return url

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=20)


def server_env(torchserve) -> dict:
    return {"TORCHSERVE_URL": torchserve.address("inference"),
            "TORCHSERVE_MANAGEMENT_URL": torchserve.address("management"),
            "TORCHSERVE_KEY_FILE": str(torchserve.key_file)}


def fresh_db(tmp_path, max_tokens=48):
    """A database whose saved settings keep answers short and repeatable."""
    db_path = tmp_path / "chat.db"
    ConversationStore(db_path).save_settings(U, {"max_tokens": max_tokens, "temperature": 0.0})
    return db_path


# ---- what a user does and sees ---------------------------------------------------------

def open_chat(page: Page, url: str) -> Page:
    page.set_viewport_size({"width": 1280, "height": 860})
    page.goto(url)
    expect(page.get_by_placeholder("Message the model")).to_be_enabled(timeout=60_000)
    return page


def send(page: Page, text: str) -> None:
    box = page.get_by_placeholder("Message the model")
    box.fill(text)
    box.press("Enter")


def messages(page: Page):
    return page.get_by_test_id("stChatMessage")


def answer_text(page: Page, index: int = -1) -> str:
    """The text of an assistant message, without its caption and copy control."""
    message = messages(page).nth(index if index >= 0 else messages(page).count() + index)
    # Button labels are Markdown too (the answer's Stop button comes first while it is written).
    return message.locator("[data-testid=stMarkdownContainer]:not(button [data-testid=stMarkdownContainer])"
                           ).first.inner_text()


def answer_settles_to(page: Page, expected: str, timeout_s: float = 30) -> str:
    """The last answer once Streamlit's re-render has drawn it: right after a click the page may
    still show the previous conversation's elements for a moment."""
    deadline = time.monotonic() + timeout_s
    shown = answer_text(page)
    while shown != expected and time.monotonic() < deadline:
        page.wait_for_timeout(100)
        shown = answer_text(page)
    return shown


def stop_button(page: Page):
    """The answer's own Stop button (shown while an answer is written)."""
    return page.locator(".st-key-stop_answer button")


def written_at_least(page: Page, characters: int) -> None:
    """Wait until the second message (the answer) holds this much text (its buttons' labels not counted)."""
    page.wait_for_function(
        "n => { const m = document.querySelectorAll('[data-testid=stChatMessage]'); if (m.length != 2) return false;"
        " const text = [...m[1].querySelectorAll('[data-testid=stMarkdownContainer]')]"
        "   .filter(e => !e.closest('button')).map(e => e.innerText).join('');"
        " return text.length > n; }", arg=characters, timeout=ANSWER_TIMEOUT_MS)


def wait_until_answered(page: Page) -> None:
    # The message box is disabled while the page runs (and so while an answer is written);
    # after an answer is saved the app shows it with its Regenerate button.
    expect(page.get_by_placeholder("Message the model")).to_be_enabled(timeout=ANSWER_TIMEOUT_MS)
    expect(stop_button(page)).to_have_count(0, timeout=30_000)
    expect(messages(page).last.get_by_role("button", name="Regenerate")).to_be_enabled(timeout=30_000)


def conversation_titles(page: Page) -> list[str]:
    """The conversations listed in the sidebar (their buttons have keys open-<id>)."""
    return [t.strip() for t in page.locator("[class*='st-key-open-'] button").all_inner_texts()]


def words(text: str) -> str:
    """Text without punctuation and Markdown marks, to compare what is shown with what was saved."""
    return " ".join(re.findall(r"\w+", text))


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"chat_{name}.png"))


# ---- tests ------------------------------------------------------------------------------

def test_chat_streams_survives_reload_and_keeps_conversations_apart(browser: Browser, start_app, torchserve,
                                                                      tmp_path):
    db_path = fresh_db(tmp_path, max_tokens=64)
    url = start_app(db_path, **server_env(torchserve))
    page = open_chat(browser.new_page(), url)

    send(page, "Write a short poem about the sea.")
    # The answer grows while it is generated: sample it until the run ends.
    lengths = []
    deadline = time.monotonic() + ANSWER_TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        # The message box is disabled while the page runs; the Stop button shows while the answer streams.
        running = stop_button(page).count() > 0 or page.get_by_placeholder("Message the model").is_disabled()
        if messages(page).count() == 2:
            lengths.append(len(answer_text(page)))
        if not running and lengths and lengths[-1] > 0:
            break
        page.wait_for_timeout(50)
    wait_until_answered(page)
    partial_lengths = sorted(set(n for n in lengths if n > 0))
    assert len(partial_lengths) >= 3, f"the answer did not appear piece by piece: {lengths}"

    answer = answer_text(page)
    caption = messages(page).nth(1).get_by_test_id("stCaptionContainer").inner_text()
    assert "tokens/s" in caption
    screenshot(page, "view")

    page.reload()
    expect(messages(page)).to_have_count(2, timeout=60_000)
    assert "Write a short poem about the sea." in messages(page).first.inner_text()
    assert answer_settles_to(page, answer) == answer

    page.get_by_role("button", name="New chat").click()
    expect(messages(page)).to_have_count(0)
    send(page, "What is the capital of France?")
    wait_until_answered(page)
    assert conversation_titles(page) == ["What is the capital of France?", "Write a short poem about the sea."]

    page.get_by_role("button", name="Write a short poem about the sea.").click()
    expect(messages(page).first).to_contain_text("Write a short poem about the sea.")
    assert answer_settles_to(page, answer) == answer

    page.get_by_text("Settings").click()
    max_tokens = page.get_by_label("Max answer tokens")
    expect(max_tokens).to_be_visible(timeout=30_000)
    # The sidebar is longer than the window; a rerun of the page (slow on a busy machine) can
    # scroll it back while the expander opens, so scroll until the field stays in view.
    deadline = time.monotonic() + 30
    while True:
        max_tokens.scroll_into_view_if_needed()
        page.wait_for_timeout(300)
        box, height = max_tokens.bounding_box(), page.viewport_size["height"]
        if box and 0 <= box["y"] and box["y"] + box["height"] <= height or time.monotonic() > deadline:
            break
    expect(max_tokens).to_be_in_viewport()
    page.wait_for_timeout(500)  # let the expander finish opening
    screenshot(page, "settings")


def test_stop_ends_a_long_answer_and_keeps_what_was_written(browser: Browser, start_app, torchserve, tmp_path):
    db_path = fresh_db(tmp_path, max_tokens=1000)
    url = start_app(db_path, **server_env(torchserve))
    page = open_chat(browser.new_page(), url)

    send(page, "Tell a long story about a dragon who learns to fly.")
    expect(messages(page)).to_have_count(2, timeout=ANSWER_TIMEOUT_MS)
    written_at_least(page, 40)
    stop_button(page).click()
    expect(stop_button(page)).to_have_count(0, timeout=30_000)
    # Labelled at once, on the page that stopped it.
    expect(messages(page).nth(1).get_by_test_id("stCaptionContainer")).to_contain_text("stopped", timeout=30_000)
    written = answer_text(page)
    page.wait_for_timeout(2000)
    assert answer_text(page) == written, "text kept coming after Stop"
    assert conversation_titles(page) == ["Tell a long story about a dragon who learns to…"]  # listed at once
    screenshot(page, "stopped")

    # What was written is saved, marked as stopped, and can be regenerated.
    page.reload()
    expect(messages(page)).to_have_count(2, timeout=60_000)
    kept = answer_text(page)
    assert kept.startswith(written.rstrip()[:30]) and 40 < len(kept) < 4000
    assert "stopped" in messages(page).nth(1).get_by_test_id("stCaptionContainer").inner_text()
    [conversation] = ConversationStore(db_path).list(U)
    saved = ConversationStore(db_path).messages(U, conversation.id)[-1]
    assert saved.status == "stopped" and saved.usage.completion_tokens < 1000

    # A regenerated answer has a Stop button of its own.
    page.get_by_role("button", name="Regenerate").click()
    stop = stop_button(page)
    expect(stop).to_be_visible(timeout=30_000)
    page.wait_for_timeout(1500)  # let it write a little
    stop.click()
    expect(stop).to_have_count(0, timeout=30_000)
    expect(messages(page).nth(1).get_by_test_id("stCaptionContainer").first).to_contain_text("stopped")
    expect(messages(page).nth(1)).to_contain_text("2/2")  # the first answer is kept as the other version
    store = ConversationStore(db_path)
    assert [m.status for m in store.messages(U, conversation.id)] == ["complete", "stopped"]
    assert [m.content for m in store.all_messages(U, conversation.id)][1] == saved.content


def test_two_browser_sessions_chatting_at_once_each_get_their_answer(browser: Browser, start_app, torchserve,
                                                                     tmp_path):
    db_path = fresh_db(tmp_path, max_tokens=32)
    url = start_app(db_path, **server_env(torchserve))
    alice = open_chat(browser.new_context().new_page(), url)
    bob = open_chat(browser.new_context().new_page(), url)

    send(alice, "Name a fruit that is red.")
    send(bob, "Name a planet in the solar system.")
    wait_until_answered(alice)
    wait_until_answered(bob)

    store = ConversationStore(db_path)
    conversations = {c.title: store.messages(U, c.id) for c in store.list(U)}
    assert set(conversations) == {"Name a fruit that is red.", "Name a planet in the solar system."}
    for page, question in ((alice, "Name a fruit that is red."), (bob, "Name a planet in the solar system.")):
        user, answer = conversations[question]
        assert (user.content, answer.role, answer.status) == (question, "assistant", "complete")
        assert question in messages(page).first.inner_text()
        assert words(answer_text(page)) == words(answer.content)


@pytest.mark.parametrize("problem, says", [
    ("server_down", "TorchServe is not running"),
    ("wrong_key", "TorchServe refused the inference key"),
    ("model_missing", "is not registered on TorchServe"),
])
def test_server_problems_are_explained_and_the_typed_message_is_kept(browser: Browser, start_app, torchserve,
                                                                      tmp_path, problem, says):
    right_key = Keys.from_key_file(torchserve.key_file).inference
    env = {"server_down": {"TORCHSERVE_URL": f"http://127.0.0.1:{free_port()}"},
           "wrong_key": {"TORCHSERVE_URL": torchserve.address("inference"), "TORCHSERVE_INFERENCE_KEY": "wrong"},
           "model_missing": {"TORCHSERVE_URL": torchserve.address("inference"), "TORCHSERVE_INFERENCE_KEY": right_key,
                             "TORCHSERVE_MODEL": "no-such-model"}}[problem]
    env["TORCHSERVE_MANAGEMENT_URL"] = f"http://127.0.0.1:{free_port()}"  # no management API: the configured model
    db_path = fresh_db(tmp_path)
    page = open_chat(browser.new_page(), start_app(db_path, **env))
    alert = page.get_by_test_id("stAlertContentError")
    expect(alert).to_contain_text(says, timeout=30_000)  # before the first message

    send(page, "Please keep this question safe.")
    expect(page.get_by_role("button", name="Retry")).to_be_visible(timeout=60_000)
    expect(alert.first).to_contain_text(says)
    expect(messages(page)).to_have_count(1)
    if problem == "server_down":
        screenshot(page, "server_down")

    page.reload()
    expect(messages(page).first).to_contain_text("Please keep this question safe.", timeout=60_000)
    expect(page.get_by_role("button", name="Retry")).to_be_visible()


@pytest.fixture
def own_torchserve(model_store):
    """A TorchServe of this test's own, serving llama from a model store of its own: the
    test changes the model's batch settings, which the session's server must keep.
    (Not pytest's tmp_path: a concurrent pytest run may delete it under a live server.)"""
    base = Path(tempfile.mkdtemp(prefix="chatstack-swap-"))
    store = base / "model_store"
    store.mkdir()
    try:
        os.link(model_store / "llama.mar", store / "llama.mar")
    except OSError:
        shutil.copy(model_store / "llama.mar", store / "llama.mar")
    server = start_server(store, base / "run")
    yield server
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


def test_a_chat_streaming_through_a_batch_settings_change_finishes_and_is_saved(browser: Browser, start_app,
                                                                              own_torchserve, tmp_path):
    server = own_torchserve
    db_path = fresh_db(tmp_path, max_tokens=192)
    # Nothing configured but the run folder, as after the console's Start: the app finds server and key.
    page = open_chat(browser.new_page(), start_app(db_path, CHATSTACK_RUN_DIR=str(server.run_dir)))
    expect(page.get_by_test_id("stSidebar")).to_contain_text(
        f"Server {server.address('inference')} · key from {server.key_file}")

    # The console's version swap to batch size 4: register the new settings as a new version,
    # make it the default, let the old version finish its chats, unregister it. The swap waits
    # once the new version is ready until the chat streams, so that the steps that could cut
    # a chat off happen while it streams (and no worker loads beside it: on a small CPU that
    # can push an answer past the response timeout).
    client = server.client(timeout=120)
    new_version_ready, chat_streams = threading.Event(), threading.Event()
    steps: list[tuple[float, str]] = []
    outcome: dict = {}

    def on_step(text: str) -> None:
        steps.append((time.time(), text))
        if text.startswith("3/5"):
            new_version_ready.set()
            chat_streams.wait(timeout=ANSWER_TIMEOUT_MS / 1000)

    def swap():
        try:
            outcome["version"] = swap_settings(client, server.model_store, "llama", ModelSettings(batch_size=4),
                                               on_step=on_step)
        except Exception as error:  # reported by the main thread
            outcome["error"] = error
        new_version_ready.set()

    swapping = threading.Thread(target=swap)
    swapping.start()
    assert new_version_ready.wait(timeout=600) and "error" not in outcome, outcome.get("error")

    send(page, LONG_ANSWER_PROMPT)
    written_at_least(page, 20)  # the answer is being written
    chat_streams.set()
    wait_until_answered(page)
    swapping.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")

    [conversation] = ConversationStore(db_path).list(U)
    user, answer = ConversationStore(db_path).messages(U, conversation.id)
    assert (answer.status, answer.error) == ("complete", None)
    caption = messages(page).nth(1).get_by_test_id("stCaptionContainer").inner_text()
    assert "broke off" not in caption and "stopped" not in caption
    assert words(answer_text(page)) == words(answer.content)
    expect(page.get_by_test_id("stAlertContentError")).to_have_count(0)
    # The chat was still being written when new chats went to the new version.
    [made_default_at] = [t for t, text in steps if text.startswith("4/5 New chats")]
    assert answer.created_at > made_default_at, steps
    [entry] = client.describe_model("llama", "all")
    assert (entry["modelVersion"], entry["batchSize"]) == (outcome["version"], 4)

    # The next chat goes to the new version.
    send(page, "Name a colour.")
    deadline = time.monotonic() + ANSWER_TIMEOUT_MS / 1000
    while len(saved := ConversationStore(db_path).messages(U, conversation.id)) < 4 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [(m.role, m.status) for m in saved[2:]] == [("user", "complete"), ("assistant", "complete")]


def test_edit_a_question_and_switch_between_branches(browser: Browser, start_app, torchserve, tmp_path):
    db_path = fresh_db(tmp_path, max_tokens=24)
    page = open_chat(browser.new_page(), start_app(db_path, **server_env(torchserve)))
    send(page, "Name a fruit.")
    wait_until_answered(page)
    first_answer = answer_text(page)

    # Edit the question: its popover holds the text; Send makes a new branch and answers it.
    page.get_by_role("button", name="Edit").click()
    editor = page.get_by_label("Your message")
    editor.fill("Name a vegetable.")
    page.get_by_role("button", name="Send", exact=True).click()
    expect(messages(page).first).to_contain_text("Name a vegetable.", timeout=ANSWER_TIMEOUT_MS)
    wait_until_answered(page)
    expect(messages(page).first).to_contain_text("2/2")
    store = ConversationStore(db_path)
    [conversation] = store.list(U)
    question, answer = store.messages(U, conversation.id)
    assert (question.content, question.branch) == ("Name a vegetable.", (2, 2))
    assert words(answer_text(page)) == words(answer.content)
    screenshot(page, "branches")

    # ‹ shows the first version again, with its own answer; › comes back.
    messages(page).first.get_by_role("button", name="‹").click()
    expect(messages(page).first).to_contain_text("Name a fruit.")
    expect(messages(page).first).to_contain_text("1/2")
    assert answer_settles_to(page, first_answer) == first_answer
    messages(page).first.get_by_role("button", name="›").click()
    expect(messages(page).first).to_contain_text("Name a vegetable.")
    # Every message is kept, and the selected branch is the one reopened after a reload.
    assert len(store.all_messages(U, conversation.id)) == 4
    page.reload()
    expect(messages(page).first).to_contain_text("Name a vegetable.", timeout=60_000)


def test_search_finds_a_conversation_by_its_text(browser: Browser, start_app, torchserve, tmp_path):
    db_path = fresh_db(tmp_path)
    store = ConversationStore(db_path)
    for question, answer in (("How do sailboats tack?", "They zig-zag across the wind."),
                             ("Which trains are fastest?", "Maglev trains.")):
        conversation = store.create(U)
        store.add_user_message(U, conversation.id, question)
        store.add_answer(U, conversation.id, answer)
    page = open_chat(browser.new_page(), start_app(db_path, **server_env(torchserve)))
    assert conversation_titles(page) == ["Which trains are fastest?", "How do sailboats tack?"]

    search = page.get_by_placeholder("Search conversations")
    search.fill("zig")
    search.press("Enter")
    found = page.locator("[class*='st-key-found-'] button")
    expect(found).to_have_count(1, timeout=30_000)
    expect(found).to_have_text("How do sailboats tack?")
    expect(page.get_by_test_id("stSidebar")).to_contain_text("They zig-zag across the wind.")
    screenshot(page, "search")
    found.click()
    expect(messages(page).first).to_contain_text("How do sailboats tack?")
    expect(messages(page).nth(1)).to_contain_text("They zig-zag across the wind.")


def test_summarise_and_continue_when_the_context_is_nearly_full(browser: Browser, start_app, torchserve, tmp_path):
    db_path = fresh_db(tmp_path, max_tokens=48)
    store = ConversationStore(db_path)
    conversation = store.create(U)
    turns = [("My cat is called Pixel.", "What a nice name for a cat."),
             ("She is three years old.", "Three is a lovely age for a cat."),
             ("What should I feed her?", "Good cat food, fresh water, and not too many treats.")]
    for n, (question, answer) in enumerate(turns):
        store.add_user_message(U, conversation.id, question)
        store.add_answer(U, conversation.id, answer, usage=Usage(total_tokens=1600 + 50 * n, context_length=2048))
    page = open_chat(browser.new_page(), start_app(db_path, **server_env(torchserve)) + f"?conversation={conversation.id}")
    expect(page.get_by_text("fills 83% of the model's context").first).to_be_visible(timeout=60_000)

    page.get_by_role("button", name="Summarise and continue").click()
    expect(messages(page).first).to_contain_text("Summary of the earlier conversation:", timeout=ANSWER_TIMEOUT_MS)
    expect(messages(page)).to_have_count(3)
    expect(messages(page).nth(1)).to_contain_text("What should I feed her?")
    expect(messages(page).first).to_contain_text("2/2")
    summary, question, answer = store.messages(U, conversation.id)
    assert summary.parent_id is None and (question.content, answer.content) == turns[-1]
    screenshot(page, "summarise")

    # The next question goes on from the summary; the originals are one click away.
    send(page, "And how often should she eat?")
    wait_until_answered(page)
    assert [m.content for m in store.messages(U, conversation.id)][:4] == \
        [summary.content, turns[-1][0], turns[-1][1], "And how often should she eat?"]
    messages(page).first.get_by_role("button", name="‹").click()
    expect(messages(page).first).to_contain_text("My cat is called Pixel.")
    expect(messages(page)).to_have_count(6)


def test_attach_a_text_file_see_its_tokens_and_send_it(browser: Browser, start_app, torchserve, tmp_path):
    db_path = fresh_db(tmp_path, max_tokens=24)
    page = open_chat(browser.new_page(), start_app(db_path, **server_env(torchserve)))
    notes = tmp_path / "notes.md"
    notes.write_text("# Shopping\n- apples\n- bread\n")
    huge = tmp_path / "huge.txt"
    huge.write_text("word " * 4000)  # 20,000 characters: about 5,000 tokens, more than the context

    page.get_by_role("button", name="Attach text files").click()
    page.locator("input[type=file]").set_input_files(str(huge))
    refusal = page.get_by_test_id("stAlertContentError")
    expect(refusal).to_contain_text("Too large for the context", timeout=30_000)
    expect(refusal).to_contain_text("the model's context is 2,048 tokens")
    screenshot(page, "attachment_refused")

    page.get_by_role("button", name="Remove huge.txt").click()
    page.locator("input[type=file]").set_input_files(str(notes))
    expect(page.get_by_text("notes.md ≈").first).to_be_visible(timeout=30_000)
    expect(refusal).to_have_count(0)
    page.keyboard.press("Escape")
    send(page, "What is on this list?")
    wait_until_answered(page)
    [conversation] = ConversationStore(db_path).list(U)
    question = ConversationStore(db_path).messages(U, conversation.id)[0]
    assert question.content.startswith("What is on this list?\n\nFile notes.md:\n```markdown\n# Shopping")
    expect(messages(page).first).to_contain_text("apples")
