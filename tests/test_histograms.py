"""The handler's per-request histograms (time to first token, queue wait, latency, tokens/s):
Prometheus histogram series written as counters, consistent with the answers behind them.

The unit tests run the reporter through TorchServe's own Python metrics cache (the one a
worker uses, configured by metrics.yaml) and read the lines it logs with the frontend's
own pattern; the end-to-end test reads a real TorchServe's /metrics."""

from __future__ import annotations

import logging
import math
import re
import time

import pytest
import requests
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

import llama_metrics
from answer_timings import AnswerTimings
from chatstack import metric_names
from chatstack.torchserve_client import parse_metric_samples
from conftest import ROOT
from llama_engine import EngineStats
from llama_metrics import BucketHistogram, MetricsReporter, le_label

# The frontend's pattern for a backend metric line (TorchServe 0.12.0, frontend/server/src/main/
# java/org/pytorch/serve/metrics/Metric.java), after its "[METRICS]" prefix.
FRONTEND_METRIC_LINE = re.compile(r"\s*([\w\s]+)\.([\w\s]+):([0-9\-,.e]+)\|#([^|]*)(\|#type:([^|,]+))?"
                                  r"\|#hostname:([^,]+),([^,]+)(,(.*))?")


def timings(ttft_ms=100.0, queue_ms=5.0, latency_ms=400.0, tokens_per_second=30.0) -> AnswerTimings:
    return AnswerTimings(prompt_n=10, cache_n=0, prompt_ms=ttft_ms - queue_ms, prompt_per_second=None,
                         predicted_n=10, predicted_ms=latency_ms - ttft_ms, predicted_per_second=tokens_per_second,
                         queue_ms=queue_ms, ttft_ms=ttft_ms, latency_ms=latency_ms)


def test_a_bucket_counts_every_observation_up_to_its_bound_and_inf_counts_all():
    histogram = BucketHistogram((10, 100))
    for value in (1, 10, 10.5, 100, 1000):
        histogram.observe(value)
    assert histogram.bounds == (10, 100, math.inf)
    assert histogram.cumulative == [2, 4, 5]
    assert (histogram.count, histogram.sum) == (5, 1121.5)
    assert [le_label(b) for b in histogram.bounds] == ["10", "100", "+Inf"]
    assert le_label(0.5) == "0.5" and le_label(300_000) == "300000"


def test_every_histogram_has_sorted_bounds_in_one_table():
    assert set(llama_metrics.HISTOGRAM_BUCKETS) == {h.name for h in metric_names.HISTOGRAMS}
    for bounds in llama_metrics.HISTOGRAM_BUCKETS.values():
        assert list(bounds) == sorted(set(bounds)) and bounds[0] > 0


class FrontendCounters:
    """What TorchServe's frontend makes of the worker's metric lines: each line parsed with its
    pattern, checked against metrics.yaml's declaration, added to a counter or set as a gauge."""

    def __init__(self):
        self.declared = {}
        for kind, specs in metric_names.yaml.safe_load(metric_names.METRICS_YAML.read_text())["model_metrics"].items():
            for spec in specs:
                self.declared[spec["name"]] = (kind, spec["dimensions"])
        self.values: dict[tuple, float] = {}

    def read(self, records) -> int:
        lines = [r.getMessage() for r in records if r.getMessage().startswith("[METRICS]")]
        for line in lines:
            match = FRONTEND_METRIC_LINE.fullmatch(line.removeprefix("[METRICS]"))
            assert match, line
            name, value, dims, kind = match.group(1), float(match.group(3)), match.group(4), match.group(6)
            declared_kind, declared_dims = self.declared[name]
            pairs = [d.split(":") for d in dims.split(",")]
            assert [k for k, _ in pairs] == declared_dims and kind.lower() == declared_kind, line
            key = (name, tuple(v for _, v in pairs))
            self.values[key] = self.values.get(key, 0.0) + value if kind == "COUNTER" else value
        return len(lines)

    def series(self, name: str) -> dict[tuple, float]:
        return {labels: v for (n, labels), v in self.values.items() if n == name}


@pytest.fixture
def reporter():
    cache = MetricsCacheYamlImpl(config_file_path=str(ROOT / "metrics.yaml"))
    cache.initialize_cache()
    cache.model_name = "llama"
    cache.set_request_ids("load")
    return MetricsReporter(cache, "llama")


def test_reported_buckets_sum_and_count_are_a_prometheus_histogram_of_the_answers(reporter, caplog):
    caplog.set_level(logging.INFO, logger="ts.metrics")
    frontend = FrontendCounters()
    answers = [timings(ttft_ms=3), timings(ttft_ms=100), timings(ttft_ms=100.5), timings(ttft_ms=400_000)]
    for answer in answers[:2]:
        reporter.observe_answer(answer)
    reporter.observe_answer(None)    # a failed answer counts nowhere
    reporter.report(EngineStats(slots_total=2), force=True)
    for answer in answers[2:]:
        reporter.observe_answer(answer)
    reporter.report(EngineStats(slots_total=2), force=True)
    frontend.read(caplog.records)

    name = llama_metrics.REQUEST_TIME_TO_FIRST_TOKEN_MS
    buckets = {labels[2]: v for labels, v in frontend.series(name + "_bucket").items()}
    bounds = [le_label(b) for b in (*llama_metrics.MS_BUCKETS, math.inf)]
    assert list(buckets) == bounds, "every bucket is reported, empty ones as 0"
    counts = [buckets[b] for b in bounds]
    assert counts == sorted(counts) and counts[-1] == 4
    assert [buckets["5"], buckets["100"], buckets["250"], buckets["300000"]] == [1, 2, 3, 3]
    assert frontend.series(name + "_count") == {("llama", "Model"): 4}
    assert frontend.series(name + "_sum")[("llama", "Model")] == pytest.approx(3 + 100 + 100.5 + 400_000)
    tps = frontend.series(llama_metrics.REQUEST_TOKENS_PER_SECOND + "_bucket")
    assert tps[("llama", "Model", "20")] == 0 and tps[("llama", "Model", "50")] == 4


