"""The KServe storage layout, served for real the way the ServingRuntime starts it.

The layout is written by `package_llama.sh --kserve` (with the pod's model config). TorchServe is
started with the command line, environment and working directory read from
deploy/kserve/servingruntime.yaml; the pod's paths are mapped to the test's folders, as the
container's mounts would: /mnt/models -> a folder holding the layout, /tmp and the working
directory -> the test's scratch folders. Each server gets its own copy of config/ with free
ports (two pods have two IP addresses; two servers here need two sets of ports); the model store
is the one layout's, shared.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml
from openai import OpenAI

from chatstack.torchserve_client import TorchServeClient
from conftest import ROOT
from deploy.kserve_pod import MOUNT, PodServer, runtime_container
from chatstack.torchserve_process import read_properties

CPU_CONFIG = ROOT / "deploy" / "kserve" / "model-config-cpu.yaml"
TURNS = ["Name one planet of the solar system.", "Why is it called that?", "Say it in one short sentence."]
MAX_TOKENS = 24

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def layout(tmp_path_factory, default_gguf) -> Path:
    base = tmp_path_factory.mktemp("kserve")
    (base / "tmp").mkdir()
    # a TMPDIR of its own: torch-model-archiver stages files in $TMPDIR/<model name>, shared by
    # every packaging of a model called llama on this machine at the same moment
    out = subprocess.run([str(ROOT / "package_llama.sh"), "--model-store", str(base / "store"),
                          "--config", str(CPU_CONFIG), "--kserve", str(base / "layout")],
                         capture_output=True, text=True, env={**os.environ, "TMPDIR": str(base / "tmp")})
    assert out.returncode == 0, out.stderr
    return base / "layout"


@pytest.fixture(scope="module")
def pod(layout, tmp_path_factory):
    server = PodServer(layout, tmp_path_factory.mktemp("pod_a")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def replicas(layout, tmp_path_factory):
    """Two fresh servers from the same layout: two pods of one InferenceService."""
    servers = []
    try:
        for name in ("replica_a", "replica_b"):
            servers.append(PodServer(layout, tmp_path_factory.mktemp(name)).start())
        yield servers
    finally:
        for server in servers:
            server.stop()


# ---- the layout -----------------------------------------------------------------------------------

def test_layout_holds_config_metrics_and_archive_for_kserve(layout):
    assert sorted(p.relative_to(layout).as_posix() for p in layout.rglob("*") if p.is_file()) == [
        "config/config.properties", "config/metrics.yaml", "model-store/llama.mar"]
    props = read_properties(layout / "config" / "config.properties")
    assert props["load_models"] == "llama.mar"
    assert props["model_store"] == f"{MOUNT}/model-store"
    assert props["metrics_config"] == f"{MOUNT}/config/metrics.yaml"
    # the ServingRuntime reads exactly these paths
    argv = runtime_container()["args"]
    assert f"--ts-config={MOUNT}/config/config.properties" in argv and f"--model-store={MOUNT}/model-store" in argv


def test_layout_archive_carries_the_pod_model_config(layout):
    import zipfile
    with zipfile.ZipFile(layout / "model-store" / "llama.mar") as mar:
        packed = yaml.safe_load(mar.read("model-config.yaml"))
    assert packed["handler"]["n_threads"] == yaml.safe_load(CPU_CONFIG.read_text())["handler"]["n_threads"]


# ---- served as the ServingRuntime starts it ---------------------------------------------------------

def test_pod_streams_a_chat_on_the_predictions_route(pod):
    chunks = list(pod.client().chat_stream("llama", [{"role": "user", "content": "Say hello."}],
                                           temperature=0, max_tokens=16))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert len(chunks) >= 3 and text.strip()
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_pod_answers_the_openai_route_with_the_openai_package(pod):
    client = OpenAI(base_url=pod.url("inference") + "/predictions/llama/1.0/v1", api_key="unused-auth-is-at-the-ingress")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    answer = client.chat.completions.create(model="llama", messages=messages, temperature=0, max_tokens=20)
    text = answer.choices[0].message.content
    assert text.strip() and answer.usage.completion_tokens > 0
    stream = client.chat.completions.create(model="llama", messages=messages, temperature=0, max_tokens=20, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == text
    assert [m.id for m in client.models.list()] == ["llama"]


def test_pod_metrics_port_exports_torchserve_and_handler_metrics(pod):
    pod.client().chat("llama", [{"role": "user", "content": "Count to three."}], temperature=0, max_tokens=12)
    deadline = time.monotonic() + 20
    while True:
        text = requests.get(pod.url("metrics") + "/metrics", timeout=10).text
        if "llama_tokens_generated" in text or time.monotonic() > deadline:
            break
        # the handler reports at most once a second, at its next step
        pod.client().chat("llama", [{"role": "user", "content": "Hi"}], max_tokens=2)
        time.sleep(1)
    assert re.search(r'^ts_inference_requests_total\{.*model_name="llama".*\} [1-9]', text, re.M), text[:3000]
    assert re.search(r"^llama_tokens_generated\{.*\} [1-9]", text, re.M), text[:3000]


def non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.123", 9))  # no packet is sent; this picks the outgoing address
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_pod_serves_inference_on_its_addresses_but_management_only_on_loopback(pod):
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no address besides loopback")
    assert requests.get(pod.url("inference", address) + "/ping", timeout=5).json()["status"] == "Healthy"
    assert requests.get(pod.url("metrics", address) + "/metrics", timeout=5).ok
    with pytest.raises(requests.ConnectionError):
        requests.get(pod.url("management", address) + "/models", timeout=5)
    # from inside the pod (loopback) the operator still reads it
    assert [m["modelName"] for m in pod.client().list_models()] == ["llama"]


def test_pod_refuses_model_registration_and_needs_no_torchserve_key(pod):
    resp = requests.post(pod.url("management") + "/models", params={"url": "llama.mar"}, timeout=10)
    assert resp.status_code >= 400
    assert not (pod.run_dir / "home" / "key_file.json").exists()


# ---- replicas ---------------------------------------------------------------------------------------

def ask(client: TorchServeClient, history: list[dict]) -> str:
    chunks = client.chat_stream("llama", history, temperature=0, max_tokens=MAX_TOKENS)
    answer = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert answer.strip()
    return answer


def converse(turns_to: list[TorchServeClient]) -> list[str]:
    """One conversation, history kept by the client; turn i goes to turns_to[i]."""
    history: list[dict] = []
    for turn, client in zip(TURNS, turns_to):
        history.append({"role": "user", "content": turn})
        history.append({"role": "assistant", "content": ask(client, history)})
    return [m["content"] for m in history if m["role"] == "assistant"]


def requests_served(server: PodServer) -> float:
    text = requests.get(server.url("metrics") + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r"^ts_inference_requests_total\{.*\} (\S+)$", text, re.M))


def test_replicas_from_one_layout_give_the_same_answer_to_every_turn(replicas):
    """Any replica can answer any turn: both get every turn (so their prompt caches stay alike)
    and answer it alike; the conversation goes on with the answer of the replica whose turn it is."""
    first, second = replicas
    a, b = first.client(), second.client()
    assert first.url("inference") != second.url("inference")
    history: list[dict] = []
    for i, turn in enumerate(TURNS):
        history.append({"role": "user", "content": turn})
        answers = [ask(a, history), ask(b, history)]
        assert answers[0] == answers[1], f"turn {i + 1}: the replicas disagree"
        history.append({"role": "assistant", "content": answers[i % 2]})
    assert requests_served(first) >= len(TURNS) and requests_served(second) >= len(TURNS)


def test_one_conversation_alternating_between_two_replicas_matches_a_single_server(replicas):
    a, b = (server.client() for server in replicas)
    alternating = converse([a, b, a])
    single = converse([a, a, a])
    assert alternating == single
