"""The metric names metrics.yaml declares: the one list that TorchServe (it exports only
declared metrics), the handler (handler/llama_metrics.py, checked against this file by
its tests) and the console share."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

METRICS_YAML = Path(__file__).resolve().parent.parent / "metrics.yaml"
HANDLER_PREFIX = "llama_"   # the handler's metrics; the other model metrics are TorchServe's stock ones

# The handler metrics the console computes with (tests/test_server_app.py checks that
# metrics.yaml declares each of them).
TOKENS_GENERATED = "llama_tokens_generated"
PROMPT_TOKENS_EVALUATED = "llama_prompt_tokens_evaluated"
PROMPT_TOKENS_REUSED = "llama_prompt_tokens_reused"
REQUESTS_FINISHED = "llama_requests_finished"   # labelled by Reason
SLOTS_ACTIVE = "llama_slots_active"
SLOTS_FREE = "llama_slots_free"
TIME_TO_FIRST_TOKEN_MS = "llama_time_to_first_token_ms"
TOKENS_PER_SECOND = "llama_tokens_per_second"

# Capacity, per worker (labels ModelName, WorkerPid): requests queued for a free slot, slots by state.
REQUESTS_WAITING = "llama_requests_waiting"
SLOTS_READING_PROMPT = "llama_slots_reading_prompt"
SLOTS_GENERATING = "llama_slots_generating"
# Per slot (labels ModelName, WorkerPid, Slot).
SLOT_STATE = "llama_slot_state"                               # one of SLOT_STATES' values
SLOT_CONTEXT_TOKENS = "llama_slot_context_tokens"             # tokens whose KV the slot holds (an idle one keeps them for reuse)
SLOT_PROMPT_TOKENS_REUSED = "llama_slot_prompt_tokens_reused"  # prompt tokens its current (or last) request reused
SLOT_STATES = {0: "idle", 1: "reading prompt", 2: "generating"}   # SLOT_STATE's values (handler/llama_metrics.py)


@dataclass(frozen=True)
class Histogram:
    """A per-request distribution the handler exports as Prometheus histogram series: counters
    `<name>_bucket` (label `le`, cumulative, `+Inf` last), `<name>_sum` and `<name>_count`, so
    PromQL's histogram_quantile works on them (metrics.yaml says why not TorchServe's histogram type)."""

    name: str

    @property
    def bucket(self) -> str:
        return self.name + "_bucket"

    @property
    def sum(self) -> str:
        return self.name + "_sum"

    @property
    def count(self) -> str:
        return self.name + "_count"


# Per request, labels ModelName (the buckets also le); bucket bounds in handler/llama_metrics.py.
REQUEST_TIME_TO_FIRST_TOKEN_MS = Histogram("llama_request_time_to_first_token_ms")   # arrival to first token
REQUEST_QUEUE_WAIT_MS = Histogram("llama_request_queue_wait_ms")                     # arrival to its slot starting
REQUEST_LATENCY_MS = Histogram("llama_request_latency_ms")                           # arrival to last token
REQUEST_TOKENS_PER_SECOND = Histogram("llama_request_tokens_per_second")             # the answer's generation rate
HISTOGRAMS = (REQUEST_TIME_TO_FIRST_TOKEN_MS, REQUEST_QUEUE_WAIT_MS, REQUEST_LATENCY_MS, REQUEST_TOKENS_PER_SECOND)


@dataclass(frozen=True)
class MetricNames:
    handler_counters: tuple[str, ...]
    handler_gauges: tuple[str, ...]
    torchserve_counters: tuple[str, ...]
    torchserve_gauges: tuple[str, ...]

    @property
    def counters(self) -> tuple[str, ...]:
        return self.handler_counters + self.torchserve_counters

    @property
    def handler_histograms(self) -> tuple[Histogram, ...]:
        """The handler's histograms: those whose _bucket, _sum and _count counters are all declared."""
        return tuple(Histogram(n.removesuffix("_bucket")) for n in self.handler_counters
                     if n.endswith("_bucket") and {n[:-7] + "_sum", n[:-7] + "_count"} <= set(self.handler_counters))

    @property
    def handler_plain_counters(self) -> tuple[str, ...]:
        """The handler's counters that are not a histogram's series (a table of totals shows these)."""
        series = {s for h in self.handler_histograms for s in (h.bucket, h.sum, h.count)}
        return tuple(n for n in self.handler_counters if n not in series)


@lru_cache
def declared_metrics(path: Path = METRICS_YAML) -> MetricNames:
    """The names in metrics.yaml, in its order: the handler's (model_metrics named llama_*)
    and TorchServe's own (ts_metrics), counters and gauges apart."""
    config = yaml.safe_load(Path(path).read_text())

    def names(section: str, kind: str) -> tuple[str, ...]:
        return tuple(m["name"] for m in (config.get(section) or {}).get(kind) or [])

    return MetricNames(
        handler_counters=tuple(n for n in names("model_metrics", "counter") if n.startswith(HANDLER_PREFIX)),
        handler_gauges=tuple(n for n in names("model_metrics", "gauge") if n.startswith(HANDLER_PREFIX)),
        torchserve_counters=names("ts_metrics", "counter"), torchserve_gauges=names("ts_metrics", "gauge"))


@lru_cache
def declared_units(path: Path = METRICS_YAML) -> dict[str, str]:
    """Each declared metric's unit as metrics.yaml gives it (Count, ms, Milliseconds, Percent …)."""
    config = yaml.safe_load(Path(path).read_text())
    return {m["name"]: m.get("unit", "") for section in ("ts_metrics", "model_metrics")
            for kind in (config.get(section) or {}).values() for m in kind or []}
