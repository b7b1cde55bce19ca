"""End to end, the console's measuring views: headless Chromium drives `streamlit run server_app.py`
against a real TorchServe serving the default model.

In order, in one tab: the capacity view (Status) shows a generating slot while a chat streams;
the latency distributions (Metrics) chart p50/p95 after known chats; a short tune (Tuning: two
batch sizes, two loads) draws its chart, survives a reload, and applies its recommendation
while a chat in flight finishes. Screenshots: screenshots/server_capacity.png,
server_latency.png, server_tune.png.
"""

from __future__ import annotations

import os
import re
import threading
import time

import pytest
from playwright.sync_api import expect, sync_playwright

from chatstack.batch_tuning import VERSION_PREFIX, latest_run, results_folder
from chatstack.console_config import ConsoleConfig
from conftest import ROOT, free_port, start_streamlit

pytestmark = pytest.mark.timeout(900)

SCREENSHOTS = ROOT / "screenshots"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
SLOW_MS = 240_000
TUNE_MS = 480_000   # the short tune: about a minute alone, several on a machine shared with other test runs
expect.set_options(timeout=60_000)
LONG_CHAT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]


@pytest.fixture(scope="module")
def console_env(session_dir, model_store):
    store = session_dir / "measure_store"
    store.mkdir()
    (store / "llama.mar").symlink_to(model_store / "llama.mar")
    return {"CHATSTACK_MODEL_STORE": str(store), "CHATSTACK_RUN_DIR": str(session_dir / "measure_run"),
            "CHATSTACK_PORTS": ",".join(str(free_port()) for _ in range(6))}


@pytest.fixture(scope="module")
def server(console_env):
    """The console's TorchServe, started and registered as the Server and Models pages do."""
    process = ConsoleConfig.from_env(console_env).process()
    process.start()
    process.client(timeout=300).register("llama.mar")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def console_url(console_env, server, session_dir):
    app, url = start_streamlit("server_app.py", {**os.environ, **console_env}, session_dir / "measure_streamlit.log")
    url = url.rstrip("/")
    yield url
    app.terminate()
    app.wait(timeout=30)


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
    page.get_by_test_id("stSidebarNav").get_by_role("link", name=name).click()
    expect(page).to_have_url(re.compile(f"/{name.lower()}$"))
    return page.get_by_test_id("stMain")


def shoot(page, name, height=None):
    """A screenshot of the page; `height`: a taller window for it (Streamlit's main area scrolls
    inside the window, so a full-page shot holds only what the window shows)."""
    if height:
        page.set_viewport_size({"width": 1400, "height": height})
    page.wait_for_timeout(1000)  # let charts and tables finish drawing
    page.screenshot(path=str(SCREENSHOTS / f"server_{name}.png"), full_page=True)
    if height:
        page.set_viewport_size({"width": 1400, "height": 1400})


class ChatInFlight:
    """A streaming chat in a thread: its chunks, how it ended, and any error."""

    def __init__(self, client, max_tokens=400, version=None):
        self.chunks, self.finish_reason, self.error = [], None, None
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(client, max_tokens, version), daemon=True)
        self.thread.start()

    def stop(self):
        """Close the stream (which stops its generation) and wait for the thread."""
        self.stopped.set()
        self.thread.join(timeout=60)

    def _run(self, client, max_tokens, version):
        try:
            for chunk in client.chat_stream("llama", LONG_CHAT, version=version, max_tokens=max_tokens,
                                            temperature=0, ignore_eos=True):
                if self.stopped.is_set():
                    return
                self.chunks.append(chunk)
                for choice in chunk.get("choices") or []:
                    self.finish_reason = choice.get("finish_reason") or self.finish_reason
        except Exception as e:  # noqa: BLE001 - the test asserts on it
            self.error = e

    def wait_for_tokens(self, n=3, timeout=120):
        deadline = time.monotonic() + timeout
        while len(self.chunks) < n and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.chunks) >= n, f"the chat streamed {len(self.chunks)} chunks ({self.error})"


def test_capacity_view_shows_a_generating_slot_while_a_chat_streams(page, server):
    chat = ChatInFlight(server.client(timeout=300), max_tokens=1500)
    chat.wait_for_tokens()
    panel = open_page(page, "Status")
    # The view refreshes itself (15 s by default); the slot table names each slot's state.
    expect(panel.get_by_text("generating", exact=True).first).to_be_visible(timeout=SLOW_MS)
    expect(panel.get_by_text(re.compile(r": 1 generating")).first).to_be_visible()
    shoot(page, "capacity")
    chat.stop()   # long enough to be seen on a busy machine; no need to wait for its end
    assert chat.error is None


