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


@dataclass(frozen=True)
class MetricNames:
    handler_counters: tuple[str, ...]
    handler_gauges: tuple[str, ...]
    torchserve_counters: tuple[str, ...]
    torchserve_gauges: tuple[str, ...]

    @property
    def counters(self) -> tuple[str, ...]:
        return self.handler_counters + self.torchserve_counters


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
