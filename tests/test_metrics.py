"""The handler's own metrics: declared in metrics.yaml under the names the handler uses, and
reaching TorchServe's Prometheus endpoint with plausible values."""

from __future__ import annotations

import os
import re
import time

import requests
import yaml

import llama_metrics
from chatstack import metric_names
from chatstack.metrics_history import slots_by_worker
from conftest import ROOT
from llama_engine import EngineStats, SlotState, SlotStats
from test_batching import dynamic_batching_model  # noqa: F401 (a fixture)
from test_histograms import FrontendCounters, reporter  # noqa: F401 (a fixture)

# model metrics TorchServe itself reports for every model
TORCHSERVE_MODEL_METRICS = {"HandlerTime", "PredictionTime"}


def test_metrics_yaml_declares_exactly_the_handlers_metric_names():
    declared = yaml.safe_load((ROOT / "metrics.yaml").read_text())["model_metrics"]
    names = {kind: {m["name"] for m in declared.get(kind, [])} - TORCHSERVE_MODEL_METRICS
             for kind in ("counter", "gauge", "histogram")}
    assert names == {"counter": set(llama_metrics.COUNTERS), "gauge": set(llama_metrics.GAUGES), "histogram": set()}


def test_the_console_and_the_handler_name_the_same_metrics_and_slot_states():
    """chatstack.metric_names (the console's) and llama_metrics (the handler's, packed alone in the .mar)."""
    shared = {name: value for name, value in vars(metric_names).items() if name.isupper() and hasattr(llama_metrics, name)}
    assert len(shared) >= 10
    for name, value in shared.items():
        handler_value = getattr(llama_metrics, name)
        assert (value.name if isinstance(value, metric_names.Histogram) else value) == handler_value, name
    assert metric_names.SLOT_STATES == {v: s.value for s, v in llama_metrics.SLOT_STATE_VALUES.items()}
    assert {h.name for h in metric_names.declared_metrics().handler_histograms} == set(llama_metrics.HISTOGRAM_BUCKETS)


def test_capacity_gauges_go_out_per_worker_and_per_slot_as_metrics_yaml_declares_them(reporter, caplog):
    caplog.set_level("INFO", logger="ts.metrics")
    stats = EngineStats(slots_total=2, slots_active=2, slots_reading_prompt=1, slots_generating=1, requests_waiting=3,
                        slots=[SlotStats(SlotState.READING_PROMPT, 40, 12), SlotStats(SlotState.GENERATING, 90, 0)])
    reporter.report(stats, force=True)
    frontend = FrontendCounters()
    frontend.read(caplog.records)   # checks each line's dimensions against metrics.yaml
    pid = str(os.getpid())
    assert frontend.series(metric_names.REQUESTS_WAITING) == {("llama", "Model", pid): 3}
    assert frontend.series(metric_names.SLOTS_GENERATING) == {("llama", "Model", pid): 1}
    assert frontend.series(metric_names.SLOT_STATE) == {("llama", "Model", pid, "0"): 1, ("llama", "Model", pid, "1"): 2}
    assert frontend.series(metric_names.SLOT_CONTEXT_TOKENS) == {("llama", "Model", pid, "0"): 40,
                                                                 ("llama", "Model", pid, "1"): 90}
    assert frontend.series(metric_names.SLOT_PROMPT_TOKENS_REUSED)[("llama", "Model", pid, "0")] == 12


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


def slot_gauges(client, pid: int, model: str = "llama") -> dict:
    """One worker's capacity gauges: {name: value} and, per slot, {name: {slot: value}}."""
    out: dict = {}
    for name, labels, value in client.metric_samples():
        if labels.get("ModelName") != model or labels.get("WorkerPid") != str(pid):
            continue
        if "Slot" in labels:
            out.setdefault(name, {})[int(labels["Slot"])] = value
        else:
            out[name] = value
    return out


def test_slot_gauges_show_a_streaming_chat_generating_then_its_slot_idle(torchserve):
    """While a long answer streams, /metrics shows its slot generating with its context growing;
    after it, every slot idle, the slot holding the prompt and the answer (but its last token)."""
    check_slot_gauges_while_streaming(torchserve.client(timeout=120), "llama")


def test_in_dynamic_batching_the_slot_gauges_move_during_the_batch(torchserve, dynamic_batching_model):
    """There one handler call lasts the whole batch: the gauges go out from inside it."""
    check_slot_gauges_while_streaming(torchserve.client(timeout=120), dynamic_batching_model)


def check_slot_gauges_while_streaming(client, model: str):
    [pid] = [w["pid"] for entry in client.describe_model(model) for w in entry["workers"]]
    conversation = [{"role": "user", "content": "Count from one to one hundred in words."}]
    seen = []      # (slot, its context tokens) each time /metrics showed a slot generating
    next_look = time.monotonic() + 0.5
    chunks = []
    for chunk in client.chat_stream(model, conversation, max_tokens=300, temperature=0, ignore_eos=True):
        chunks.append(chunk)
        if time.monotonic() >= next_look:
            gauges = slot_gauges(client, pid, model)
            generating = [s for s, state in gauges.get(metric_names.SLOT_STATE, {}).items() if state == 2]
            if generating:
                assert gauges[metric_names.SLOTS_GENERATING] == len(generating) == 1, gauges
                assert gauges[metric_names.REQUESTS_WAITING] == 0
                seen.append((generating[0], gauges[metric_names.SLOT_CONTEXT_TOKENS][generating[0]]))
            next_look = time.monotonic() + 0.5
    usage = chunks[-1]["usage"]
    assert len({slot for slot, _ in seen}) == 1 and len(seen) >= 2, f"a generating slot in /metrics mid-stream: {seen}"
    contexts = [tokens for _, tokens in seen]
    assert contexts == sorted(contexts) and contexts[-1] > contexts[0] >= usage["prompt_tokens"], seen

    slot = seen[0][0]
    deadline = time.monotonic() + 10   # the last report goes out with the answer's end, through the worker's log
    gauges = slot_gauges(client, pid, model)
    while gauges[metric_names.SLOT_STATE][slot] != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
        gauges = slot_gauges(client, pid, model)
    assert set(gauges[metric_names.SLOT_STATE].values()) == {0}, gauges
    assert gauges[metric_names.SLOTS_GENERATING] == gauges[metric_names.SLOTS_READING_PROMPT] == 0
    assert gauges[metric_names.SLOT_CONTEXT_TOKENS][slot] == usage["prompt_tokens"] + usage["completion_tokens"] - 1
    assert gauges[metric_names.SLOT_PROMPT_TOKENS_REUSED][slot] == usage["prompt_tokens_details"]["cached_tokens"]


def test_the_readme_metrics_table_documents_every_handler_metric():
    section = (ROOT / "README.md").read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    documented = {name for row in section.splitlines() if row.startswith("| `")
                  for name in re.findall(r"`(llama_\w+)`", row.split("|")[1])}
    histogram_series = {name + series for name in llama_metrics.HISTOGRAM_BUCKETS
                        for series in llama_metrics.HISTOGRAM_SERIES}
    handler_metrics = (set(llama_metrics.COUNTERS) - histogram_series) | set(llama_metrics.GAUGES)
    assert documented == handler_metrics | set(llama_metrics.HISTOGRAM_BUCKETS)
