"""Fault suite against a real TorchServe: a worker killed mid-stream, a client that
goes away, a full queue, a request past its timeout. After each, a normal chat works."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import ROOT, package, start_server
from chatstack.metrics_history import slots_by_worker

LONG = {"messages": [{"role": "user", "content": "Write a very long story about a dragon and a knight."}],
        "max_tokens": 400, "temperature": 0.7, "stream": True}
SHORT = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}


def url(server, model):
    return f"{server.address('inference')}/predictions/{model}"


def auth(server):
    return {"Authorization": f"Bearer {server.client().keys.inference}"}


def chat_eventually_succeeds(server, model, within_s=180):
    deadline = time.monotonic() + within_s
    last = None
    while time.monotonic() < deadline:
        try:
            resp = requests.post(url(server, model), json=SHORT, headers=auth(server), timeout=60)
            # A 200 may still carry an error object: a plain answer's headers go out with its first
            # step, so one that then runs past a short request_timeout_s ends in an error body.
            if resp.status_code == 200 and (resp.json().get("choices") or [{}])[0].get("message", {}).get("content"):
                return
            last = resp.text
        except requests.RequestException as e:
            last = repr(e)
        time.sleep(2)
    pytest.fail(f"no successful chat within {within_s} s; last: {last}")


def read_stream(resp, stop_after=None, lines=None):
    """Chunks of a streamed chat; stops early after `stop_after` chunks. Returns
    (chunks, ended_with_finish_reason, error objects seen, broke_off)."""
    chunks, errors, broke = [], [], False
    try:
        for line in lines if lines is not None else resp.iter_lines():
            if not line.strip():
                continue
            obj = json.loads(line)
            (errors if "error" in obj else chunks).append(obj)
            if stop_after and len(chunks) >= stop_after:
                break
    except (requests.RequestException, json.JSONDecodeError):
        broke = True
    finished = bool(chunks) and chunks[-1]["choices"][0]["finish_reason"] is not None
    return chunks, finished, errors, broke


@pytest.fixture(scope="module")
def fault_server(session_dir, model_store):
    server = start_server(model_store, session_dir / "faults_run", register=None)
    yield server
    server.stop()


def test_killed_worker_ends_its_stream_with_an_error_others_finish_and_a_new_worker_serves(fault_server):
    client = fault_server.client(timeout=300)
    client.register("llama.mar", model_name="pair", initial_workers=2, batch_size=1)
    try:
        streams = [requests.post(url(fault_server, "pair"), json=LONG, headers=auth(fault_server), stream=True,
                                 timeout=300) for _ in range(2)]
        lines = [s.iter_lines() for s in streams]
        assert all(next(it) for it in lines)  # both are generating, one per worker
        victim = client.describe_model("pair")[0]["workers"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        results = [read_stream(s, lines=it) for s, it in zip(streams, lines)]
        broken = [r for r in results if not r[1]]
        finished = [r for r in results if r[1]]
        assert len(broken) == 1, "the killed worker's stream must end without a finish_reason"
        assert broken[0][2] or broken[0][3], "the client must see an error or a broken-off stream"
        assert len(finished) == 1, "the other worker's stream must complete"
        chat_eventually_succeeds(fault_server, "pair")
        pids = {w["pid"] for w in client.describe_model("pair")[0]["workers"]}
        assert victim not in pids
    finally:
        client.unregister("pair")


def test_client_that_disconnects_mid_stream_frees_its_slot(fault_server):
    client = fault_server.client(timeout=300)
    client.register("llama.mar", model_name="solo", initial_workers=1)
    try:
        before = client.metrics().get("llama_requests_finished", 0)
        resp = requests.post(url(fault_server, "solo"), json=LONG, headers=auth(fault_server), stream=True,
                             timeout=300)
        chunks, finished, _, _ = read_stream(resp, stop_after=3)
        assert len(chunks) == 3 and not finished
        resp.close()  # the user closed the tab
        time.sleep(1)
        chat_eventually_succeeds(fault_server, "solo")
        text = client.metrics_text()
        cancelled = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                        if line.startswith("llama_requests_finished{") and 'Reason="cancelled"' in line)
        assert cancelled >= 1, text
        assert client.metrics()["llama_requests_finished"] >= before + 2
        # Slot gauges are per worker: a worker that another test killed keeps its last series,
        # so look at this model's worker.
        (worker,) = client.describe_model("solo")[0]["workers"]
        assert slots_by_worker(client.metric_samples()).get(worker["pid"]) == (0, 8)
    finally:
        client.unregister("solo")


def test_request_past_the_response_timeout_ends_with_a_clear_error(fault_server, model_store, tmp_path):
    config = tmp_path / "model-config.yaml"
    config.write_text((ROOT / "model-config.yaml").read_text().replace("request_timeout_s: 300",
                                                                      "request_timeout_s: 2"))
    package("", "false", "--name", "impatient", "--config", config, store=model_store)
    client = fault_server.client(timeout=300)
    client.register("impatient.mar", initial_workers=1)
    try:
        body = {"prompt": "Count: 1, 2, 3, 4, 5,", "max_tokens": 1500, "temperature": 0, "stream": True,
                "ignore_eos": True}
        started = time.monotonic()
        resp = requests.post(url(fault_server, "impatient"), json=body, headers=auth(fault_server), stream=True,
                             timeout=120)
        chunks, finished, errors, _ = read_stream(resp)
        assert not finished
        assert errors and "response timeout" in errors[0]["error"]["message"]
        assert time.monotonic() - started < 60
        chat_eventually_succeeds(fault_server, "impatient")
    finally:
        client.unregister("impatient")


def test_full_queue_answers_503_promptly_and_serving_goes_on(session_dir, model_store):
    server = start_server(model_store, session_dir / "queue_run", register="llama.mar", batch_size=1,
                          initial_workers=1)
    # A tiny queue: one request in flight, two waiting, the rest refused.
    server.stop()
    server.overrides["job_queue_size"] = "2"
    server.props["job_queue_size"] = "2"
    server.start()
    client = server.client(timeout=300)
    client.register("llama.mar", batch_size=1, initial_workers=1)
    try:
        def attempt(_):
            started = time.monotonic()
            resp = requests.post(url(server, "llama"), json={**LONG, "max_tokens": 60}, headers=auth(server),
                                 timeout=300)
            return resp.status_code, resp.text, time.monotonic() - started

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(attempt, range(8)))
        refused = [r for r in results if r[0] == 503]
        assert refused, [r[0] for r in results]
        assert all(r[2] < 10 for r in refused), "a refusal must be prompt, not after a wait"
        assert all(json.loads(r[1]).get("message") for r in refused)
        assert any(r[0] == 200 for r in results)
        chat_eventually_succeeds(server, "llama")
    finally:
        server.stop()
