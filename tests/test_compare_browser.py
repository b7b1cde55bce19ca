"""End to end: the Compare page of `streamlit run client_app.py` in headless Chromium,
against a real TorchServe serving the default archive twice, as versions 1.0 and 2.0
with different batch settings: both answer side by side, and a saved conversation is
replayed against version 2.0.

Saves screenshots/chat_compare.png and screenshots/chat_replay.png."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from chatstack.chat_settings import DEFAULT_SYSTEM_PROMPT
from chatstack.conversations import LOCAL_USER, ConversationStore
from chatstack.model_archive import ModelSettings, package_variant
from conftest import ROOT, start_server
from test_client_app_browser import ANSWER_TIMEOUT_MS, browser, server_env, start_app  # noqa: F401 (fixtures)

SCREENSHOTS = ROOT / "screenshots"
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def two_versions(model_store):
    """A TorchServe of this module's own serving llama 1.0 (batch size 8) and llama 2.0
    (the same archive repackaged with batch size 4, batch delay 20 ms)."""
    base = Path(tempfile.mkdtemp(prefix="chatstack-compare-"))
    store = base / "model_store"
    store.mkdir()
    try:
        os.link(model_store / "llama.mar", store / "llama.mar")
    except OSError:
        shutil.copy(model_store / "llama.mar", store / "llama.mar")
    settings = ModelSettings(batch_size=4, max_batch_delay=20)
    package_variant(store, "llama.mar", "2.0", settings)
    server = start_server(store, base / "run")
    client = server.client(timeout=600)
    client.register("llama-v2.0.mar", batch_size=settings.batch_size, max_batch_delay=settings.max_batch_delay,
                    timeout=600)
    client.wait_for_workers("llama", "2.0", timeout=600)
    yield server
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


def fresh_db(tmp_path) -> Path:
    db_path = tmp_path / "chat.db"
    ConversationStore(db_path).save_settings(LOCAL_USER, {"max_tokens": MAX_TOKENS, "temperature": 0.0})
    return db_path


def open_compare(page: Page, url: str) -> Page:
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.goto(url + "compare")
    expect(page.get_by_role("heading", name="Compare models")).to_be_visible(timeout=60_000)
    return page


def choose(page: Page, label: str, option: str) -> None:
    page.get_by_label(label, exact=True).click()
    page.get_by_role("option", name=option, exact=True).click()


def columns(page: Page):
    """The two answer columns (each starts with its model's name in bold)."""
    return page.get_by_test_id("stColumn").filter(has=page.locator("strong", has_text=re.compile(r"^llama ")))


def test_two_versions_answer_side_by_side_with_their_figures(browser: Browser, start_app, two_versions, tmp_path):
    url = start_app(fresh_db(tmp_path), **server_env(two_versions))
    page = open_compare(browser.new_page(), url)
    choose(page, "Left", "llama 1.0")
    choose(page, "Right", "llama 2.0")
    page.get_by_label("Message").fill("Name three colors of the rainbow.")
    page.get_by_role("button", name="Send to both").click()

    # Both stream at once: at some moment both columns hold part of their answer, neither complete.
    samples = []
    sides = columns(page)
    expect(sides).to_have_count(2, timeout=ANSWER_TIMEOUT_MS)
    stop = page.get_by_role("button", name="Stop")
    while stop.count():
        # The first Markdown of a side is its header; the second, once there, its answer (captions are apart).
        samples.append([" ".join(sides.nth(i).get_by_test_id("stMarkdownContainer").nth(1).all_inner_texts())
                        for i in (0, 1)])
        page.wait_for_timeout(50)
    expect(page.get_by_role("button", name="Stop")).to_have_count(0, timeout=ANSWER_TIMEOUT_MS)

    sides = columns(page)
    expect(sides).to_have_count(2)
    captions = [sides.nth(i).get_by_test_id("stCaptionContainer").last.inner_text() for i in (0, 1)]
    for side, caption in zip(("llama 1.0", "llama 2.0"), captions):
        assert re.search(r"\d+ tokens · [\d.]+ tokens/s · first token after [\d,]+ ms \((server|measured here)",
                         caption), f"{side}: {caption!r}"
    texts = [sides.nth(i).get_by_test_id("stMarkdownContainer").nth(1).inner_text() for i in (0, 1)]
    assert all(len(t.split()) >= 3 for t in texts), texts
    # Each side names the version the server says answered it (the handler's model_version).
    headers = [sides.nth(i).get_by_test_id("stMarkdownContainer").first.inner_text() for i in (0, 1)]
    assert headers == ["llama 1.0 · answered by version 1.0", "llama 2.0 · answered by version 2.0"]
    both_partial = [sample for sample in samples
                    if all(0 < len(part) < len(final) for part, final in zip(sample, texts))]
    assert both_partial, f"the two answers did not stream at the same time: {samples}"
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "chat_compare.png"), full_page=True)
    # Each side's Details: the server's full account (queue wait, cache use...), as under a chat answer.
    sides.nth(1).get_by_role("button", name="Details").click()
    expect(page.get_by_role("cell", name="Queue wait")).to_be_visible()
    expect(page.get_by_role("cell", name="2.0", exact=True)).to_be_visible()


def test_replay_shows_which_turns_answer_alike(browser: Browser, start_app, two_versions, tmp_path):
    db_path = fresh_db(tmp_path)
    store = ConversationStore(db_path)
    client = two_versions.client(timeout=600)
    system = {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}  # the page's, as nothing else is saved
    # A conversation saved from version 1.0 at temperature 0, its second answer then edited by hand:
    # version 2.0 (same weights, greedy) must give the first answer again and differ on the second.
    conversation = store.create(LOCAL_USER)
    history = []
    for question in ("What is the capital of France?", "And of Italy?"):
        history.append({"role": "user", "content": question})
        store.add_user_message(LOCAL_USER, conversation.id, question)
        answer = client.chat("llama", [system, *history], version="1.0", temperature=0.0, max_tokens=MAX_TOKENS)
        text = answer["choices"][0]["message"]["content"]
        history.append({"role": "assistant", "content": text})
        store.add_answer(LOCAL_USER, conversation.id, text if question.startswith("What") else "Madrid, of course.",
                         model="llama")

    page = open_compare(browser.new_page(), start_app(db_path, **server_env(two_versions)))
    page.get_by_role("tab", name="Replay a conversation").click()
    choose(page, "Against", "llama 2.0")
    page.get_by_role("button", name="Replay").click()
    expect(page.get_by_text("1 of 2 answers identical").first).to_be_visible(timeout=ANSWER_TIMEOUT_MS)
    expect(page.get_by_text(re.compile(r"Turn 1: identical")).first).to_be_visible()
    expect(page.get_by_text(re.compile(r"Turn 2: differs from word 1 \(\d+% of the words alike\)")).first).to_be_visible()
    # The replayed answer's speed, from the server's timings (the saved answers here have none).
    expect(page.get_by_text(re.compile(r"^llama 2\.0: \d+ tokens · [\d.]+ tokens/s · first token after [\d,]+ ms "
                                       r"\(server\)$")).filter(visible=True)).to_have_count(1)
    removed = page.locator("del")
    expect(removed.first).to_contain_text("Madrid")
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "chat_replay.png"), full_page=True)
