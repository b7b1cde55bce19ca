"""The console's view of the metrics over time: snapshots of TorchServe's Prometheus
samples, rates derived from counter deltas between them, and percentiles of the handler's
histograms over a window (bucket deltas, as PromQL's histogram_quantile over rate()).

The history is the server's, not a browser session's: one MetricsSampler per console
process reads /metrics in a background thread every few seconds, and every page and
session draws from that one ring buffer."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from chatstack.metric_names import (PROMPT_TOKENS_EVALUATED, PROMPT_TOKENS_REUSED, REQUESTS_FINISHED, SLOTS_ACTIVE,
                                    SLOTS_FREE, TIME_TO_FIRST_TOKEN_MS, TOKENS_GENERATED, TOKENS_PER_SECOND,
                                    Histogram, declared_metrics)
from chatstack.torchserve_client import TorchServeClient


@dataclass
class MetricsSnapshot:
    at: float                              # time.time() when read
    totals: dict[str, float]               # sample values summed over labels
    finished_by_reason: dict[str, float]   # REQUESTS_FINISHED by Reason
    buckets: dict[str, dict[float, float]] = field(default_factory=dict)   # histogram -> {le: cumulative count}


# Gauges of one request's figures (the handler reports them per worker): averaged over the
# workers, where counters and slot gauges add up.
AVERAGED = {TIME_TO_FIRST_TOKEN_MS, TOKENS_PER_SECOND}


def snapshot(client: TorchServeClient) -> MetricsSnapshot:
    return snapshot_of(client.metric_samples())


def snapshot_of(samples: list[tuple[str, dict[str, str], float]], at: float | None = None) -> MetricsSnapshot:
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    finished: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    bucket_names = {h.bucket: h.name for h in declared_metrics().handler_histograms}
    for name, labels, value in samples:
        totals[name] = totals.get(name, 0.0) + value
        counts[name] = counts.get(name, 0) + 1
        if name == REQUESTS_FINISHED:
            reason = labels.get("Reason", "?")
            finished[reason] = finished.get(reason, 0.0) + value
        if name in bucket_names and "le" in labels:
            by_bound = buckets.setdefault(bucket_names[name], {})
            bound = float(labels["le"])   # "+Inf" reads as inf
            by_bound[bound] = by_bound.get(bound, 0.0) + value
    for name in AVERAGED & totals.keys():
        totals[name] /= counts[name]
    return MetricsSnapshot(at=time.time() if at is None else at, totals=totals, finished_by_reason=finished,
                           buckets=buckets)


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The q-quantile (0..1) of a histogram's cumulative bucket counts, interpolated linearly
    within the bucket it falls in (as Prometheus' histogram_quantile). None without observations;
    a quantile in the +Inf bucket is the highest finite bound."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def slots_by_worker(samples: list[tuple[str, dict[str, str], float]]) -> dict[int, tuple[int, int]]:
    """Each worker's (slots in use, slots free), by worker pid, from the handler's per-worker gauges."""
    slots: dict[int, list[int]] = {}
    for name, labels, value in samples:
        if name in (SLOTS_ACTIVE, SLOTS_FREE) and labels.get("WorkerPid", "").isdigit():
            pair = slots.setdefault(int(labels["WorkerPid"]), [0, 0])
            pair[name == SLOTS_FREE] = int(value)
    return {pid: (active, free) for pid, (active, free) in slots.items()}


class MetricsHistory:
    """The last KEEP snapshots, and rates and percentiles derived from the counters between them."""
    KEEP = 720   # an hour at MetricsSampler's 5 s

    def __init__(self):
        self.snapshots: list[MetricsSnapshot] = []
        self._lock = threading.Lock()   # the sampler thread adds while pages read

    def add(self, snap: MetricsSnapshot) -> None:
        # A counter going down means the server restarted: the old history no longer adds up.
        counters = declared_metrics().counters
        with self._lock:
            if self.snapshots and any(snap.totals.get(k, 0) < v for k, v in self.snapshots[-1].totals.items()
                                      if k in counters):
                self.snapshots.clear()
            self.snapshots.append(snap)
            del self.snapshots[:-self.KEEP]

    def _copy(self) -> list[MetricsSnapshot]:
        with self._lock:
            return list(self.snapshots)

    @property
    def latest(self) -> MetricsSnapshot | None:
        snaps = self._copy()
        return snaps[-1] if snaps else None

    def rate(self, name: str) -> float | None:
        """Per-second increase of a counter over the last two snapshots."""
        snaps = self._copy()
        if len(snaps) < 2:
            return None
        a, b = snaps[-2], snaps[-1]
        return (b.totals.get(name, 0.0) - a.totals.get(name, 0.0)) / (b.at - a.at) if b.at > a.at else None

    def rows(self, since_s: float | None = None) -> list[dict]:
        """One row per snapshot (of the last `since_s` seconds): time, generated and prompt
        tokens/s (from counter deltas), the handler's gauges."""
        snaps = self._copy()
        rows = []
        for prev, cur in zip([None] + snaps[:-1], snaps):
            if since_s is not None and cur.at < snaps[-1].at - since_s:
                continue
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

    def quantiles(self, histogram: Histogram, window_s: float,
                  qs: tuple[float, ...] = (0.5, 0.95)) -> dict[float, float | None]:
        """Percentiles of the requests that finished in the last `window_s` seconds, {q: value or None}."""
        snaps = self._copy()
        if not snaps:
            return {q: None for q in qs}
        start = next((s for s in snaps if s.at >= snaps[-1].at - window_s), snaps[-1])
        return _window_quantiles(histogram, start, snaps[-1], qs)

    def quantile_rows(self, histogram: Histogram, window_s: float, since_s: float | None = None) -> list[dict]:
        """p50 and p95 over the `window_s` before each snapshot (of the last `since_s` seconds):
        rows {time, series ('p50', 'p95'), value} for a chart; points without requests are left out."""
        snaps = self._copy()
        rows, first = [], 0
        for snap in snaps:
            while snaps[first].at < snap.at - window_s:   # the window's start only moves forward
                first += 1
            if since_s is not None and snap.at < snaps[-1].at - since_s:
                continue
            for q, value in _window_quantiles(histogram, snaps[first], snap).items():
                if value is not None:
                    rows.append({"time": snap.at, "series": f"p{round(q * 100)}", "value": value})
        return rows


