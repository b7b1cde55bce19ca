#!/usr/bin/env python3
"""Figures behind the InferenceService's scale target: one "pod" (TorchServe started from a KServe
layout exactly as the ServingRuntime starts it, deploy/kserve_pod.py) under 1, 2, 4, ...
concurrent streaming chats, with bench/loadgen.py.

    .venv/bin/python bench/bench_pod.py [--layout DIR] [-c 1 2 4 6 8 12] [--max-tokens 128]

Without --layout it writes one with package_llama.sh --config deploy/kserve/model-config-cpu.yaml.
Prints a Markdown table (deploy/README.md, "Scale").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import LoadSpec, endpoint, run_load, summarize  # noqa: E402
from deploy.kserve_pod import PodServer  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", type=Path)
    p.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1, 2, 4, 6, 8, 12])
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-pod-"))
    layout = args.layout
    if layout is None:
        layout = work / "layout"
        (work / "tmp").mkdir()
        subprocess.run([str(ROOT / "package_llama.sh"), "--model-store", str(work / "store"), "--config",
                        str(ROOT / "deploy" / "kserve" / "model-config-cpu.yaml"), "--kserve", str(layout)],
                       check=True, stdout=subprocess.DEVNULL, env={**os.environ, "TMPDIR": str(work / "tmp")})
    (work / "pod").mkdir()
    server = PodServer(layout, work / "pod").start()
    try:
        url = endpoint(server.url("inference"), "llama")
        run_load(LoadSpec(url=url, concurrency=1, max_tokens=8, temperature=0))  # warm-up
        print("| chats in flight | aggregate tok/s | per-chat tok/s (p50) | TTFT p50 / p95 (s) |")
        print("|---|---|---|---|")
        for c in args.concurrency:
            results, wall = run_load(LoadSpec(url=url, concurrency=c, max_tokens=args.max_tokens, temperature=0))
            s = summarize(results, wall)
            assert s["errors"] == 0, s["first_errors"]
            print(f"| {c} | {s['tokens_per_s']:.1f} | {s['stream_tokens_per_s_p50']:.1f} | "
                  f"{s['ttft_p50_s']:.2f} / {s['ttft_p95_s']:.2f} |", flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
