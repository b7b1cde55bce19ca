"""The OpenAI gateway: one base URL (…/v1) for every registered model, in front of a real TorchServe
started the way the console's Start starts it (chatstack.server_lifecycle), on the default model."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time

import openai
import psutil
import pytest
import requests

from chatstack.gateway_process import ADDRESS_PROPERTY, GatewayProcess
from chatstack.metric_names import REQUESTS_FINISHED
from chatstack.model_archive import ModelSettings
from chatstack.model_registry import swap_settings
from chatstack.openai_gateway import GatewayError, pick_model, requested_model
from chatstack.server_lifecycle import server_status, start_server, stop_server
from conftest import ROOT, TorchServeProcess, free_port, free_port_overrides

HI = [{"role": "user", "content": "Say hello in one short sentence."}]
VERSION = "x-torchserve-model-version"


# ---- the rules for `model` (no server) ----------------------------------------------------------

@pytest.mark.parametrize("requested, registered, picked", [
    ("llama", ["llama", "other"], "llama"),
    (None, ["llama"], "llama"),          # one model: `model` may be left out
])
def test_model_picks_a_registered_model(requested, registered, picked):
    assert pick_model(requested, registered) == picked


@pytest.mark.parametrize("requested, registered, status", [
    (None, ["llama", "other"], 400),     # which one?
    ("nope", ["llama"], 404),
    (None, [], 404),
])
def test_model_that_picks_nothing_is_an_error_naming_model(requested, registered, status):
    with pytest.raises(GatewayError) as e:
        pick_model(requested, registered)
    assert (e.value.status, e.value.param) == (status, "model")


@pytest.mark.parametrize("body, param", [(b"not json", None), (b"[1]", None), (b'{"model": 5}', "model"),
                                         (b'{"model": ""}', "model")])
def test_a_body_without_a_usable_model_field_is_a_400(body, param):
    with pytest.raises(GatewayError) as e:
        requested_model(body)
    assert (e.value.status, e.value.param) == (400, param)


def test_gateway_stops_when_its_torchserve_is_gone(tmp_path):
    stand_in = subprocess.Popen(["sleep", "600"])   # the pid the gateway watches
    port = free_port()
    gateway = subprocess.Popen([sys.executable, "-m", "chatstack.openai_gateway", "--listen", f"http://127.0.0.1:{port}",
                                "--inference", f"http://127.0.0.1:{free_port()}", "--key-file",
                                str(tmp_path / "key_file.json"), "--torchserve-pid", str(stand_in.pid)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                resp = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except requests.ConnectionError:
                time.sleep(0.2)
        assert resp.status_code == 502 and resp.json()["error"]["type"] == "server_error"   # no TorchServe there
        assert gateway.poll() is None
        stand_in.kill()
        stand_in.wait()
        assert gateway.wait(timeout=15) == 0
    finally:
        stand_in.kill()
        gateway.kill()


# ---- against a real TorchServe ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(session_dir, model_store):
    """TorchServe and the gateway, started by start_server, with a model store of their own
    (the swap writes a new archive into it)."""
    store = session_dir / "gateway_store"
    store.mkdir()
    shutil.copy(model_store / "llama.mar", store / "llama.mar")
    overrides = {**free_port_overrides(), ADDRESS_PROPERTY: f"http://127.0.0.1:{free_port()}"}
    process = TorchServeProcess(ROOT / "config.properties", store, session_dir / "gateway_run", overrides=overrides)
    steps: list[str] = []
    start_server(process, on_step=steps.append)
    assert any(step.startswith("OpenAI gateway on") for step in steps), steps
    yield process
    stop_server(process)


@pytest.fixture(scope="module")
def gateway(stack):
    return GatewayProcess(stack)


@pytest.fixture(scope="module")
def key(stack):
    return stack.client().keys.inference


@pytest.fixture
def client(gateway, key):
    return openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=300)


def test_gateway_runs_beside_torchserve(stack, gateway):
    status = server_status(stack)
    assert status.gateway == f"running (pid {gateway.pid()})"
    assert status.addresses["OpenAI (gateway)"] == gateway.base_url == stack.props[ADDRESS_PROPERTY] + "/v1"


def test_openai_client_chats_through_the_gateway(client):
    raw = client.chat.completions.with_raw_response.create(model="llama", messages=HI, max_tokens=16, temperature=0)
    reply = raw.parse()
    assert reply.choices[0].message.content.strip()
    assert reply.usage.completion_tokens > 0
    assert (raw.headers["x-torchserve-model"], raw.headers[VERSION]) == ("llama", "1.0")


def test_streamed_chat_passes_through_chunk_by_chunk(client):
    sent = time.monotonic()
    arrivals, text, finish = [], "", None
    for chunk in client.chat.completions.create(model="llama", messages=HI, max_tokens=48, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True}):
        arrivals.append(time.monotonic())
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert text.strip() and finish == "length"
    assert len(arrivals) >= 10
    # Buffered, every chunk would come at the end at once; passed through, they spread over the decode.
    assert arrivals[-1] - arrivals[0] > 0.3 * (arrivals[-1] - sent), "the stream came through in one piece"


def test_a_client_that_hangs_up_stops_its_generation(stack, gateway, key):
    def cancelled() -> float:
        return sum(v for name, labels, v in stack.client().metric_samples()
                   if name == REQUESTS_FINISHED and labels.get("Reason") == "cancelled")

    before = cancelled()
    resp = requests.post(f"{gateway.base_url}/chat/completions", headers={"Authorization": f"Bearer {key}"},
                         json={"model": "llama", "messages": HI, "max_tokens": 1500, "ignore_eos": True,
                               "stream": True}, stream=True, timeout=300)
    lines = resp.iter_lines()
    assert [next(lines) for _ in range(6)]
    resp.close()
    # The handler learns that a client left when TorchServe's next batch comes without it, so
    # chat on (as tests/test_faults.py does); 1500 tokens would take far longer than this.
    deadline = time.monotonic() + 60
    while cancelled() == before and time.monotonic() < deadline:
        requests.post(f"{gateway.base_url}/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": "llama", "messages": HI, "max_tokens": 2}, timeout=300)
        time.sleep(0.5)
    assert cancelled() == before + 1


def test_plain_completions_route_passes_through(gateway, key):
    resp = requests.post(f"{gateway.base_url}/completions", headers={"Authorization": f"Bearer {key}"},
                         json={"model": "llama", "prompt": "The capital of France is", "max_tokens": 4}, timeout=300)
    assert resp.status_code == 200 and resp.json()["object"] == "text_completion"


def test_models_lists_every_registered_model_and_model_picks_one(stack, client, gateway, key):
    mgmt = stack.client(timeout=600)
    assert [m.id for m in client.models.list()] == ["llama"]
    mgmt.register("llama.mar", model_name="second", initial_workers=1)
    try:
        listed = client.models.list()
        assert sorted(m.id for m in listed) == ["llama", "second"]
        assert all(m.object == "model" and m.version == "1.0" for m in listed)
        assert client.models.retrieve("second").id == "second"
        raw = client.chat.completions.with_raw_response.create(model="second", messages=HI, max_tokens=4)
        assert raw.headers["x-torchserve-model"] == "second" and raw.parse().choices[0].message.content is not None
        # Two models: a request must say which.
        resp = requests.post(f"{gateway.base_url}/chat/completions", headers={"Authorization": f"Bearer {key}"},
                             json={"messages": HI, "max_tokens": 4}, timeout=300)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "model"
        assert "llama, second" in resp.json()["error"]["message"]
    finally:
        mgmt.unregister("second")
    # One model again: `model` may be left out.
    resp = requests.post(f"{gateway.base_url}/chat/completions", headers={"Authorization": f"Bearer {key}"},
                         json={"messages": HI, "max_tokens": 4}, timeout=300)
    assert resp.status_code == 200 and resp.headers["x-torchserve-model"] == "llama"


def test_unknown_model_is_a_404_naming_model(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=HI, max_tokens=4)
    assert e.value.body["param"] == "model" and "no-such-model" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


@pytest.mark.parametrize("api_key", ["wrong-key", None])
def test_a_wrong_or_missing_key_is_a_401_and_tells_nothing(gateway, api_key):
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    for method, path, body in (("POST", "/chat/completions", {"model": "llama", "messages": HI}),
                               ("POST", "/chat/completions", {"model": "no-such-model", "messages": HI}),
                               ("POST", "/chat/completions", {"messages": HI, "stream": True}),
                               ("GET", "/models", None), ("GET", "/models/llama", None)):
        resp = requests.request(method, f"{gateway.base_url}{path}", json=body, headers=headers, timeout=60)
        assert resp.status_code == 401, (path, body, resp.text)
        assert resp.json()["error"]["type"] == "authentication_error"
    bad = openai.OpenAI(base_url=gateway.base_url, api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="llama", messages=HI, max_tokens=4)


def test_errors_from_torchserve_pass_through_with_their_status(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="llama", messages=HI, max_tokens=4, temperature=7)
    assert e.value.body["param"] == "temperature"


def test_unknown_path_is_a_json_404(gateway, key):
    resp = requests.post(f"{gateway.base_url}/embeddings", headers={"Authorization": f"Bearer {key}"},
                         json={"model": "llama", "input": "x"}, timeout=60)
    assert resp.status_code == 404 and "/v1/chat/completions" in resp.json()["error"]["message"]


def test_a_version_swap_never_shows_the_client_a_404(stack, client, key):
    # A second gateway that trusts its cache for 10 minutes: its next request after the swap goes to
    # the version that was unregistered, so it shows the resend on TorchServe's 404.
    port = free_port()
    stale = subprocess.Popen([sys.executable, "-m", "chatstack.openai_gateway", "--listen",
                              f"http://127.0.0.1:{port}", "--inference", stack.address("inference"), "--management",
                              stack.address("management"), "--key-file", str(stack.key_file), "--cache-s", "600"],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stale_client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=300)
    try:
        _wait_for_port(port)
        assert _answering_version(stale_client) == "1.0"
        answered, errors, stop = [], [], threading.Event()

        def chat_through_the_swap():
            while not stop.is_set():
                try:
                    answered.append(_answering_version(client))
                except openai.APIError as e:
                    errors.append(e)

        talker = threading.Thread(target=chat_through_the_swap)
        talker.start()
        try:
            new = swap_settings(stack.client(timeout=600), stack.model_store, "llama",
                                ModelSettings(batch_size=4, max_batch_delay=20))
            time.sleep(2)
        finally:
            stop.set()
            talker.join(300)
        assert errors == []
        assert new != "1.0" and answered[0] == "1.0" and answered[-1] == new
        assert _answering_version(stale_client) == new
    finally:
        stale.kill()
        stale.wait()


def test_stop_server_stops_the_gateway_too(stack, gateway):
    pid = gateway.pid()
    assert stop_server(stack) == "TorchServe stopped"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert gateway.pid() is None
    assert server_status(stack).gateway == "not running"


def _answering_version(client: openai.OpenAI) -> str:
    raw = client.chat.completions.with_raw_response.create(model="llama", messages=HI, max_tokens=4)
    assert raw.parse().choices[0].message is not None
    return raw.headers[VERSION]


def _wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            requests.get(f"http://127.0.0.1:{port}/", timeout=2)
            return
        except requests.ConnectionError:
            time.sleep(0.2)
    raise AssertionError(f"nothing listens on port {port}")
