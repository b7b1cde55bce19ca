"""Two workers on one continuous-batching model (issue #16): every chat finishes promptly.

TorchServe 0.12.0's own ContinuousBatching makes a worker with chats in flight wait, before each
step, for the model-wide lock that an idle worker holds while it waits for work: the chat stalls
until another request comes. torchserve_fix's agent replaces that class. To see the bug, run this
file against TorchServe's own class (the chat tests then fail with read timeouts):

    WORKER_SCALING_STOCK=1 .venv/bin/python -m pytest tests/test_worker_scaling.py
"""

from __future__ import annotations

import os
import re
import threading
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from chatstack import torchserve_process
from chatstack.metrics_history import slots_by_worker
from chatstack.torchserve_client import TorchServeError
from chatstack.torchserve_process import StartError, TorchServeProcess
from conftest import ROOT, free_port_overrides, package

STOCK = os.environ.get("WORKER_SCALING_STOCK") == "1"
STALL_S = 30  # a 16-token answer takes about a second here (more on a busy machine); a stalled one
              # waits for the next request, forever in these tests
MODEL = "llama_two"
ANSWER = {"max_tokens": 16, "ignore_eos": True, "temperature": 0}
HELLO = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def two_workers(session_dir, model_store):
    """TorchServe serving the default model (continuous batching, 8 slots) with two workers, as MODEL.
    Packed with minWorkers 2, so each worker takes half the cores (n_threads 0): two workers of
    all cores each would crawl on a small machine."""
    config = session_dir / "two-workers-model-config.yaml"
    text = (ROOT / "model-config.yaml").read_text()
    text, replaced = re.subn(r"^(min|max)Workers: 1 ", r"\1Workers: 2 ", text, flags=re.M)
    assert replaced == 2, "model-config.yaml no longer says minWorkers: 1 / maxWorkers: 1"
    config.write_text(text)
    package("", "false", "--name", MODEL, "--config", config, "--no-embed", store=model_store)
    server = TorchServeProcess(ROOT / "config.properties", model_store, session_dir / "scaling_run",
                               overrides=free_port_overrides(), torchserve_fix=not STOCK)
    server.start()
    try:
        client = server.client(timeout=300)
        client.register(f"{MODEL}.mar")
        assert len(client.wait_for_workers(MODEL, count=2)) == 2
        yield server
    finally:
        server.stop()


def chat(server: TorchServeProcess, stream: bool, **params) -> dict:
    """One chat; returns its usage and finish reason. A stall raises TorchServeError (read timeout)."""
    client = server.client()
    params = {**ANSWER, **params}
    started = time.monotonic()
    if stream:
        last = list(client.chat_stream(MODEL, HELLO, timeout=STALL_S, **params))[-1]
    else:
        last = client.chat(MODEL, HELLO, timeout=STALL_S, **params)
    return {"finish": last["choices"][0]["finish_reason"], "tokens": last["usage"]["completion_tokens"],
            "seconds": time.monotonic() - started}


