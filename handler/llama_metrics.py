"""Publish the engine's counters, gauges and per-request histograms through TorchServe's metrics API.

The metric names are declared in metrics.yaml (TorchServe only exports declared
metrics); the names below are the handler's, and tests/test_metrics.py checks that
metrics.yaml declares exactly these. Reports go out at most once a second (and when a
request finished), and each holds only what changed: counters as deltas since the last
report, gauges whose value moved, because every value is a log line the frontend must parse.

Histograms are Prometheus histogram series written as counters (`<name>_bucket` with an
`le` label, cumulative, then `<name>_sum` and `<name>_count`): TorchServe 0.12's own
histogram type (frontend PrometheusHistogram) builds the Java client's histogram with its
fixed default buckets, 0.005 to 10, which fit neither milliseconds nor tokens per second,
and metrics.yaml has no way to give others.
"""

from __future__ import annotations

import math
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


class BucketHistogram:
    """Observations counted into cumulative buckets (upper bounds, +Inf last), with their sum and count."""

    def __init__(self, bounds):
        self.bounds = (*bounds, math.inf)
        self.cumulative = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.cumulative[i] += 1
        self.sum += value
        self.count += 1


def le_label(bound: float) -> str:
    """A bucket's `le` label as Prometheus writes it."""
    return "+Inf" if math.isinf(bound) else format(float(bound), "g")


class MetricsReporter:
    def __init__(self, metrics, model_name: str):
        self.metrics = metrics
        self.model_name = model_name
        self.last_report = 0.0
        self.sent: dict[str, float] = {}
        self.last_ttft_ms: float | None = None
        self.last_tps: float | None = None
        self.histograms = {name: BucketHistogram(bounds) for name, bounds in HISTOGRAM_BUCKETS.items()}

    def observe_finished(self, time_to_first_token_s: float | None, tokens_per_second: float | None):
        if time_to_first_token_s is not None:
            self.last_ttft_ms = time_to_first_token_s * 1000.0
        if tokens_per_second is not None:
            self.last_tps = tokens_per_second

    def observe_answer(self, timings) -> None:
        """Count a finished answer's figures (answer_timings.AnswerTimings, or None when it failed)
        into the histograms."""
        if timings is None:
            return
        for name, value in ((REQUEST_TIME_TO_FIRST_TOKEN_MS, timings.ttft_ms),
                            (REQUEST_QUEUE_WAIT_MS, timings.queue_ms),
                            (REQUEST_LATENCY_MS, timings.latency_ms),
                            (REQUEST_TOKENS_PER_SECOND, timings.predicted_per_second)):
            if value is not None:
                self.histograms[name].observe(value)

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

        def counter(name, total, unit="Count", **extra):
            # The first report sends zeros too, so every series (each histogram bucket) exists from the start.
            key = name + repr(sorted(extra.items()))
            delta = total - self.sent.get(key, 0)
            if delta > 0 or key not in self.sent:
                self.metrics.add_metric(name, delta, unit, None, dims(**extra), MetricTypes.COUNTER)
                self.sent[key] = total

        def gauge(name, value, unit="Count", **extra):
            # Per worker: with several workers a gauge without it would show whichever reported last.
            # TorchServe keeps a gauge's last value, so an unchanged one is not sent again.
            extra = {"WorkerPid": str(os.getpid()), **extra}
            key = name + repr(sorted(extra.items()))
            if value is not None and self.sent.get(key) != value:
                self.metrics.add_metric(name, value, unit, None, dims(**extra), MetricTypes.GAUGE)
                self.sent[key] = value

        for name, attr in _COUNTED_STATS.items():
            counter(name, getattr(stats, attr))
        for reason, total in stats.finished.items():
            counter(REQUESTS_FINISHED, total, Reason=reason)
        gauge(SLOTS_ACTIVE, stats.slots_active)
        gauge(SLOTS_FREE, stats.slots_free)
        gauge(TIME_TO_FIRST_TOKEN_MS, self.last_ttft_ms, "ms")
        gauge(TOKENS_PER_SECOND, self.last_tps)
        gauge(REQUESTS_WAITING, stats.requests_waiting)
        gauge(SLOTS_READING_PROMPT, stats.slots_reading_prompt)
        gauge(SLOTS_GENERATING, stats.slots_generating)
        for index, slot in enumerate(stats.slots):
            gauge(SLOT_STATE, SLOT_STATE_VALUES[slot.state], Slot=str(index))
            gauge(SLOT_CONTEXT_TOKENS, slot.context_tokens, Slot=str(index))
            gauge(SLOT_PROMPT_TOKENS_REUSED, slot.prompt_tokens_reused, Slot=str(index))
        for name, histogram in self.histograms.items():
            unit = "Count" if name == REQUEST_TOKENS_PER_SECOND else "ms"
            for bound, total in zip(histogram.bounds, histogram.cumulative):
                counter(name + "_bucket", total, unit, le=le_label(bound))
            counter(name + "_sum", histogram.sum, unit)
            counter(name + "_count", histogram.count)