def test_latency_view_charts_percentiles_of_known_chats(page, server):
    client = server.client(timeout=300)
    for _ in range(3):
        client.chat("llama", [{"role": "user", "content": "Name a fruit."}], max_tokens=12)
    panel = open_page(page, "Metrics")
    expect(panel.get_by_text("TTFT p50 / p95 (ms)").first).to_be_visible()
    # The console samples /metrics every 5 s: the chats show within a sample or two.
    expect(panel.get_by_test_id("stMetricValue").filter(has_text=re.compile(r"^[\d,]+ / [\d,]+$")).first) \
        .to_be_visible(timeout=SLOW_MS)
    expect(panel.get_by_text("None", exact=True)).to_have_count(0)
    shoot(page, "latency", height=2000)


def remove_choices(panel, label, values):
    box = panel.get_by_test_id("stMultiSelect").filter(has_text=label)
    for value in values:
        box.get_by_role("button", name=f"Remove {value}").click()
        expect(box.get_by_role("button", name=f"Remove {value}")).to_have_count(0)


def test_a_short_tune_charts_its_settings_and_applies_the_recommendation_while_a_chat_finishes(
        page, server, console_env):
    # While a chat streams on the model, tuning waits for the operator's word.
    # It runs to its end: a worker whose stream was closed by the client may keep reporting the slot busy.
    chat = ChatInFlight(server.client(timeout=300), max_tokens=300)
    chat.wait_for_tokens()
    page.wait_for_timeout(1500)   # the handler reports its slots at most once a second
    panel = open_page(page, "Tuning")
    expect(panel.get_by_text(re.compile(r"chat\(s\) are in flight on llama now")).first).to_be_visible()
    expect(panel.get_by_role("button", name="Start tuning")).to_be_disabled()
    chat.thread.join(timeout=300)
    assert chat.error is None and chat.finish_reason == "length"

    remove_choices(panel, "Batch sizes", [8, 16])          # batch sizes 1 and 4 (each removal reruns the page)
    remove_choices(panel, "Chats at once", [8])            # loads of 1 and 4 chats
    panel.get_by_role("spinbutton", name="Tokens per answer").fill("16")
    # About a minute on this machine alone; the limit leaves room for other test runs sharing its two cores.
    panel.get_by_role("spinbutton", name="Time limit per load (s)").fill("90")
    panel.get_by_role("spinbutton", name="Time limit per load (s)").press("Enter")
    expect(panel.get_by_text(re.compile(r"2 setting\(s\) × 2 load\(s\): about .*, at most")).first).to_be_visible()
    expect(panel.get_by_text(re.compile(r"are in flight on llama now"))).to_have_count(0)   # the chat is over
    panel.get_by_role("button", name="Start tuning").click()
    expect(panel.get_by_test_id("stProgress")).to_be_visible()
    started = time.monotonic()
    expect(panel.get_by_text("Last run").first).to_be_visible(timeout=TUNE_MS)
    print(f"the tune took {time.monotonic() - started:.0f} s")

    # Saved as JSON and CSV in the run folder, and shown again after a reload.
    process = server
    saved = sorted(p.suffix for p in results_folder(process.run_dir).iterdir())
    assert saved == [".csv", ".json"]
    print(next(results_folder(process.run_dir).glob("*.csv")).read_text())
    run = latest_run(process.run_dir, "llama")
    assert run.state == "done" and [(r.batch_size, r.concurrency) for r in run.rows] == [(1, 1), (1, 4), (4, 1), (4, 4)]
    assert all(r.ok == r.requests == r.concurrency and r.tokens_per_s > 0 for r in run.rows), run.rows
    page.reload()
    panel = page.get_by_test_id("stMain")
    expect(panel.get_by_text("Last run").first).to_be_visible()
    panel.get_by_role("spinbutton", name="TTFT limit (p95, s)").fill("30")
    panel.get_by_role("spinbutton", name="TTFT limit (p95, s)").press("Enter")
    expect(panel.get_by_test_id("stVegaLiteChart")).to_have_count(2)
    table = panel.get_by_test_id("stDataFrame").last
    expect(table).to_be_visible()
    expect(panel.get_by_text(re.compile("Recommended for TTFT p95")).first).to_be_visible()
    shoot(page, "tune", height=2600)

    # The candidates are gone: registered versions and archive copies.
    client = process.client(timeout=300)
    assert not [e for e in client.describe_model("llama", "all") if e["modelVersion"].startswith(VERSION_PREFIX)]
    assert not list(process.model_store.glob(f"*{VERSION_PREFIX}*"))

    # Apply while a chat streams on the serving version: the chat finishes, the new version serves.
    chat = ChatInFlight(client, max_tokens=300)
    chat.wait_for_tokens()
    panel.get_by_role("button", name=re.compile(r"^Apply batch \d+ ×")).click()
    # The swap waits for the chat to finish (step 4/5): at 4 tokens/s on a busy machine that is minutes.
    expect(page.get_by_test_id("stAlertContentSuccess").filter(has_text="Now serving version")).to_be_visible(
        timeout=TUNE_MS)
    chat.thread.join(timeout=300)
    assert chat.error is None and chat.finish_reason == "length", chat.error
    serving = client.describe_model("llama")[0]
    assert serving["batchSize"] in (1, 4) and serving["modelVersion"] != "1.0"
