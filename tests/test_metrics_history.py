"""The console's metrics history (chatstack/metrics_history.py) without a server: histogram
percentiles over a window, the shared background sampler."""

from __future__ import annotations

import math
import time

import pytest

from chatstack.metric_names import REQUEST_TIME_TO_FIRST_TOKEN_MS as TTFT
from chatstack.metrics_history import MetricsHistory, MetricsSampler, MetricsSnapshot, histogram_quantile, snapshot_of


def ttft_samples(counts: dict[str, float]) -> list[tuple[str, dict[str, str], float]]:
    """A /metrics page's TTFT buckets (cumulative), split over two hosts' series as TorchServe may."""
    return [(TTFT.bucket, {"le": le, "ModelName": "llama", "Hostname": h}, n / 2) for le, n in counts.items()
            for h in ("a", "b")] + [("llama_tokens_generated", {"ModelName": "llama"}, 7.0)]


def test_a_snapshot_sums_each_bucket_over_its_other_labels():
    snap = snapshot_of(ttft_samples({"100": 2, "500": 6, "+Inf": 8}), at=1.0)
    assert snap.buckets[TTFT.name] == {100.0: 2.0, 500.0: 6.0, math.inf: 8.0}
    assert snap.totals["llama_tokens_generated"] == 7.0


def test_histogram_quantiles_interpolate_within_the_bucket_as_prometheus_does():
    buckets = {100.0: 2.0, 500.0: 6.0, 1000.0: 8.0, math.inf: 8.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(100 + 400 * (4 - 2) / 4)   # rank 4 of 8
    assert histogram_quantile(0.25, buckets) == pytest.approx(100.0)
    assert histogram_quantile(0.95, buckets) == pytest.approx(500 + 500 * (7.6 - 6) / 2)
    assert histogram_quantile(0.99, {100.0: 1.0, math.inf: 3.0}) == 100.0   # in +Inf: the highest finite bound
    assert histogram_quantile(0.5, {100.0: 0.0, math.inf: 0.0}) is None
    assert histogram_quantile(0.5, {}) is None


def test_percentiles_count_only_the_requests_of_the_window():
    history = MetricsHistory()
    # 10 fast answers long ago, then 10 slow ones within the last minute.
    history.add(snapshot_of(ttft_samples({"100": 10, "1000": 10, "+Inf": 10}), at=1000.0))
    history.add(snapshot_of(ttft_samples({"100": 10, "1000": 10, "+Inf": 10}), at=1290.0))
    history.add(snapshot_of(ttft_samples({"100": 10, "1000": 20, "+Inf": 20}), at=1300.0))
    last_minute = history.quantiles(TTFT, window_s=60)
    assert last_minute[0.5] == pytest.approx(100 + 900 * 0.5) and last_minute[0.95] > 900
    # The earliest sample is the baseline: what finished before the console sampled is not in any window.
    assert history.quantiles(TTFT, window_s=3600) == last_minute
    rows = history.quantile_rows(TTFT, window_s=20)
    assert [r["time"] for r in rows] == [1300.0, 1300.0]   # nothing finished in 1270..1290: no point there
    rows = history.quantile_rows(TTFT, window_s=60)
    assert {r["series"] for r in rows} == {"p50", "p95"} and rows[-1]["time"] == 1300.0
    assert [r["value"] for r in rows if r["series"] == "p50"] == [last_minute[0.5]]


def test_no_requests_yet_gives_no_percentiles_rather_than_zero():
    history = MetricsHistory()
    assert history.quantiles(TTFT, 300) == {0.5: None, 0.95: None}
    history.add(snapshot_of([], at=1.0))
    assert history.quantiles(TTFT, 300) == {0.5: None, 0.95: None}
    assert history.quantile_rows(TTFT, 300) == []


def test_the_sampler_fills_one_history_in_the_background_and_survives_a_failed_read():
    reads = []

    def read():
        reads.append(1)
        if len(reads) == 2:
            raise ConnectionError("the server went away")
        if len(reads) == 3:
            return None   # stopped: nothing to add
        return MetricsSnapshot(float(len(reads)), {"llama_tokens_generated": float(len(reads))}, {})

    sampler = MetricsSampler(read, interval_s=0.01).start()
    deadline = time.monotonic() + 5
    while len(sampler.history.snapshots) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    sampler.stop()
    assert [s.at for s in sampler.history.snapshots[:3]] == [1.0, 4.0, 5.0]
