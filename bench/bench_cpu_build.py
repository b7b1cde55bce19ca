"""Which llama.cpp CPU build should the host use? Native-without-AMX (setup.sh) against the
image's portable baseline (deploy/Containerfile: GGML_NATIVE=OFF, AVX2/FMA/F16C).

    .venv/bin/python bench/bench_cpu_build.py [--streams 1,8] [--rounds 3] [--tokens 96]

The portable build is compiled once (about 6 minutes on 2 cores) into
~/.cache/llama-chat-torchserve/portable-<version>/ and installed beside, not into, .venv.
Both builds run bench/bench_engine.py (raw engine decode, greedy) in turns, `--rounds`
times, so the machine's drift hits both alike; the table gives medians and the ratio.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import llama_cpp

ROOT = Path(__file__).resolve().parent.parent
PORTABLE_CMAKE_ARGS = "-DGGML_NATIVE=OFF"   # as deploy/Containerfile
ROW = re.compile(r"^\| (\d+) \| ([\d.]+) \|")


def portable_build() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llama-chat-torchserve"
    target = cache / f"portable-{llama_cpp.__version__}"
    if not (target / "llama_cpp").is_dir():
        wheels = cache / f"portable-wheel-{llama_cpp.__version__}"
        print(f"compiling the portable build ({PORTABLE_CMAKE_ARGS}) into {target} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-cache-dir", "--no-deps",
                        "--no-binary", "llama-cpp-python", f"llama-cpp-python=={llama_cpp.__version__}",
                        "-w", str(wheels)], env={**os.environ, "CMAKE_ARGS": PORTABLE_CMAKE_ARGS}, check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        *map(str, wheels.glob("llama_cpp_python-*.whl"))], check=True)
    return target


def run_engine_bench(pythonpath: Path | None, streams: str, tokens: int) -> dict[int, float]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_engine.py"), "--streams", streams,
                          "--tokens", str(tokens)], env=env, capture_output=True, text=True, check=True).stdout
    return {int(m[1]): float(m[2]) for m in map(ROW.match, out.splitlines()) if m}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=96)
    args = parser.parse_args(argv)
    builds = {"native without AMX (setup.sh)": None, "portable AVX2 (image)": portable_build()}
    runs: dict[str, list[dict[int, float]]] = {name: [] for name in builds}
    for _ in range(args.rounds):
        for name, path in builds.items():
            runs[name].append(run_engine_bench(path, args.streams, args.tokens))
    streams = [int(s) for s in args.streams.split(",")]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{cpu}, {os.cpu_count()} cores; raw engine decode, {args.tokens} greedy tokens per sequence, "
          f"median of {args.rounds} interleaved runs")
    print("| build | " + " | ".join(f"{n} stream{'s' * (n > 1)} tok/s" for n in streams) + " |")
    print("|---|" + "---:|" * len(streams))
    medians = {name: {n: statistics.median(r[n] for r in rs) for n in streams} for name, rs in runs.items()}
    for name, row in medians.items():
        print(f"| {name} | " + " | ".join(f"{row[n]:.1f}" for n in streams) + " |")
    native, portable = medians.values()
    print("| native / portable | " + " | ".join(f"{native[n] / portable[n]:.2f}x" for n in streams) + " |")


if __name__ == "__main__":
    main()