def test_a_report_sends_only_what_changed(reporter, caplog):
    caplog.set_level(logging.INFO, logger="ts.metrics")
    stats = EngineStats(slots_total=2)
    reporter.report(stats, force=True)
    assert FrontendCounters().read(caplog.records) > 0
    caplog.clear()
    reporter.report(stats, force=True)
    assert FrontendCounters().read(caplog.records) == 0, "nothing changed: no line"
    reporter.observe_answer(timings(ttft_ms=7))
    reporter.report(stats, force=True)
    frontend = FrontendCounters()
    frontend.read(caplog.records)
    series = {s for h in metric_names.HISTOGRAMS for s in (h.bucket, h.sum, h.count)}
    assert {name for name, _ in frontend.values} == series, "only the histograms moved"
    ttft = metric_names.REQUEST_TIME_TO_FIRST_TOKEN_MS.bucket
    assert sorted(float(labels[2]) for labels in frontend.series(ttft)) == [
        b for b in (*llama_metrics.MS_BUCKETS, math.inf) if b >= 7]


def test_end_to_end_the_metrics_page_holds_a_histogram_of_the_answers_timings(torchserve):
    """After N answers, each histogram's count grew by N, its buckets by the answers at or below
    each bound (by the timings the answers carried), and +Inf equals the count."""
    client = torchserve.client(timeout=120)
    base = f"{torchserve.address('inference')}/predictions/llama"
    auth = {"Authorization": f"Bearer {client.keys.inference}"}
    before = histograms(client.metrics_text())
    answers = []
    for i, (path, body) in enumerate([
        ("", {"messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 8}),
        ("", {"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 12}),
        ("/1.0/v1/completions", {"prompt": "1, 2, 3,", "max_tokens": 6}),
        ("/1.0/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 5}),
    ]):
        resp = requests.post(base + path, json={**body, "temperature": 0}, headers=auth, timeout=120)
        assert resp.status_code == 200, resp.text
        answers.append(resp.json()["timings"])
    n = len(answers)

    deadline = time.monotonic() + 15   # the worker's metric lines reach the frontend through its log reader
    after = histograms(client.metrics_text())
    while after[metric_names.REQUEST_LATENCY_MS.name]["count"] < before[metric_names.REQUEST_LATENCY_MS.name]["count"] + n:
        assert time.monotonic() < deadline, (before, after)
        time.sleep(0.2)
        after = histograms(client.metrics_text())

    for histogram in metric_names.HISTOGRAMS:
        a, b = before[histogram.name], after[histogram.name]
        counts = [v for _, v in sorted(b["buckets"].items())]
        assert counts == sorted(counts), histogram.name
        assert b["buckets"][math.inf] == b["count"], histogram.name
        assert set(b["buckets"]) == {*llama_metrics.HISTOGRAM_BUCKETS[histogram.name], math.inf}
        if histogram is not metric_names.REQUEST_TOKENS_PER_SECOND:   # an answer of one token has no rate
            assert b["count"] - a["count"] == n, histogram.name
    for histogram, key in ((metric_names.REQUEST_TIME_TO_FIRST_TOKEN_MS, "ttft_ms"),
                           (metric_names.REQUEST_QUEUE_WAIT_MS, "queue_ms")):
        a, b = before[histogram.name], after[histogram.name]
        values = [t[key] for t in answers]
        assert b["sum"] - a["sum"] == pytest.approx(sum(values), abs=0.01)
        for bound, count in b["buckets"].items():
            assert count - a["buckets"].get(bound, 0) == sum(v <= bound for v in values), (histogram.name, bound)
    latency = after[metric_names.REQUEST_LATENCY_MS.name]["sum"] - before[metric_names.REQUEST_LATENCY_MS.name]["sum"]
    assert latency >= sum(t["ttft_ms"] for t in answers)


def histograms(text: str, model: str = "llama") -> dict[str, dict]:
    """Each handler histogram of one model as the metrics page shows it: {le: count}, sum, count."""
    samples = [(n, labels, v) for n, labels, v in parse_metric_samples(text) if labels.get("ModelName") == model]
    out = {}
    for histogram in metric_names.HISTOGRAMS:
        out[histogram.name] = {
            "buckets": {float(labels["le"]): v for n, labels, v in samples if n == histogram.bucket},
            "sum": sum(v for n, _, v in samples if n == histogram.sum),
            "count": sum(v for n, _, v in samples if n == histogram.count),
        }
    return out
