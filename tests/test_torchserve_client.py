"""The TorchServe client and process control against a real TorchServe and the default model."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests

from chatstack.model_archive import ModelSettings
from chatstack.model_registry import register_archive, swap_settings
from chatstack.server_lifecycle import stop_server
from chatstack.torchserve_client import ModelNotFound, ServerUnreachable, TorchServeError, Unauthorized
from chatstack.torchserve_process import StartError, TorchServeProcess
from conftest import ROOT, free_port_overrides

pytestmark = pytest.mark.timeout(600)

HELLO = [{"role": "user", "content": "Say hello."}]
LONG_ANSWER = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]


@pytest.fixture(scope="module")
def own_store(session_dir, model_store):
    """A model store of this module's own: the version swap writes new archives into it."""
    store = session_dir / "client_store"
    store.mkdir(exist_ok=True)
    (store / "llama.mar").symlink_to(model_store / "llama.mar")
    return store


@pytest.fixture(scope="module")
def server(session_dir, own_store):
    """A TorchServe of this module's own, started with no model: these tests change its models."""
    process = TorchServeProcess(ROOT / "config.properties", own_store, session_dir / "client_run",
                                overrides=free_port_overrides())
    process.start()
    yield process
    process.stop()


@pytest.fixture
def own_client(server):
    return server.client(timeout=300)


def ready_workers(client, name="llama", version=None):
    return [w for e in client.describe_model(name, version) for w in e["workers"] if w["status"] == "READY"]


# ---- starting and stopping -----------------------------------------------------------------

def test_started_server_answers_ping_and_reports_its_version(own_client):
    assert own_client.ping() == "Healthy"
    assert own_client.server_version() == "0.12.0"


def test_starting_twice_says_it_is_already_running(server):
    with pytest.raises(StartError, match=r"already running \(pid \d+\)"):
        server.start()
    assert server.client().ping() == "Healthy"


def test_port_in_use_gives_a_clear_start_error(tmp_path, model_store):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        overrides = {**free_port_overrides(), "management_address": f"http://127.0.0.1:{taken.getsockname()[1]}"}
        process = TorchServeProcess(ROOT / "config.properties", model_store, tmp_path, overrides=overrides)
        with pytest.raises(StartError, match=rf"port {taken.getsockname()[1]} \(management API\) is already in use"):
            process.start()
    assert not process.is_running()


