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

from llama_engine import EngineStats

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

COUNTERS = (TOKENS_GENERATED, PROMPT_TOKENS_EVALUATED, PROMPT_TOKENS_REUSED, DECODE_STEPS, SEQUENCES_DECODED,
            REQUESTS_FINISHED)
GAUGES = (SLOTS_ACTIVE, SLOTS_FREE, TIME_TO_FIRST_TOKEN_MS, TOKENS_PER_SECOND)

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
