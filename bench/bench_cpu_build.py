"""Which llama.cpp CPU build should the host use? Native-without-AMX (setup.sh) against the
image's portable baseline (deploy/Containerfile: GGML_NATIVE=OFF, AVX2/FMA/F16C).

    .venv/bin/python bench/bench_cpu_build.py [--streams 1,8] [--rounds 3] [--tokens 96]

The portable build is compiled once (about 6 minutes on 2 cores) into
~/.cache/llama-chat-torchserve/portable-<version>/ and installed beside, not into, .venv.
Both builds run the engine's raw greedy decode (no TorchServe) in turns, `--rounds`
times, so the machine's drift hits both alike; the table gives medians and the ratio.
"""

from __future__ import annotations

import argparse
import os
import json
import statistics
import subprocess
import sys
from pathlib import Path

import llama_cpp

ROOT = Path(__file__).resolve().parent.parent
PORTABLE_CMAKE_ARGS = "-DGGML_NATIVE=OFF"   # as deploy/Containerfile


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


DECODE = """
import json, sys, time
sys.path.insert(0, "handler")
from llama_engine import Engine, GenerationRequest, SamplingParams
from llama_settings import HandlerSettings, engine_config
streams, tokens = [int(x) for x in sys.argv[1].split(",")], int(sys.argv[2])
engine = Engine(sys.argv[3], engine_config(HandlerSettings(), batch_size=max(streams), n_workers=1, gpu_id=None))
greedy = SamplingParams(temperature=0, repeat_penalty=1.0)
out = {}
for n in streams:
    for i in range(n):
        engine.submit(f"{n}-{i}", GenerationRequest(engine.tokenize(f"Tell me a story about the number {i}."),
                                                    tokens, greedy, ignore_eos=True))
    engine.step()   # the prompts are read (one short chunk each)
    start, before = time.perf_counter(), engine.stats.tokens_generated
    while engine.is_busy():
        engine.step()
    out[n] = (engine.stats.tokens_generated - before) / (time.perf_counter() - start)
print(json.dumps(out))
"""


def run_engine_bench(pythonpath: Path | None, streams: str, tokens: int) -> dict[int, float]:
    """Greedy decode tok/s of the engine at each stream count, with the llama_cpp found first on
    `pythonpath` (None: the .venv's)."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    gguf = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = subprocess.run([sys.executable, "-c", DECODE, streams, str(tokens), str(gguf)], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    return {int(n): tps for n, tps in json.loads(out.splitlines()[-1]).items()}


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
