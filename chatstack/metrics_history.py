"""The console's view of the metrics over time: snapshots of TorchServe's Prometheus
samples, and rates derived from counter deltas between them."""

from __future__ import annotations

import time
from dataclasses import dataclass

from chatstack.metric_names import (PROMPT_TOKENS_EVALUATED, PROMPT_TOKENS_REUSED, REQUESTS_FINISHED, SLOTS_ACTIVE,
                                    SLOTS_FREE, TIME_TO_FIRST_TOKEN_MS, TOKENS_GENERATED, TOKENS_PER_SECOND,
                                    declared_metrics)
from chatstack.torchserve_client import TorchServeClient


@dataclass
class MetricsSnapshot:
    at: float                              # time.time() when read
    totals: dict[str, float]               # sample values summed over labels
    finished_by_reason: dict[str, float]   # REQUESTS_FINISHED by Reason


# Gauges of one request's figures (the handler reports them per worker): averaged over the
# workers, where counters and slot gauges add up.
AVERAGED = {TIME_TO_FIRST_TOKEN_MS, TOKENS_PER_SECOND}


def snapshot(client: TorchServeClient) -> MetricsSnapshot:
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    finished: dict[str, float] = {}
    for name, labels, value in client.metric_samples():
        totals[name] = totals.get(name, 0.0) + value
        counts[name] = counts.get(name, 0) + 1
        if name == REQUESTS_FINISHED:
            reason = labels.get("Reason", "?")
            finished[reason] = finished.get(reason, 0.0) + value
    for name in AVERAGED & totals.keys():
        totals[name] /= counts[name]
    return MetricsSnapshot(at=time.time(), totals=totals, finished_by_reason=finished)


def slots_by_worker(samples: list[tuple[str, dict[str, str], float]]) -> dict[int, tuple[int, int]]:
    """Each worker's (slots in use, slots free), by worker pid, from the handler's per-worker gauges."""
    slots: dict[int, list[int]] = {}
    for name, labels, value in samples:
        if name in (SLOTS_ACTIVE, SLOTS_FREE) and labels.get("WorkerPid", "").isdigit():
            pair = slots.setdefault(int(labels["WorkerPid"]), [0, 0])
            pair[name == SLOTS_FREE] = int(value)
    return {pid: (active, free) for pid, (active, free) in slots.items()}


class MetricsHistory:
    """The last KEEP snapshots, and rates derived from counter deltas between them."""
    KEEP = 180

    def __init__(self):
        self.snapshots: list[MetricsSnapshot] = []

    def add(self, snap: MetricsSnapshot) -> None:
        # A counter going down means the server restarted: the old history no longer adds up.
        counters = declared_metrics().counters
        if self.snapshots and any(snap.totals.get(k, 0) < v for k, v in self.snapshots[-1].totals.items()
                                  if k in counters):
            self.snapshots.clear()
        self.snapshots.append(snap)
        del self.snapshots[:-self.KEEP]

    def rate(self, name: str) -> float | None:
        """Per-second increase of a counter over the last two snapshots."""
        if len(self.snapshots) < 2:
            return None
        a, b = self.snapshots[-2], self.snapshots[-1]
        return (b.totals.get(name, 0.0) - a.totals.get(name, 0.0)) / (b.at - a.at) if b.at > a.at else None

    def rows(self) -> list[dict]:
        """One row per snapshot: time, generated and prompt tokens/s (from counter deltas), the handler's gauges."""
        rows = []
        for prev, cur in zip([None] + self.snapshots[:-1], self.snapshots):
            row = {"time": cur.at}
            for gauge in declared_metrics().handler_gauges:
                row[gauge] = cur.totals.get(gauge)
            if prev is not None and cur.at > prev.at:
                dt = cur.at - prev.at
                row["generated tokens/s"] = (cur.totals.get(TOKENS_GENERATED, 0.0)
                                             - prev.totals.get(TOKENS_GENERATED, 0.0)) / dt
                row["prompt tokens/s"] = (cur.totals.get(PROMPT_TOKENS_EVALUATED, 0.0)
                                          - prev.totals.get(PROMPT_TOKENS_EVALUATED, 0.0)) / dt
            else:
                row["generated tokens/s"] = row["prompt tokens/s"] = None
            rows.append(row)
        return rows


def prompt_cache_reuse(totals: dict[str, float]) -> float | None:
    """Share of prompt tokens that came from the cache instead of being evaluated."""
    reused = totals.get(PROMPT_TOKENS_REUSED, 0.0)
    evaluated = totals.get(PROMPT_TOKENS_EVALUATED, 0.0)
    return reused / (reused + evaluated) if reused + evaluated else None
