"""Publish the engine's counters through TorchServe's metrics API.

The metric names are declared in metrics.yaml (TorchServe only exports declared
metrics); the names below are the handler's, and tests/test_metrics.py checks that
metrics.yaml declares exactly these. Counters are sent as deltas since the last
report, at most once a second, because every report is a log line the frontend
must parse.
"""

from __future__ import annotations

import os
import time

from llama_engine import EngineStats, SlotState

# counters
TOKENS_GENERATED = "llama_tokens_generated"
PROMPT_TOKENS_EVALUATED = "llama_prompt_tokens_evaluated"
PROMPT_TOKENS_REUSED = "llama_prompt_tokens_reused"
DECODE_STEPS = "llama_decode_steps"
SEQUENCES_DECODED = "llama_sequences_decoded"
REQUESTS_FINISHED = "llama_requests_finished"      # label Reason: stop, length, cancelled, error
# gauges
SLOTS_ACTIVE = "llama_slots_active"
SLOTS_FREE = "llama_slots_free"
TIME_TO_FIRST_TOKEN_MS = "llama_time_to_first_token_ms"
TOKENS_PER_SECOND = "llama_tokens_per_second"

# capacity gauges, per worker
REQUESTS_WAITING = "llama_requests_waiting"
SLOTS_READING_PROMPT = "llama_slots_reading_prompt"
SLOTS_GENERATING = "llama_slots_generating"
# per-slot gauges (label Slot)
SLOT_STATE = "llama_slot_state"                  # SLOT_STATE_VALUES
SLOT_CONTEXT_TOKENS = "llama_slot_context_tokens"
SLOT_PROMPT_TOKENS_REUSED = "llama_slot_prompt_tokens_reused"
# histograms (per request): each is three counters, <name>_bucket (label le), <name>_sum, <name>_count
REQUEST_TIME_TO_FIRST_TOKEN_MS = "llama_request_time_to_first_token_ms"
REQUEST_QUEUE_WAIT_MS = "llama_request_queue_wait_ms"
REQUEST_LATENCY_MS = "llama_request_latency_ms"
REQUEST_TOKENS_PER_SECOND = "llama_request_tokens_per_second"

# The histograms' bucket upper bounds (+Inf is added): the one place they are chosen. Milliseconds
# from a cached prompt on a GPU (a few ms) to a long answer on a small CPU (minutes); tokens/s from
# a loaded CPU to one stream on a GPU.
MS_BUCKETS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000, 120_000, 300_000)
TOKENS_PER_SECOND_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
HISTOGRAM_BUCKETS = {
    REQUEST_TIME_TO_FIRST_TOKEN_MS: MS_BUCKETS,
    REQUEST_QUEUE_WAIT_MS: MS_BUCKETS,
    REQUEST_LATENCY_MS: MS_BUCKETS,
    REQUEST_TOKENS_PER_SECOND: TOKENS_PER_SECOND_BUCKETS,
}
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
SLOT_STATE_VALUES = {SlotState.IDLE: 0, SlotState.READING_PROMPT: 1, SlotState.GENERATING: 2}

COUNTERS = (TOKENS_GENERATED, PROMPT_TOKENS_EVALUATED, PROMPT_TOKENS_REUSED, DECODE_STEPS, SEQUENCES_DECODED,
            REQUESTS_FINISHED, *(name + series for name in HISTOGRAM_BUCKETS for series in HISTOGRAM_SERIES))
GAUGES = (SLOTS_ACTIVE, SLOTS_FREE, TIME_TO_FIRST_TOKEN_MS, TOKENS_PER_SECOND, REQUESTS_WAITING,
          SLOTS_READING_PROMPT, SLOTS_GENERATING, SLOT_STATE, SLOT_CONTEXT_TOKENS, SLOT_PROMPT_TOKENS_REUSED)

_COUNTED_STATS = {
    TOKENS_GENERATED: "tokens_generated",
    PROMPT_TOKENS_EVALUATED: "tokens_prefilled",
    PROMPT_TOKENS_REUSED: "tokens_reused",
    DECODE_STEPS: "decode_calls",
    SEQUENCES_DECODED: "sequences_decoded",
}
REPORT_INTERVAL_S = 1.0


class MetricsReporter:
    def __init__(self, metrics, model_name: str):
        self.metrics = metrics
        self.model_name = model_name
        self.last_report = 0.0
        self.sent: dict[str, float] = {}
        self.last_ttft_ms: float | None = None
        self.last_tps: float | None = None

    def observe_finished(self, time_to_first_token_s: float | None, tokens_per_second: float | None):
        if time_to_first_token_s is not None:
            self.last_ttft_ms = time_to_first_token_s * 1000.0
        if tokens_per_second is not None:
            self.last_tps = tokens_per_second

    def report(self, stats: EngineStats, force: bool = False) -> None:
        now = time.monotonic()
        if self.metrics is None or (not force and now - self.last_report < REPORT_INTERVAL_S):
            return
        self.last_report = now
        from ts.metrics.dimension import Dimension
        from ts.metrics.metric_type_enum import MetricTypes

        def dims(**extra):
            return [Dimension("ModelName", self.model_name), Dimension("Level", "Model"),
                    *(Dimension(k, v) for k, v in extra.items())]

        def counter(name, total, **extra):
            key = name + repr(sorted(extra.items()))
            delta = total - self.sent.get(key, 0)
            if delta > 0:
                self.metrics.add_metric(name, delta, "Count", None, dims(**extra), MetricTypes.COUNTER)
                self.sent[key] = total

        def gauge(name, value, unit="Count"):
            # Per worker: with several workers a gauge without it would show whichever reported last.
            if value is not None:
                self.metrics.add_metric(name, value, unit, None, dims(WorkerPid=str(os.getpid())), MetricTypes.GAUGE)

        for name, attr in _COUNTED_STATS.items():
            counter(name, getattr(stats, attr))
        for reason, total in stats.finished.items():
            counter(REQUESTS_FINISHED, total, Reason=reason)
        gauge(SLOTS_ACTIVE, stats.slots_active)
        gauge(SLOTS_FREE, stats.slots_free)
        gauge(TIME_TO_FIRST_TOKEN_MS, self.last_ttft_ms, "ms")
        gauge(TOKENS_PER_SECOND, self.last_tps)
