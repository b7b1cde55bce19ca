"""What does the OpenAI gateway cost? 8 streaming chats straight to TorchServe's OpenAI route
(/predictions/llama/{version}/v1/chat/completions) against the same 8 through the gateway
(/v1/chat/completions), taking turns in one run.

    .venv/bin/python bench/bench_gateway.py [--streams 8] [--max-tokens 64] [--rounds 5]

Packs the default model with the repo's model-config.yaml and starts TorchServe and the gateway
the way `python -m chatstack start` does (chatstack.server_lifecycle.start_server), on free ports
in a temporary run folder. Load from bench/loadgen.py: the same bodies on both routes (greedy,
`ignore_eos`, so every answer is --max-tokens long and both decode the same tokens per step),
2 requests per stream. Each round runs both routes, the order alternating between rounds so a
drift in the machine's load favours neither; the table shows each route's median run and the median
of the per-round ratios gateway / direct (the target: at least 0.97).

On a machine shared with other work the per-round ratios swing by more than the gateway can
cost, so CPU time is counted too, which other work does not disturb: the gateway's per token,
and TorchServe's (frontend and workers) per token on each route. Where the cores are the
bottleneck (llama.cpp keeps them busy), the gateway's share of the CPU the serving takes is what
it can take from the decode.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import GREEDY, LoadSpec, endpoint, run_load, summarize  # noqa: E402
from bench.bench_run import commit, default_model_store  # noqa: E402
from chatstack.gateway_process import ADDRESS_PROPERTY, GatewayProcess  # noqa: E402
from chatstack.server_lifecycle import start_server, stop_server  # noqa: E402
from chatstack.torchserve_process import TorchServeProcess, free_port, free_port_overrides  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    store = default_model_store(work)
    overrides = {**free_port_overrides(), ADDRESS_PROPERTY: f"http://127.0.0.1:{free_port()}"}
    server = TorchServeProcess(ROOT / "config.properties", store, work / "run", overrides=overrides)
    load = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {"direct": [], "gateway": []}
    cpu_s = {"gateway": 0.0, "torchserve direct": 0.0, "torchserve gateway": 0.0}
    tokens = {"direct": 0, "gateway": 0}
    try:
        start_server(server, on_step=lambda step: print(step, flush=True))
        gateway = GatewayProcess(server)
        if not gateway.is_running():
            raise SystemExit("the gateway did not start: " + " | ".join(gateway.log_tail(5)))
        gateway_proc = psutil.Process(gateway.pid())
        torchserve_proc = psutil.Process(server.pid())

        def torchserve_cpu() -> float:
            """CPU seconds of TorchServe's process tree (the launcher, the Java frontend, the workers)."""
            total = 0.0
            for proc in [torchserve_proc, *torchserve_proc.children(recursive=True)]:
                try:
                    total += sum(proc.cpu_times()[:2])
                except psutil.Error:
                    pass
            return total
        client = server.client(timeout=300)
        version = client.describe_model("llama")[0]["modelVersion"]
        key = client.keys.inference
        urls = {"direct": endpoint(server.address("inference"), "llama", "openai", version),
                "gateway": endpoint(gateway.address, "llama", "gateway")}

        def spec(route: str, streams: int, max_tokens: int) -> LoadSpec:
            return LoadSpec(url=urls[route], key=key, concurrency=streams, requests_per_stream=2,
                            max_tokens=max_tokens, timeout=300, extra={**GREEDY, "ignore_eos": True, "model": "llama"})

        # Warm-up at full width: a fresh worker's first 8-sequence batches are slow (6-7 tok/s
        # instead of ~100 in the first runs of this bench), which would count against one route.
        for route in urls:
            warm = summarize(*run_load(spec(route, args.streams, 16)))
            if warm["errors"]:
                raise SystemExit(f"{route} does not answer: {warm['first_errors']}")
        for n in range(args.rounds):
            for route in (("direct", "gateway") if n % 2 == 0 else ("gateway", "direct")):
                gateway_before, torchserve_before = sum(gateway_proc.cpu_times()[:2]), torchserve_cpu()
                runs[route].append(summarize(*run_load(spec(route, args.streams, args.max_tokens))))
                tokens[route] += runs[route][-1]["completion_tokens"]
                cpu_s[f"torchserve {route}"] += torchserve_cpu() - torchserve_before
                if route == "gateway":
                    cpu_s["gateway"] += sum(gateway_proc.cpu_times()[:2]) - gateway_before
                s = runs[route][-1]
                print(f"round {n + 1} {route}: {s['tokens_per_s']:.1f} tok/s, TTFT p50 {s['ttft_p50_s'] or 0:.2f} s, "
                      f"errors {s['errors']} {s['first_errors']}", flush=True)
    finally:
        stop_server(server)
        shutil.rmtree(work, ignore_errors=True)
    ratios = [g["tokens_per_s"] / d["tokens_per_s"] if d["tokens_per_s"] else float("nan")
              for d, g in zip(runs["direct"], runs["gateway"])]
    median = {route: sorted(r, key=lambda s: s["tokens_per_s"])[len(r) // 2] for route, r in runs.items()}
    print(f"\n{datetime.date.today().isoformat()}, commit {commit()}, {os.cpu_count()} cores (1-minute load average "
          f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end), default model, {args.streams} streaming "
          f"chats x 2 requests, {args.max_tokens} tokens each (greedy, ignore_eos); median of {args.rounds} rounds, "
          "the routes taking turns.\n")
    print("| route | tok/s | TTFT p50 / p95 (s) | errors |\n|---|---:|---:|---:|")
    for route, label in (("direct", "TorchServe /predictions/llama/VERSION/v1"), ("gateway", "gateway /v1")):
        s = median[route]
        print(f"| {label} | {s['tokens_per_s']:.1f} | {s['ttft_p50_s'] or 0:.2f} / {s['ttft_p95_s'] or 0:.2f} | "
              f"{s['errors']} |")
    print(f"\ngateway / direct: {statistics.median(ratios):.3f} (per round: {', '.join(f'{r:.3f}' for r in ratios)})")
    per_token = {what: 1000 * cpu_s[what] / max(tokens[what.split()[-1]], 1) for what in cpu_s}
    print(f"CPU time per token: TorchServe {per_token['torchserve direct']:.2f} ms direct, "
          f"{per_token['torchserve gateway']:.2f} ms on the gateway route, the gateway {per_token['gateway']:.3f} ms "
          f"({100 * per_token['gateway'] / (per_token['gateway'] + per_token['torchserve gateway']):.1f}% of the "
          "serving's CPU on that route)")
    return 0 if all(s["errors"] == 0 for r in runs.values() for s in r) else 1


if __name__ == "__main__":
    sys.exit(main())