def _window_quantiles(histogram: Histogram, start: MetricsSnapshot, end: MetricsSnapshot,
                      qs: tuple[float, ...] = (0.5, 0.95)) -> dict[float, float | None]:
    """Percentiles of the requests counted between two snapshots (the bucket counts' difference).
    The earliest snapshot is the baseline: what finished before it is in no window."""
    now, then = end.buckets.get(histogram.name, {}), start.buckets.get(histogram.name, {})
    window = {bound: count - then.get(bound, 0.0) for bound, count in now.items()} if start is not end else {}
    return {q: histogram_quantile(q, window) for q in qs}


class MetricsSampler:
    """Reads the server's metrics every `interval_s` in a background thread into one
    MetricsHistory, so every page and browser session shows the same history, and it goes on
    while no page is open. `read` returns a snapshot, or None when the server is not running;
    a failed read skips that sample."""

    def __init__(self, read: Callable[[], MetricsSnapshot | None], interval_s: float = 5.0):
        self.read, self.interval_s = read, interval_s
        self.history = MetricsHistory()
        self.last_error: str | None = None
        self.first_sample = threading.Event()   # set once the first read is over (whatever it gave)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="metrics-sampler")

    def start(self) -> "MetricsSampler":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def sample(self) -> None:
        try:
            snap = self.read()
        except Exception as e:  # noqa: BLE001 - a server going away must not end the thread
            self.last_error = f"{type(e).__name__}: {e}"
            return
        self.last_error = None
        if snap is not None:
            self.history.add(snap)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self.first_sample.set()
            self._stop.wait(self.interval_s)


def prompt_cache_reuse(totals: dict[str, float]) -> float | None:
    """Share of prompt tokens that came from the cache instead of being evaluated."""
    reused = totals.get(PROMPT_TOKENS_REUSED, 0.0)
    evaluated = totals.get(PROMPT_TOKENS_EVALUATED, 0.0)
    return reused / (reused + evaluated) if reused + evaluated else None
