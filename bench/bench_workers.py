"""Workers on one continuous-batching model: 1 worker x all threads vs N workers x fewer threads.

    .venv/bin/python bench/bench_workers.py [--streams 8 16] [--max-tokens 48] [--repeats 3]

Packs the default model twice and serves both from one TorchServe (free ports, a temporary run
folder, torchserve_fix's ContinuousBatching as always with chatstack.TorchServeProcess):
`one` = 1 worker, --threads llama.cpp threads, batchSize = 2 x --slots; `two` = 2 workers,
--threads / 2 threads each, batchSize = --slots each (the same slots in total). For each number of
streams the two take turns --repeats times (bench/loadgen.py: streaming chats, 2 requests per
stream, greedy, ignore_eos so every answer is max_tokens long); the table shows the median run
of each, and for the two workers how their CPU time was split (an idle worker uses none).
Prints a markdown table. Bounded: no turn starts after --budget-s (about 3 minutes on 2 idle cores
with the defaults; a busy machine gets fewer turns).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import LoadSpec, endpoint, run_load, summarize  # noqa: E402
from bench.bench_run import commit  # noqa: E402
from chatstack.torchserve_process import TorchServeProcess, free_port_overrides  # noqa: E402

SAMPLING = {"temperature": 0, "repeat_penalty": 1.0, "ignore_eos": True}


def package(store: Path, name: str, workers: int, threads: int, slots: int) -> None:
    """The default model as NAME.mar with model-config.yaml's workers, threads and slots replaced."""
    text = (ROOT / "model-config.yaml").read_text()
    for old, new in (("minWorkers: 1 ", f"minWorkers: {workers} "), ("maxWorkers: 1 ", f"maxWorkers: {workers} "),
                     ("batchSize: 8 ", f"batchSize: {slots} "), ("n_threads: 0 ", f"n_threads: {threads} ")):
        if old not in text:
            raise SystemExit(f"model-config.yaml has no {old.strip()!r} to replace")
        text = text.replace(old, new)
    config = store / f"{name}-model-config.yaml"
    config.write_text(text)
    subprocess.run([str(ROOT / "package_llama.sh"), "--model-store", str(store), "--config", str(config),
                    "--name", name], check=True, capture_output=True)


def worker_cpu_s(client, model: str) -> dict[int, float]:
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for worker in client.describe_model(model)[0]["workers"]:
        fields = Path(f"/proc/{worker['pid']}/stat").read_text().rpartition(")")[2].split()
        out[int(worker["pid"])] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def measure(server: TorchServeProcess, model: str, streams: int, max_tokens: int) -> dict:
    client = server.client(timeout=60)
    before = worker_cpu_s(client, model)
    spec = LoadSpec(url=endpoint(server.address("inference"), model), key=client.keys.inference,
                    concurrency=streams, requests_per_stream=2, max_tokens=max_tokens, extra=SAMPLING,
                    timeout=120)
    results, wall = run_load(spec)
    summary = summarize(results, wall)
    used = {pid: cpu - before.get(pid, 0.0) for pid, cpu in worker_cpu_s(client, model).items()}
    total = sum(used.values()) or 1.0
    summary["cpu_split"] = sorted((round(100 * u / total) for u in used.values()), reverse=True)
    return summary


def render(rows: list[dict], args, load: tuple[float, float]) -> str:
    lines = [f"{datetime.date.today().isoformat()}, commit {commit()}, {os.cpu_count()} cores (1-minute load "
             f"average {load[0]:.1f} at the start, {load[1]:.1f} at the end), default model, greedy, max_tokens "
             f"{args.max_tokens} (ignore_eos), 2 streaming requests per stream; "
             + (f"median of {runs} runs" if (runs := min(r["runs"] for r in rows)) > 1 else "one run")
             + ", the two set-ups taking turns.", "",
             "| streams | workers x threads | slots | tok/s | TTFT p50 / p95 (s) | per-stream tok/s | worker CPU split | errors |",
             "|---:|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        s = r["summary"]
        split = " / ".join(f"{p}%" for p in s["cpu_split"])
        lines.append(f"| {r['streams']} | {r['setup']} | {r['slots']} | {s['tokens_per_s']:.1f} | "
                     f"{s['ttft_p50_s'] or 0:.2f} / {s['ttft_p95_s'] or 0:.2f} | "
                     f"{s['stream_tokens_per_s_p50'] or 0:.1f} | {split} | {s['errors']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=300,
                        help="start no further turn after this many seconds of measuring (default 300)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads in all (default 2)")
    parser.add_argument("--slots", type=int, default=8, help="slots per worker of the two-worker set-up")
    args = parser.parse_args(argv)
    setups = {"one": (1, args.threads, 2 * args.slots), "two": (2, max(1, args.threads // 2), args.slots)}
    work = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    store = work / "store"
    store.mkdir()
    for name, (workers, threads, slots) in setups.items():
        package(store, name, workers, threads, slots)
    server = TorchServeProcess(ROOT / "config.properties", store, work / "run", overrides=free_port_overrides())
    server.start()
    rows = []
    load_start = os.getloadavg()[0]
    try:
        client = server.client(timeout=300)
        for name, (workers, _, _) in setups.items():
            client.register(f"{name}.mar")
            client.wait_for_workers(name, count=workers)
            measure(server, name, 2, 16)  # warm-up
        runs = {(streams, name): [] for streams in args.streams for name in setups}
        started = time.monotonic()
        for turn in range(args.repeats):
            if turn and time.monotonic() - started > args.budget_s:
                print(f"budget of {args.budget_s:.0f} s spent: {turn} runs each", flush=True)
                break
            for streams, name in runs:
                summary = measure(server, name, streams, args.max_tokens)
                runs[streams, name].append(summary)
                print(streams, name, round(summary["tokens_per_s"], 1), summary["cpu_split"], flush=True)
        for (streams, name), done in runs.items():
            workers, threads, slots = setups[name]
            ordered = sorted(done, key=lambda s: s["tokens_per_s"])
            rows.append({"streams": streams, "setup": f"{workers} x {threads}", "slots": workers * slots,
                         "runs": len(done), "summary": ordered[len(ordered) // 2]})
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(render(rows, args, (load_start, os.getloadavg()[0])))
    return 0 if all(r["summary"]["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