def test_missing_java_gives_a_clear_start_error(tmp_path, model_store, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    process = TorchServeProcess(ROOT / "config.properties", model_store, tmp_path, overrides=free_port_overrides())
    with pytest.raises(StartError, match="Java was not found"):
        process.start()


def test_stopping_a_stopped_server_says_it_was_not_running(tmp_path, model_store):
    process = TorchServeProcess(ROOT / "config.properties", model_store, tmp_path, overrides=free_port_overrides())
    assert process.stop() is False
    assert stop_server(process) == "TorchServe was not running"


# ---- security and errors (the shared session server) ------------------------------------------

@pytest.mark.parametrize("api", ["inference", "management"])
def test_requests_without_a_token_are_refused(torchserve, api):
    # TorchServe 0.12 refuses them with HTTP 400 InvalidKeyException (not 401).
    url = {"inference": f"{torchserve.address('inference')}/predictions/llama",
           "management": f"{torchserve.address('management')}/models"}[api]
    resp = requests.request("POST" if api == "inference" else "GET", url, json={"messages": HELLO}, timeout=30)
    assert resp.status_code in (400, 401)
    assert resp.json()["type"] == "InvalidKeyException"


def test_a_wrong_key_raises_unauthorized_with_torchserve_message(client):
    client.keys.management = "wrong-key"
    with pytest.raises(Unauthorized, match="Token Authorization failed"):
        client.list_models()


@pytest.mark.parametrize("url", ["http://example.com/llama.mar", "https://example.com/llama.mar",
                                 "file:///tmp/llama.mar"])
def test_registering_a_url_is_refused(client, url):
    with pytest.raises(TorchServeError, match="does not match any allowed URL") as refused:
        client.register(url)
    assert refused.value.status == 404


def test_errors_carry_torchserve_message(client):
    with pytest.raises(ModelNotFound) as missing:
        client.set_default_version("llama", "9.9")
    assert missing.value.message == "Model version 9.9 does not exist for model llama"
    assert missing.value.kind == "ModelVersionNotFoundException"
    with pytest.raises(TorchServeError, match="Model version 1.0 is already registered for model llama") as dup:
        client.register("llama.mar")
    assert dup.value.status == 409


def test_metrics_include_the_handler_counters(client):
    client.chat("llama", HELLO, max_tokens=8, temperature=0)
    time.sleep(1.2)  # the handler reports at most once a second, at its next call
    client.chat("llama", HELLO, max_tokens=8, temperature=0)
    totals = client.metrics()
    assert totals["llama_tokens_generated"] >= 8
    assert totals["ts_inference_requests_total"] >= 2
    reasons = {labels["Reason"] for name, labels, _ in client.metric_samples() if name == "llama_requests_finished"}
    assert reasons & {"stop", "length"}


# ---- the model lifecycle on the module's own server ----------------------------------------------

def test_registering_the_default_archive_starts_a_ready_worker(own_client, own_store):
    # Through the console's logic: the archive says maxWorkers 1, the chosen 2 must win.
    status = register_archive(own_client, own_store, "llama.mar",
                              ModelSettings(min_workers=1, max_workers=2, batch_size=4, max_batch_delay=10))
    assert "registered with 1 initial workers" in status
    entry = own_client.describe_model("llama")[0]
    assert (entry["minWorkers"], entry["maxWorkers"], entry["batchSize"], entry["maxBatchDelay"]) == (1, 2, 4, 10)
    assert len(ready_workers(own_client)) == 1
    assert own_client.chat("llama", HELLO, max_tokens=8)["choices"][0]["message"]["content"]


def test_scaling_up_and_down_changes_the_number_of_ready_workers(own_client):
    assert own_client.scale("llama", 2, 2) == "Workers scaled to 2 for model: llama"
    assert len(own_client.wait_for_workers("llama", count=2, timeout=300)) == 2
    own_client.scale("llama", 1, 1)
    deadline = time.monotonic() + 60
    while len(own_client.describe_model("llama")[0]["workers"]) != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(ready_workers(own_client)) == 1


def test_batch_size_change_keeps_a_running_chat_stream_alive(own_client, own_store):
    before = own_client.describe_model("llama")[0]
    stream_log: dict = {"chunks": [], "error": None}
    first_chunk = threading.Event()

    def chat():
        try:
            for chunk in own_client.chat_stream("llama", LONG_ANSWER, max_tokens=160, temperature=0.7):
                stream_log["chunks"].append(chunk)
                first_chunk.set()
            stream_log["finished_at"] = time.monotonic()
        except TorchServeError as e:
            stream_log["error"] = e
            first_chunk.set()

    steps: list[tuple[float, str]] = []
    talker = threading.Thread(target=chat)

    def on_step(text):
        steps.append((time.monotonic(), text))
        if text.startswith("3/5"):
            # The new version is ready but not yet the default: this chat runs on the old one.
            talker.start()
            assert first_chunk.wait(120)

    new_version = swap_settings(own_client, own_store, "llama", ModelSettings(batch_size=4, max_batch_delay=20),
                                on_step=on_step)
    talker.join(300)

    assert stream_log["error"] is None
    finish = [c["choices"][0].get("finish_reason") for c in stream_log["chunks"] if c.get("choices")]
    assert finish[-1] in ("stop", "length")
    unregistered_at = next(t for t, text in steps if text.startswith("5/5"))
    assert stream_log["finished_at"] <= unregistered_at, "the old version went away before its chat ended"
    assert [text[:3] for _, text in steps if text[1:3] == "/5"] == ["1/5", "2/5", "3/5", "4/5", "5/5"]
    now = own_client.describe_model("llama", "all")
    assert [e["modelVersion"] for e in now] == [new_version] != [before["modelVersion"]]
    assert (now[0]["batchSize"], now[0]["maxBatchDelay"]) == (4, 20)
    assert own_client.chat("llama", HELLO, max_tokens=8)["model"] == "llama"


def test_rotating_the_inference_key_retires_the_old_key(server, own_client):
    old = own_client.keys.inference
    new = own_client.rotate_key("inference")
    assert new and new != old
    assert json.loads(server.key_file.read_text())["inference"]["key"] == new
    assert own_client.ping() == "Healthy"
    own_client.keys.inference = old
    with pytest.raises(Unauthorized):
        own_client.chat("llama", HELLO, max_tokens=4)


def test_rotating_the_management_key_keeps_the_client_working(own_client):
    old = own_client.keys.management
    assert own_client.rotate_key("management") != old
    assert own_client.list_models()


def test_unregistering_removes_the_model(own_client):
    version = own_client.describe_model("llama")[0]["modelVersion"]
    assert own_client.unregister("llama", version) == 'Model "llama" unregistered'
    assert own_client.list_models() == []
    with pytest.raises(ModelNotFound, match="Model not found: llama"):
        own_client.describe_model("llama")


def test_stopping_makes_the_server_unreachable(server):
    client = server.client(timeout=5)
    assert server.stop() is True
    assert not server.is_running()
    with pytest.raises(ServerUnreachable):
        client.ping()
    assert server.stop() is False
