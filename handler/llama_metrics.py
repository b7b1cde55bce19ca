"""Publish the engine's counters through TorchServe's metrics API.

The metric names are declared in metrics.yaml (TorchServe only exports
declared metrics). Counters are sent as deltas since the last report, at most
once a second, because every report is a log line the frontend must parse.
"""

from __future__ import annotations

import time

from llama_engine import EngineStats

COUNTERS = {
    "llama_tokens_generated": "tokens_generated",
    "llama_prompt_tokens_evaluated": "tokens_prefilled",
    "llama_prompt_tokens_reused": "tokens_reused",
    "llama_decode_steps": "decode_calls",
    "llama_sequences_decoded": "sequences_decoded",
}


class MetricsReporter:
    def __init__(self, metrics, model_name: str, interval_s: float = 1.0):
        self.metrics = metrics
        self.model_name = model_name
        self.interval_s = interval_s
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
        if self.metrics is None or (not force and now - self.last_report < self.interval_s):
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
            if value is not None:
                self.metrics.add_metric(name, value, unit, None, dims(), MetricTypes.GAUGE)

        for name, attr in COUNTERS.items():
            counter(name, getattr(stats, attr))
        for reason, total in stats.finished.items():
            counter("llama_requests_finished", total, Reason=reason)
        gauge("llama_slots_active", stats.slots_active)
        gauge("llama_slots_free", stats.slots_free)
        gauge("llama_time_to_first_token_ms", self.last_ttft_ms, "ms")
        gauge("llama_tokens_per_second", self.last_tps)
