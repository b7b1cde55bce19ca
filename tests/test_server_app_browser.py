"""End to end: headless Chromium drives `streamlit run server_app.py`, which runs a real TorchServe.

The tests run in order in one browser tab, going from page to page through the sidebar:
start -> register -> add the default GGUF again as a new model, chat with it -> a bad file
refused -> metrics -> scale to 2 -> keys -> logs -> stop.
Each saves a screenshot of its page into screenshots/server_*.png.
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest
from playwright.sync_api import expect, sync_playwright

from chatstack.console_config import ConsoleConfig
from conftest import ROOT, free_port, start_streamlit

pytestmark = pytest.mark.timeout(600)

SCREENSHOTS = ROOT / "screenshots"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
SLOW_MS = 240_000  # TorchServe start-up and worker loading on a busy 2-core machine
expect.set_options(timeout=60_000)  # a script run takes seconds when the machine is busy


@pytest.fixture(scope="module")
def console_env(session_dir, model_store, default_gguf):
    store = session_dir / "browser_store"
    store.mkdir()
    (store / "llama.mar").symlink_to(model_store / "llama.mar")
    uploads = session_dir / "browser_models"   # a second model folder, holding a file that is no model
    uploads.mkdir()
    (uploads / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(8))
    return {"CHATSTACK_MODEL_STORE": str(store), "CHATSTACK_RUN_DIR": str(session_dir / "browser_run"),
            "CHATSTACK_PORTS": ",".join(str(free_port()) for _ in range(6)),
            "CHATSTACK_MODEL_FOLDERS": f"{default_gguf.parent}:{uploads}"}


@pytest.fixture(scope="module")
def console_url(console_env, session_dir):
    app, url = start_streamlit("server_app.py", {**os.environ, **console_env}, session_dir / "streamlit.log")
    url = url.rstrip("/")
    yield url
    app.terminate()
    app.wait(timeout=30)
    ConsoleConfig.from_env(console_env).process().stop()  # whatever a failed test left running


@pytest.fixture(scope="module")
def page(console_url):
    SCREENSHOTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        page.set_default_timeout(60_000)
        page.goto(console_url)
        expect(page.get_by_role("heading", name="TorchServe admin console")).to_be_visible()
        yield page
        browser.close()


def open_page(page, name):
    """Go to a console page through the sidebar; returns the page's main area."""
    page.get_by_test_id("stSidebarNav").get_by_role("link", name=name).click()
    expect(page).to_have_url(re.compile("/$" if name == "Server" else f"/{name.lower()}$"))
    return page.get_by_test_id("stMain")


def expect_success(page, text, timeout=SLOW_MS):
    """The outcome message the console shows after an action (its steps repeat the text)."""
    expect(page.get_by_test_id("stAlertContentSuccess")).to_contain_text(text, timeout=timeout)


def shoot(page, name):
    page.wait_for_timeout(500)  # let charts and tables finish drawing
    page.screenshot(path=str(SCREENSHOTS / f"server_{name}.png"), full_page=True)


def test_starting_from_the_page_shows_a_running_healthy_server(page):
    panel = open_page(page, "Server")
    expect(panel.get_by_text("Stopped", exact=True).first).to_be_visible()
    # Registration is left to the Models view, the way a user picks settings.
    panel.get_by_text("Register the default model").click()
    panel.get_by_role("button", name="Start TorchServe").click()
    expect_success(page, "TorchServe is running")
    panel = open_page(page, "Server")
    expect(panel.get_by_text("Healthy", exact=True).first).to_be_visible()  # a rerun may draw it twice for a moment
    expect(panel.get_by_text("0.12.0", exact=True).first).to_be_visible()
    shoot(page, "server")


def test_registering_the_default_model_shows_it_registered(page):
    panel = open_page(page, "Models")
    expect(panel.get_by_text("No model is registered.").first).to_be_visible()
    panel.get_by_role("button", name="Register", exact=True).click()
    expect_success(page, 'Model "llama" Version: 1.0 registered with 1 initial workers')
    panel = open_page(page, "Models")
    expect(panel.get_by_text("No model is registered.")).to_have_count(0)
    shoot(page, "models")


