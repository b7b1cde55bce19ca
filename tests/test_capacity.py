"""The capacity view's logic (chatstack/capacity.py) and how the console writes figures
(chatstack/console_display.py), without a server."""

from __future__ import annotations

import os

from chatstack.capacity import worker_loads
from chatstack.console_display import (capacity_rows, format_number, handler_metric_rows, metric_unit, slot_rows,
                                       slots_summary, torchserve_metric_rows)
from chatstack.metrics_history import MetricsSnapshot
from chatstack.model_archive import ModelSettings
from chatstack.model_registry import ModelVersion
from chatstack.process_stats import CpuMeter

PID = os.getpid()   # a live process, so memory and CPU can be read


def model(pid=PID, status="READY", version="1.0", default=True) -> ModelVersion:
    return ModelVersion("llama", version, default, "llama.mar", ModelSettings(),
                        [{"id": "9000", "pid": pid, "status": status}], 0, 100)


def slot(name, index, value, pid=PID):
    return (name, {"WorkerPid": str(pid), "Slot": str(index), "ModelName": "llama"}, float(value))


def worker(name, value, pid=PID):
    return (name, {"WorkerPid": str(pid), "ModelName": "llama"}, float(value))


SERVING = [slot("llama_slot_state", 0, 2), slot("llama_slot_state", 1, 1), slot("llama_slot_state", 2, 0),
           slot("llama_slot_context_tokens", 0, 300), slot("llama_slot_context_tokens", 1, 40),
           slot("llama_slot_prompt_tokens_reused", 0, 25), worker("llama_slots_active", 2),
           worker("llama_slots_free", 1), worker("llama_requests_waiting", 4),
           slot("llama_slot_state", 0, 2, pid=999_999)]   # a dead worker's last gauge


def test_each_worker_shows_its_slots_by_state_tokens_in_context_and_requests_waiting():
    [load] = worker_loads([model()], SERVING, CpuMeter())
    assert [s.state for s in load.slots] == ["generating", "reading prompt", "idle"]
    assert load.slots_by_state() == {"idle": 1, "reading prompt": 1, "generating": 1}
    assert (load.slots_in_use, load.slots_total, load.requests_waiting, load.context_tokens) == (2, 3, 4, 340)
    assert load.memory_mb > 0
    assert slots_summary(load) == "1 generating · 1 reading prompt · 1 idle"
    [row] = capacity_rows([load])
    assert row["pid"] == str(PID) and row["requests waiting"] == "4" and row["tokens in context"] == "340"
    assert float(row["memory MB"].replace(",", "")) > 0 and row["CPU %"] == "–"   # CPU needs two readings
    assert [(r["slot"], r["state"], r["tokens in context"], r["prompt tokens reused"]) for r in slot_rows([load])] == [
        (0, "generating", "300", "25"), (1, "reading prompt", "40", "–"), (2, "idle", "–", "–")]


def test_before_the_first_chat_a_worker_reads_no_chat_yet_not_zero_of_zero():
    [load] = worker_loads([model()], [], CpuMeter())
    assert not load.reported and slots_summary(load) == "no chat yet"
    row = capacity_rows([load])[0]
    assert row["requests waiting"] == "–" and row["tokens in context"] == "–"
    assert not any(v in ("None", "null", "0 / 0") for r in (row,) for v in r.values())
    [starting] = worker_loads([model(pid=-1, status="UNLOADING")], [], CpuMeter())
    assert capacity_rows([starting])[0]["pid"] == "–" and slots_summary(starting) == "–"


def test_cpu_is_measured_between_two_readings():
    meter = CpuMeter()
    assert meter.percent(PID) is None
    sum(i * i for i in range(200_000))   # some CPU time for this process
    assert meter.percent(PID) >= 0
    assert meter.percent(None) is None and meter.percent(999_999_999) is None


def test_figures_read_with_units_and_a_dash_where_there_is_none():
    assert [format_number(v) for v in (None, 0, 1234.0, 12.345, 0.5)] == ["–", "0", "1,234", "12.3", "0.50"]
    assert metric_unit("QueueTime") == "ms"
    assert metric_unit("ts_inference_latency_microseconds") == "µs"
    assert metric_unit("llama_tokens_generated") == "tokens"
    assert metric_unit("llama_tokens_per_second") == "tokens/s"
    assert metric_unit("Requests4XX") == "requests"
    assert metric_unit("CPUUtilization") == "%"
    before_first_chat = MetricsSnapshot(1.0, {"QueueTime": 3.0}, {})
    rows = handler_metric_rows(before_first_chat) + torchserve_metric_rows(before_first_chat)
    assert {"metric": "QueueTime", "value": "3", "unit": "ms"} in rows
    assert all(r["value"] not in ("None", "nan", "null") and r["unit"] for r in rows)
    assert not any(r["metric"].endswith(("_bucket", "_sum", "_count")) for r in rows)   # the charts show those
