"""What one metrics report costs the worker: handler/llama_metrics.py's MetricsReporter through
TorchServe's own Python metrics cache (metrics.yaml), its lines logged as a worker logs them
(here to /dev/null; in a worker they go down a pipe to the frontend, which parses each).

    .venv/bin/python bench/bench_metrics_report.py [--reports 2000] [--slots 8]

Prints, side by side: a report while answers stream (every slot's context grows) and a report
after an answer finished (its figures move the histogram buckets), in ms and lines each. Why
the handler forces a report only when a call leaves the engine idle (llama_handler.handle).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "handler"))

from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl  # noqa: E402

from answer_timings import AnswerTimings  # noqa: E402
from llama_engine import EngineStats, SlotState, SlotStats  # noqa: E402
from llama_metrics import MetricsReporter  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reports", type=int, default=2000)
    parser.add_argument("--slots", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(stream=open("/dev/null", "w"), level=logging.INFO, format="%(message)s")
    cache = MetricsCacheYamlImpl(config_file_path=str(ROOT / "metrics.yaml"))
    cache.initialize_cache()
    cache.model_name, lines = "llama", [0]
    cache.set_request_ids("bench")
    add_metric = cache.add_metric

    def counted(*a, **kw):
        lines[0] += 1
        return add_metric(*a, **kw)

    cache.add_metric = counted
    reporter = MetricsReporter(cache, "llama")

    def streaming(step: int) -> EngineStats:
        return EngineStats(slots_total=args.slots, slots_active=args.slots, slots_generating=args.slots,
                           tokens_generated=step * args.slots,
                           slots=[SlotStats(SlotState.GENERATING, 100 + step, 0)] * args.slots)

    def measure(before_each) -> tuple[float, float]:
        lines[0] = 0
        started = time.perf_counter()
        for i in range(args.reports):
            before_each(i)
            reporter.report(streaming(step[0]), force=True)
            step[0] += 1
        return (time.perf_counter() - started) / args.reports * 1000, lines[0] / args.reports

    step = [0]
    reporter.report(streaming(0), force=True)   # every series once
    rows = [("while answers stream", measure(lambda i: None)),
            ("after an answer finished", measure(lambda i: reporter.observe_answer(AnswerTimings(
                prompt_n=10, cache_n=0, prompt_ms=5.0, prompt_per_second=2000.0, predicted_n=10,
                predicted_ms=100.0, predicted_per_second=1.0 + i % 3000, queue_ms=1.0 + i % 300,
                ttft_ms=20.0 + i % 9000, latency_ms=300.0 + i % 200_000))))]
    print(f"{args.slots} slots, {args.reports} reports each")
    print(f"{'report':<26} {'ms':>7} {'lines':>6}")
    for name, (ms, n) in rows:
        print(f"{name:<26} {ms:7.3f} {n:6.1f}")


if __name__ == "__main__":
    main()
