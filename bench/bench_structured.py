"""Does a constrained request slow the others? 8 streams where half ask for a json_schema
answer, against 8 free streams, on one continuous-batching TorchServe.

    .venv/bin/python bench/bench_structured.py [--streams 8] [--max-tokens 64] [--repeats 3]

Packs the default model with the repo's model-config.yaml and serves it from a TorchServe on
free ports (a temporary run folder). Load from bench/loadgen.py: streaming chats, 2 requests
per stream, the server's default sampling (temperature 0.7, top-k 40, ...). Every answer is
--max-tokens long, so both set-ups decode the same number of tokens per step: free streams
send ignore_eos, and the schema (a list of at least 40 short strings) cannot be finished
sooner. `free` = all streams free; `mixed` = half of them with response_format json_schema.
The two take turns --repeats times; the table shows each set-up's median run and the median of the
per-turn ratios mixed / free (the target: at least 0.9). About 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import DEFAULT_PROMPTS, LoadSpec, endpoint, run_load, summarize  # noqa: E402
from bench.bench_run import commit, default_model_store  # noqa: E402
from chatstack.torchserve_process import TorchServeProcess, free_port_overrides  # noqa: E402

SCHEMA = {"type": "object",
          "properties": {"ideas": {"type": "array", "minItems": 40,
                                   "items": {"type": "string", "minLength": 3, "maxLength": 40}}},
          "required": ["ideas"], "additionalProperties": False}
JSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "ideas", "schema": SCHEMA, "strict": True}}
JSON_PROMPTS = [f"{p} Answer in JSON: a list of short ideas." for p in DEFAULT_PROMPTS]


def run_together(specs: list[LoadSpec]) -> dict:
    """Run several loads at once (each with its own streams); one summary over all of them."""
    results, threads = [], []
    lock = threading.Lock()

    def one(spec):
        got, _ = run_load(spec)
        with lock:
            results.extend(got)

    start = time.monotonic()
    threads = [threading.Thread(target=one, args=(spec,), daemon=True) for spec in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(results, time.monotonic() - start)


def specs(url: str, key: str, streams: int, max_tokens: int, constrained: int) -> list[LoadSpec]:
    common = {"url": url, "key": key, "requests_per_stream": 2, "max_tokens": max_tokens, "timeout": 300}
    out = [LoadSpec(concurrency=streams - constrained, extra={"ignore_eos": True}, **common)]
    if constrained:
        out.append(LoadSpec(concurrency=constrained, prompts=JSON_PROMPTS, extra={"response_format": JSON_FORMAT},
                            **common))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-structured-"))
    store = default_model_store(work)
    server = TorchServeProcess(ROOT / "config.properties", store, work / "run", overrides=free_port_overrides())
    server.start()
    load = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {"free": [], "mixed": []}
    try:
        client = server.client(timeout=300)
        client.register("llama.mar")
        client.wait_for_workers("llama", count=1)
        url, key = endpoint(server.address("inference"), "llama"), client.keys.inference
        run_together(specs(url, key, 2, 16, 1))   # warm-up
        for _ in range(args.repeats):
            for name, constrained in (("free", 0), ("mixed", args.streams // 2)):
                runs[name].append(run_together(specs(url, key, args.streams, args.max_tokens, constrained)))
                print(name, round(runs[name][-1]["tokens_per_s"], 1), runs[name][-1]["finish_reasons"],
                      runs[name][-1]["first_errors"], flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    ratios = [m["tokens_per_s"] / f["tokens_per_s"] for f, m in zip(runs["free"], runs["mixed"])]
    median = {name: sorted(r, key=lambda s: s["tokens_per_s"])[len(r) // 2] for name, r in runs.items()}
    print(f"\n{datetime.date.today().isoformat()}, commit {commit()}, {os.cpu_count()} cores (1-minute load average "
          f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end), default model, {args.streams} streaming "
          f"chats x 2 requests, max_tokens {args.max_tokens}, server sampling defaults; median of {args.repeats} "
          "runs, the set-ups taking turns.\n")
    print("| set-up | tok/s | TTFT p50 / p95 (s) | errors |\n|---|---:|---:|---:|")
    for name, label in (("free", f"{args.streams} free"), ("mixed", f"{args.streams // 2} json_schema + "
                                                                     f"{args.streams - args.streams // 2} free")):
        s = median[name]
        print(f"| {label} | {s['tokens_per_s']:.1f} | {s['ttft_p50_s'] or 0:.2f} / {s['ttft_p95_s'] or 0:.2f} | "
              f"{s['errors']} |")
    print(f"\nmixed / free: {statistics.median(ratios):.2f} (per turn: {', '.join(f'{r:.2f}' for r in ratios)})")
    return 0 if all(s["errors"] == 0 for r in runs.values() for s in r) else 1


if __name__ == "__main__":
    sys.exit(main())