def worker_cpu_s(server: TorchServeProcess) -> dict[int, float]:
    """CPU seconds (user + system, llama.cpp's threads included) of each worker process."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in server.client().describe_model(MODEL):
        for worker in entry["workers"]:
            fields = Path(f"/proc/{worker['pid']}/stat").read_text().rpartition(")")[2].split()
            out[int(worker["pid"])] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def test_each_worker_runs_the_fixed_continuous_batching(two_workers):
    if STOCK:
        pytest.skip("running TorchServe's own ContinuousBatching")
    log = (two_workers.log_dir / "ts_log.log").read_text()
    assert len(re.findall(rf"torchserve_fix: continuous batching for {MODEL} ", log)) >= 2


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_chats_one_at_a_time_with_idle_gaps_finish_promptly(two_workers, stream):
    # The stalling pattern: each chat comes while the other worker idles, and no next request
    # arrives to wake things up. (Plain chats: the second symptom of docs/admin-console.md.)
    for _ in range(3):
        try:
            result = chat(two_workers, stream)
        except TorchServeError as e:
            pytest.fail(f"a chat stalled with two workers: {e}")
        assert (result["finish"], result["tokens"]) == ("length", 16) and result["seconds"] < STALL_S, result
        time.sleep(0.5)


def test_staggered_concurrent_chats_all_finish_and_both_workers_serve(two_workers):
    before = worker_cpu_s(two_workers)
    results: dict[int, dict | Exception] = {}

    def one(i):
        try:
            results[i] = chat(two_workers, stream=i % 2 == 1, max_tokens=48)
        except TorchServeError as e:
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
        time.sleep(0.3)
    for t in threads:
        t.join(timeout=3 * STALL_S)
    assert all(isinstance(r, dict) and r["finish"] == "length" and r["tokens"] == 48 for r in results.values()) \
        and len(results) == 6, results
    # Each worker did part of the work (an idle worker uses no CPU).
    grown = {pid: cpu - before.get(pid, 0.0) for pid, cpu in worker_cpu_s(two_workers).items()}
    assert len(grown) == 2 and min(grown.values()) > 0.05, grown


def test_a_new_chat_goes_to_the_idle_worker_while_the_other_is_busy(two_workers):
    long_chat = two_workers.client().chat_stream(MODEL, HELLO, timeout=STALL_S, **{**ANSWER, "max_tokens": 1000})
    next(long_chat)  # one worker is generating the long chat
    first = worker_cpu_s(two_workers)
    time.sleep(0.5)
    second = worker_cpu_s(two_workers)
    busy = max(second, key=lambda pid: second[pid] - first[pid])
    (idle,) = set(second) - {busy}
    result = chat(two_workers, stream=False, max_tokens=48)
    third = worker_cpu_s(two_workers)
    still = next(long_chat)
    long_chat.close()  # TorchServe drops it, the handler frees its slot
    assert result["finish"] == "length" and still["choices"][0]["finish_reason"] is None
    assert third[idle] - second[idle] > 0.05, "the new chat was not served by the idle worker"


def test_metrics_show_each_workers_slots_in_use(two_workers):
    pids = set(worker_cpu_s(two_workers))
    long_chat = two_workers.client().chat_stream(MODEL, HELLO, timeout=STALL_S, **{**ANSWER, "max_tokens": 1000})
    next(long_chat)
    deadline = time.monotonic() + 2.5   # the handler publishes its gauges at most once a second
    while time.monotonic() < deadline:
        next(long_chat)
    slots = slots_by_worker(two_workers.client().metric_samples())
    long_chat.close()
    assert slots and set(slots) <= pids, f"slot gauges of {set(slots)}, workers {pids}"
    assert sorted(active for active, _ in slots.values())[-1] == 1, slots   # the busy worker holds the chat
    assert all(active + free == 8 for active, free in slots.values()), slots   # each worker has its own 8 slots


# ---- start-up refuses a TorchServe without the fix -----------------------------------------------

def test_start_refuses_when_the_fix_is_not_built(tmp_path, model_store, monkeypatch):
    monkeypatch.setattr(torchserve_process, "TORCHSERVE_FIX", tmp_path / "torchserve-fix.jar")
    process = TorchServeProcess(ROOT / "config.properties", model_store, tmp_path, overrides=free_port_overrides())
    with pytest.raises(StartError, match=r"fix is not built .* run torchserve_fix/build.sh"):
        process.start()
    assert not process.is_running()


def test_start_refuses_a_fix_built_for_another_torchserve(tmp_path, model_store, monkeypatch):
    agent = tmp_path / "torchserve-fix.jar"
    with zipfile.ZipFile(agent, "w") as jar:
        jar.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\nTorchServe-Version: 0.11.1\n"
                                             f"Model-Server-Jar-SHA256: {'0' * 64}\n")
    monkeypatch.setattr(torchserve_process, "TORCHSERVE_FIX", agent)
    process = TorchServeProcess(ROOT / "config.properties", model_store, tmp_path, overrides=free_port_overrides())
    with pytest.raises(StartError, match=r"built for TorchServe 0\.11\.1's model-server\.jar"):
        process.start()


def test_the_image_loads_the_fix_whatever_its_working_directory():
    containerfile = (ROOT / "deploy" / "Containerfile").read_text()
    builder, final = re.split(r"^FROM ", containerfile, flags=re.M)[1:]
    assert "torchserve_fix/build.sh" in builder
    assert "COPY --from=builder /opt/torchserve-fix/torchserve-fix.jar /opt/llama-chat/torchserve-fix.jar" in final
    assert "JAVA_TOOL_OPTIONS=-javaagent:/opt/llama-chat/torchserve-fix.jar" in final
    runtime = yaml.safe_load((ROOT / "deploy" / "kserve" / "servingruntime.yaml").read_text())
    env = {e["name"] for c in runtime["spec"]["containers"] for e in c.get("env", [])}
    assert "JAVA_TOOL_OPTIONS" not in env, "the ServingRuntime would replace the image's JAVA_TOOL_OPTIONS"
    ignore = (ROOT / "deploy" / "Containerfile.dockerignore").read_text()
    assert "!torchserve_fix/build.sh" in ignore and "!torchserve_fix/src/**" in ignore
