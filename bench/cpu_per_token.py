"""Where the CPU goes per generated token: TorchServe (its Java frontend, the Python worker) against
llama-server, and the load generator beside them, on this machine's cores.

    .venv/bin/python bench/cpu_per_token.py --llama-server PATH [--streams 1,8] [--max-tokens 128]
                                            [--worker-env OMP_WAIT_POLICY=PASSIVE] [--py-spy SECONDS]

Starts TorchServe as bench/bench_serving.py does (the default model, 16 slots, all cores) and
llama-server on the same GGUF, sends the same greedy load to each in turns, and reads each process's
CPU time (user + system, chatstack.process_stats) before and after. Prints, per server and
streams: tok/s, CPU ms per token of each process, and the cores in use on average. `--worker-env`
starts TorchServe (and so its workers) with that variable set. `--py-spy N` records the worker for N
seconds at the last streams value, idle time included, into a collapsed-stack file (needs py-spy: bench/requirements.txt) and prints the top frames.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from bench.bench_serving import bench_server, load, start_llama_server, stop_llama_server  # noqa: E402
from bench.loadgen import endpoint  # noqa: E402
from chatstack.process_stats import cpu_seconds  # noqa: E402
from chatstack.torchserve_process import free_port  # noqa: E402

def java_of(launcher: int) -> int:
    """TorchServe's Java process: `torchserve --foreground` runs it as a child."""
    for child in psutil.Process(launcher).children():
        if child.name() == "java":
            return child.pid
    raise RuntimeError(f"no java child of {launcher}")


def measure(url, key, n, max_tokens, pids: dict[str, int], sse=None, extra=None) -> dict:
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    client_before = cpu_seconds(os.getpid())
    t = time.monotonic()
    summary = load(url, key, n, max_tokens, sse=sse, extra=extra, rounds=2)
    wall = time.monotonic() - t
    tokens = summary["completion_tokens"]
    used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    used["load generator"] = cpu_seconds(os.getpid()) - client_before
    return {"tokens_per_s": summary["tokens_per_s"], "tokens": tokens, "wall_s": wall,
            "ms_per_token": {k: 1000 * v / tokens for k, v in used.items()},
            "cores": {k: v / wall for k, v in used.items()}}


def py_spy(pid: int, seconds: int, out: Path) -> None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")   # the venv's, unactivated
    subprocess.run([exe, "record", "-p", str(pid), "-d", str(seconds), "-f", "raw", "-o", str(out),
                    "--nonblocking", "--idle", "-r", "200"], check=False, capture_output=True)


def top_frames(collapsed: Path, n: int = 25) -> list[tuple[str, float]]:
    """Share of samples in which each function appears (inclusive)."""
    counts: collections.Counter = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, k = line.rpartition(" ")
        k = int(k)
        total += k
        for frame in set(stack.split(";")):
            counts[frame] += k
    return [(f, c / total) for f, c in counts.most_common(n)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-server")
    p.add_argument("--streams", default="1,8")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--worker-env", action="append", default=[], help="NAME=VALUE for TorchServe and its workers")
    p.add_argument("--py-spy", type=int, default=0, metavar="SECONDS")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cpu-per-token-"))
    saved_env = dict(os.environ)
    os.environ.update(dict(kv.split("=", 1) for kv in a.worker_env))
    server = bench_server(work, {"batchSize: 8 ": "batchSize: 16 ", "n_threads: 0 ": f"n_threads: {a.threads} "})
    server.start()
    os.environ.clear()
    os.environ.update(saved_env)
    lsrv = None
    try:
        client = server.client(timeout=600)
        key = client.keys.inference
        client.register("llama.mar", initial_workers=1)
        worker = client.describe_model("llama")[0]["workers"][0]["pid"]
        java = java_of(server.pid())
        url = endpoint(server.address("inference"), "llama")
        load(url, key, 2, 16, rounds=1)
        pids = {"TorchServe frontend (Java)": java, "worker (Python + llama.cpp)": worker}
        lpids, lurl, lextra = {}, None, {"stream_options": {"include_usage": True}}
        if a.llama_server:
            port = free_port()
            lsrv = start_llama_server(a.llama_server, port, 16, a.threads, 2048)
            lurl = f"http://127.0.0.1:{port}/v1/chat/completions"
            lpids = {"llama-server": lsrv.pid}
            load(lurl, None, 2, 16, sse=True, extra=lextra, rounds=1)
        print(f"{a.worker_env or 'no extra environment'}; load average {os.getloadavg()[0]:.2f}")
        print("| server | streams | tok/s | CPU ms per token (cores in use) |")
        print("|---|---:|---:|---|")
        for n in [int(x) for x in a.streams.split(",")]:
            for _ in range(2):
                r = measure(url, key, n, a.max_tokens, pids)
                parts = "; ".join(f"{k} {v:.2f} ({r['cores'][k]:.2f})" for k, v in r["ms_per_token"].items())
                print(f"| TorchServe | {n} | {r['tokens_per_s']:.1f} | {parts} |", flush=True)
                if lurl:
                    r = measure(lurl, None, n, a.max_tokens, lpids, sse=True, extra=lextra)
                    parts = "; ".join(f"{k} {v:.2f} ({r['cores'][k]:.2f})" for k, v in r["ms_per_token"].items())
                    print(f"| llama-server | {n} | {r['tokens_per_s']:.1f} | {parts} |", flush=True)
        if a.py_spy:
            out = work / "worker.collapsed"
            spy = threading.Thread(target=py_spy, args=(worker, a.py_spy, out))
            spy.start()
            n_spy = int(a.streams.split(",")[-1])
            while spy.is_alive():
                load(url, key, n_spy, a.max_tokens, rounds=1)
            spy.join()
            if out.exists():
                keep = ROOT / "bench" / "results" / f"worker-{n_spy}-streams.collapsed"
                shutil.copy(out, keep)
                print(f"\npy-spy, worker at {n_spy} streams ({keep}): share of wall-time samples per function "
                      "(inclusive, idle included)")
                for frame, share in top_frames(out):
                    print(f"{share:6.1%}  {frame}")
    finally:
        stop_llama_server(lsrv)
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
