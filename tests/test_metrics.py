"""The handler's own metrics: declared in metrics.yaml under the names the handler uses, and
reaching TorchServe's Prometheus endpoint with plausible values."""

from __future__ import annotations

import requests
import yaml

import llama_metrics
from chatstack.metrics_history import slots_by_worker
from conftest import ROOT

# model metrics TorchServe itself reports for every model
TORCHSERVE_MODEL_METRICS = {"HandlerTime", "PredictionTime"}


def test_metrics_yaml_declares_exactly_the_handlers_metric_names():
    declared = yaml.safe_load((ROOT / "metrics.yaml").read_text())["model_metrics"]
    names = {kind: {m["name"] for m in declared.get(kind, [])} - TORCHSERVE_MODEL_METRICS
             for kind in ("counter", "gauge", "histogram")}
    assert names == {"counter": set(llama_metrics.COUNTERS), "gauge": set(llama_metrics.GAUGES), "histogram": set()}


def samples(text, name, model="llama"):
    """Lines of one metric for one model (other tests register other models on the same server)."""
    return [line for line in text.splitlines()
            if line.startswith(name + "{") and f'ModelName="{model}"' in line]


def value(line):
    return float(line.rsplit(" ", 1)[1])


def test_metrics_appear_with_plausible_values_after_a_few_chats(torchserve):
    client = torchserve.client(timeout=120)
    conversation = [{"role": "user", "content": "Name a fruit."}]
    for _ in range(2):
        reply = client.chat("llama", conversation, max_tokens=12, temperature=0)
        conversation += [reply["choices"][0]["message"], {"role": "user", "content": "Another one?"}]
    generated = reply["usage"]["completion_tokens"]
    text = requests.get(f"{torchserve.address('metrics')}/metrics", timeout=30).text

    tokens = sum(value(line) for line in samples(text, "llama_tokens_generated"))
    assert tokens >= generated > 0
    assert sum(value(line) for line in samples(text, "llama_prompt_tokens_evaluated")) > 0
    assert sum(value(line) for line in samples(text, "llama_prompt_tokens_reused")) > 0, "turn 2 reuses turn 1"
    finished = samples(text, "llama_requests_finished")
    assert any('Reason="stop"' in line or 'Reason="length"' in line for line in finished)
    steps = sum(value(line) for line in samples(text, "llama_decode_steps"))
    decoded = sum(value(line) for line in samples(text, "llama_sequences_decoded"))
    assert steps > 0 and decoded >= steps
    # Slot gauges are per worker (WorkerPid); a worker killed by an earlier test leaves its last
    # series behind, so look at the live worker's.
    live = {w["pid"] for entry in client.describe_model("llama") for w in entry["workers"]}
    slots = slots_by_worker(client.metric_samples())
    assert [slots[pid] for pid in live if pid in slots] == [(0, 8)], (slots, live)
    ttft = samples(text, "llama_time_to_first_token_ms")
    assert ttft and 0 < value(ttft[0]) < 120_000
    assert samples(text, "llama_tokens_per_second")


def test_logs_hold_no_line_per_decode_step(torchserve):
    """A 60-token stream is dozens of handler calls: none of them may add a log line (on a small
    machine the frontend's logging takes CPU from llama.cpp), and llama.cpp's model-loading
    chatter stays out of the model log, while the frontend still logs the request."""
    client = torchserve.client(timeout=120)
    logs = torchserve.log_dir
    before = {name: (logs / name).read_text().count("\n") for name in ("ts_log.log", "model_log.log")}
    chunks = list(client.chat_stream("llama", [{"role": "user", "content": "Count to forty."}],
                                     max_tokens=60, temperature=0, ignore_eos=True))
    assert len(chunks) > 3   # several handler calls
    ts_log = (logs / "ts_log.log").read_text()
    model_log = (logs / "model_log.log").read_text()
    added = {"ts_log.log": ts_log.count("\n") - before["ts_log.log"],
             "model_log.log": model_log.count("\n") - before["model_log.log"]}
    assert added["ts_log.log"] < 5 and added["model_log.log"] < 5, added
    for per_step in ("Backend received inference", "Backend response time", "Waiting time ns"):
        assert per_step not in ts_log + model_log
    assert "llama_model_loader: - kv" not in model_log and "llama_graph_n_input_tensors" not in model_log
    assert "/predictions/llama" in (logs / "access_log.log").read_text()
