"""End to end: the Export and import page of `streamlit run client_app.py` in headless
Chromium. A conversation with two branches is downloaded as JSON from one app, uploaded
into a second app on a fresh database, and reads the same there, branches and the
server's figures included; a hostile file is refused and changes nothing.

Saves screenshots/chat_export_import.png."""

from __future__ import annotations

import json

from playwright.sync_api import Browser, Page, expect

from chatstack.conversation_transfer import MAX_IMPORT_BYTES, export_json
from chatstack.conversations import LOCAL_USER, ConversationStore
from chatstack.usage import Usage
from conftest import ROOT
from test_client_app_browser import browser, server_env, start_app  # noqa: F401 (fixtures)
from test_conversation_transfer import NOW, renumbered

SCREENSHOTS = ROOT / "screenshots"
DETAILS = {"prompt_n": 41, "cache_n": 0, "ttft_ms": 120.0, "predicted_n": 12, "predicted_per_second": 25.0,
           "queue_ms": 0.8, "model_version": "1.0", "finish_reason": "stop"}


def saved_conversation(db_path) -> ConversationStore:
    """A conversation whose answer was regenerated (two branches), the second one shown."""
    store = ConversationStore(db_path)
    conversation = store.create(LOCAL_USER)
    question = store.add_user_message(LOCAL_USER, conversation.id, "Name a large ocean.")
    store.add_answer(LOCAL_USER, conversation.id, "The Atlantic Ocean.", model="llama", details=DETAILS,
                     usage=Usage(prompt_tokens=41, completion_tokens=5, total_tokens=46, context_length=2048))
    store.add_answer(LOCAL_USER, conversation.id, "The Pacific Ocean, the largest of all.", model="llama",
                     details=DETAILS, parent_id=question.id,
                     usage=Usage(prompt_tokens=41, completion_tokens=12, total_tokens=53, context_length=2048))
    other = store.create(LOCAL_USER)
    store.add_user_message(LOCAL_USER, other.id, "Another chat, not exported.")
    return store


def open_transfer(page: Page, url: str) -> Page:
    page.set_viewport_size({"width": 1280, "height": 900})
    page.goto(url + "transfer")
    expect(page.get_by_role("heading", name="Export and import")).to_be_visible(timeout=60_000)
    return page


def test_export_then_import_into_a_fresh_database_gives_the_same_conversation(browser: Browser, start_app, torchserve,
                                                                            tmp_path):
    source = saved_conversation(tmp_path / "source.db")
    page = open_transfer(browser.new_page(), start_app(tmp_path / "source.db", **server_env(torchserve)))
    page.get_by_label("Conversations").click()
    page.get_by_role("option", name="Name a large ocean.").click()
    with page.expect_download() as download:
        page.get_by_role("button", name="Download JSON").click()
    exported = tmp_path / download.value.suggested_filename
    download.value.save_as(exported)
    assert exported.name.startswith("name-a-large-ocean-") and exported.suffix == ".json"
    assert [c["title"] for c in json.loads(exported.read_text())["conversations"]] == ["Name a large ocean."]

    target_db = tmp_path / "target.db"
    url = start_app(target_db, **server_env(torchserve))
    page = open_transfer(browser.new_page(), url)
    # A hostile file first: refused, saying why, and nothing is saved.
    hostile = tmp_path / "hostile.json"
    hostile.write_text(json.dumps([{"role": "tool", "content": "rm -rf /"}]))
    page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files(hostile)
    expect(page.get_by_text("This file cannot be imported: messages[0].role: 'tool' is not a role").first).to_be_visible()
    expect(page.get_by_role("button", name="Import", exact=True)).to_have_count(0)
    assert ConversationStore(target_db).list(LOCAL_USER) == []
    # A file over the import limit is turned away before it is uploaded.
    huge = tmp_path / "huge.json"
    huge.write_bytes(b"[" + b" " * MAX_IMPORT_BYTES + b"]")
    page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files(huge)
    expect(page.get_by_test_id("stFileUploader")).to_contain_text("20.0MB or smaller")
    expect(page.get_by_role("button", name="Import", exact=True)).to_have_count(0)

    page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files(exported)
    expect(page.get_by_text(f"{exported.name}: 1 conversation with 3 messages (chatstack JSON).").first).to_be_visible()
    page.get_by_role("button", name="Import", exact=True).click()
    expect(page.get_by_text("Imported 1 conversation: Name a large ocean.").first).to_be_visible(timeout=30_000)
    expect(page.get_by_role("button", name="Download JSON")).to_be_visible()  # the run after the import has ended
    expect(page.get_by_test_id("stSkeleton")).to_have_count(0)
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "chat_export_import.png"), full_page=True)

    # Everything came across: every branch and field, the shown path.
    target = ConversationStore(target_db)
    [imported] = target.list(LOCAL_USER)
    original = next(c for c in source.list(LOCAL_USER) if c.title == "Name a large ocean.")
    assert renumbered(export_json(target, LOCAL_USER, now=NOW))["conversations"] == \
        renumbered(export_json(source, LOCAL_USER, [original.id], now=NOW))["conversations"]

    # And the chat page shows it as it was: the second answer of two, with the server's figures.
    page.goto(url)
    page.locator(f".st-key-open-{imported.id} button").click()
    chat = page.get_by_test_id("stChatMessage")
    expect(chat).to_have_count(2, timeout=30_000)
    expect(chat.nth(0)).to_contain_text("Name a large ocean.")
    expect(chat.nth(1)).to_contain_text("The Pacific Ocean, the largest of all.")
    expect(chat.nth(1)).to_contain_text("2/2")
    chat.nth(1).get_by_role("button", name="Details").click()
    expect(page.get_by_text("Model version").first).to_be_visible()
    expect(page.get_by_role("cell", name="25.0 tokens/s")).to_be_visible()