def test_adding_the_default_gguf_again_as_a_new_model_lets_one_chat_with_it(page, console_env, default_gguf):
    panel = open_page(page, "Models")
    form = panel.get_by_test_id("stForm").filter(has_text="Package and register")
    form.get_by_role("combobox", name="Model file").click()
    page.get_by_role("option", name=str(default_gguf)).click()
    form.get_by_label("Name", exact=True).fill("smol-again")
    form.get_by_label("Context per chat (tokens)").fill("1024")
    form.get_by_label("Slots (chats at once per worker)").fill("3")
    form.get_by_role("button", name="Package and register").click()
    # the progress bar and the packaging log show while it works
    expect(page.get_by_test_id("stProgress")).to_be_visible(timeout=SLOW_MS)
    expect_success(page, 'Model "smol-again" Version: 1.0 registered with 1 initial workers')
    shoot(page, "add_model")
    client = ConsoleConfig.from_env(console_env).process().client(timeout=300)
    try:
        assert client.describe_model("smol-again")[0]["batchSize"] == 3
        answer = client.chat("smol-again", [{"role": "user", "content": "Name a colour."}], max_tokens=8)
        assert answer["usage"]["completion_tokens"] >= 1 and answer["choices"][0]["message"]["content"]
        panel = open_page(page, "Models")
        # .first: while the page reruns, the previous run's expander may still be drawn for a moment
        expect(panel.get_by_text("Packaging log of the last model added").first).to_be_visible()
    finally:
        client.unregister("smol-again")   # the views that follow count the default model's workers only


def test_a_file_that_is_not_a_gguf_is_refused_with_the_reason(page, session_dir):
    panel = open_page(page, "Models")
    form = panel.get_by_test_id("stForm").filter(has_text="Package and register")
    form.get_by_role("textbox", name="…or its path on the server").fill(str(session_dir / "browser_models" / "broken.gguf"))
    form.get_by_label("Name", exact=True).fill("broken")
    form.get_by_role("button", name="Package and register").click()
    expect(page.get_by_test_id("stAlertContentError")).to_contain_text(
        "broken.gguf is not a GGUF file llama.cpp can read: it is truncated", timeout=SLOW_MS)
    assert not (session_dir / "browser_store" / "broken.mar").exists()


def test_metrics_view_shows_generated_tokens(page, console_env):
    client = ConsoleConfig.from_env(console_env).process().client(timeout=120)
    for _ in range(2):
        client.chat("llama", [{"role": "user", "content": "Tell me about bread."}], max_tokens=24)
        time.sleep(1.5)  # the handler publishes its counters at most once a second
    panel = open_page(page, "Metrics")
    expect(panel.get_by_text("Tokens generated").first).to_be_visible()
    expect(panel.get_by_text("Charts appear after the next refresh.")).to_have_count(0, timeout=30_000)
    page.wait_for_timeout(16_000)  # one more refresh (15 s by default), so the charts hold a few points
    shoot(page, "metrics")


def test_scaling_to_two_workers_shows_two_ready_workers(page):
    panel = open_page(page, "Tuning")
    for label in ("Max workers", "Min workers"):
        panel.get_by_label(label).fill("2")
    panel.get_by_role("button", name="Scale workers").click()
    expect_success(page, "Workers scaled to 2 for model: llama")
    shoot(page, "tuning")
    panel = open_page(page, "Status")
    expect(panel.get_by_text("2 READY of 2").first).to_be_visible(timeout=SLOW_MS)  # the view refreshes itself
    shoot(page, "status")


def test_security_view_masks_the_inference_key(page, console_env):
    key_file = ConsoleConfig.from_env(console_env).process().key_file
    key = json.loads(key_file.read_text())["inference"]["key"]
    panel = open_page(page, "Security")
    field = panel.get_by_label("Inference key (give this to chat clients)")
    expect(field).to_have_value("••••••••")
    shoot(page, "security")
    panel.get_by_text("Show the inference key").click()
    # While Streamlit re-renders, the masked field and the revealed one can both be on the page
    # for a moment; the revealed one is drawn last.
    expect(panel.get_by_label("Inference key (give this to chat clients)").last).to_have_value(key, timeout=SLOW_MS)
    expect(page).to_have_url(re.compile("/security$"))  # the rerun kept the page


def test_logs_view_shows_the_new_models_worker_lines_newest_first(page):
    panel = open_page(page, "Logs")
    expect(panel.get_by_text(re.compile(r"^\d+ entr(y|ies)")).first).to_be_visible()
    panel.get_by_role("combobox", name="Model", exact=True).click()
    page.get_by_role("option", name="smol-again", exact=True).click()
    box = panel.get_by_role("textbox", name="Lines holding (any case; a request id works too)")
    box.fill("n_ctx_per_slot=1024")   # its worker's load line: the context chosen when it was added
    box.press("Enter")
    expect(panel.get_by_text("1 entry", exact=True).first).to_be_visible()
    box.fill("")
    box.press("Enter")
    expect(panel.get_by_text("1 entry", exact=True)).to_have_count(0)
    shoot(page, "logs")


def test_stopping_from_the_page_shows_the_server_stopped(page, console_env):
    panel = open_page(page, "Server")
    panel.get_by_role("button", name="Stop TorchServe").click()
    expect_success(page, "TorchServe stopped")
    panel = open_page(page, "Server")
    expect(panel.get_by_text("Stopped", exact=True).first).to_be_visible()
    assert not ConsoleConfig.from_env(console_env).process().is_running()
    shoot(page, "stopped")
