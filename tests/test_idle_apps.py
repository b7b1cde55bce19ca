"""An open, idle page of either app costs (almost) no CPU while TorchServe serves chats.

The apps are started as the README says (`streamlit run server_app.py`, `streamlit run
client_app.py` from the repository root, no extra flags), so the shipped
.streamlit/config.toml is what is tested: with Streamlit's file watcher on, an open page
kept a core busy and made every answer 30x slower.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from urllib.parse import urlparse

import psutil
import pytest
import requests
from playwright.sync_api import sync_playwright

from conftest import ROOT, free_port

IDLE_S = 30
MAX_CORE_SHARE = 0.05   # "a few percent of a core"


def start_streamlit(script: str, env: dict, log_path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(log_path, "wb")
    app = subprocess.Popen([str(ROOT / ".venv" / "bin" / "streamlit"), "run", script, "--server.port", str(port)],
                           cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "_stcore/health", timeout=1).text == "ok":
                return app, url
        except requests.RequestException:
            pass
        assert app.poll() is None, open(log_path).read()
        time.sleep(0.3)
    raise AssertionError(f"{script} did not start within 60 s")


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children (Streamlit runs the script in threads, but
    a file watcher or a child would count too)."""
    proc = psutil.Process(pid)
    total = sum(proc.cpu_times()[:2])
    for child in proc.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


@pytest.fixture
def apps_env(torchserve):
    addr = {kind: torchserve.address(kind) for kind in ("inference", "management", "metrics")}
    ports = ",".join(str(urlparse(a).port) for a in addr.values())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHSERVE_", "CHAT", "STREAMLIT_"))}
    return {**env, "CHATSTACK_RUN_DIR": str(torchserve.run_dir), "CHATSTACK_PORTS": ports,
            "CHATSTACK_MODEL_STORE": str(torchserve.model_store),
            "TORCHSERVE_URL": addr["inference"], "TORCHSERVE_MANAGEMENT_URL": addr["management"],
            "TORCHSERVE_KEY_FILE": str(torchserve.key_file)}


def test_open_idle_pages_use_no_cpu_while_torchserve_serves_chats(apps_env, client, tmp_path):
    apps = [start_streamlit(script, {**apps_env, "CHAT_DB_PATH": str(tmp_path / "chat.db")},
                            tmp_path / f"{script}.log")
            for script in ("server_app.py", "client_app.py")]
    chats_done = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            console_url, client_url = (url for _, url in apps)
            # The console's landing page and its live pages (they refresh on a timer), and the chat page.
            for url in (console_url, console_url + "status", console_url + "metrics", client_url):
                page = browser.new_page()
                page.goto(url)
                page.wait_for_selector("[data-testid='stApp']", timeout=60_000)
                page.wait_for_timeout(5_000)   # the first render and its server calls are over
            stop = threading.Event()

            def chat_until_stopped():
                while not stop.is_set():
                    client.chat("llama", [{"role": "user", "content": "Name a color."}], max_tokens=24)
                    chats_done.append(1)

            chatter = threading.Thread(target=chat_until_stopped)
            before = {app.pid: cpu_seconds(app.pid) for app, _ in apps}
            chatter.start()
            time.sleep(IDLE_S)
            after = {app.pid: cpu_seconds(app.pid) for app, _ in apps}
            stop.set()
            chatter.join(timeout=120)
            browser.close()
    finally:
        for app, _ in apps:
            app.terminate()
            app.wait(timeout=20)
    assert chats_done, "TorchServe answered no chat during the idle period"
    for (app, url), script in zip(apps, ("server_app.py", "client_app.py")):
        share = (after[app.pid] - before[app.pid]) / IDLE_S
        print(f"{script}: {share:.1%} of a core while its pages sat idle")
        assert share < MAX_CORE_SHARE, f"{script} used {share:.0%} of a core while its pages sat idle"
