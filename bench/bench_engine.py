"""Raw engine decode speed: N sequences stepped together, no TorchServe, no HTTP.

    .venv/bin/python bench/bench_engine.py [--gguf PATH] [--streams 1,8,16] [--tokens 128] [--threads 2]

The ceiling for the serving figures: what handler/llama_engine.py's Engine decodes
on this machine when nothing else runs. Each sequence gets a short chat prompt
(prefill is not timed) and then `--tokens` greedy tokens with end-of-generation
ignored, so every step decodes exactly N sequences. Prints tokens/s, the time of
one step and how much of it is `llama_decode`, and the speed-up over one sequence.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "handler"))

import llama_cpp  # noqa: E402
import llama_engine  # noqa: E402
from chat_prompt import ChatPrompter  # noqa: E402
from llama_engine import Engine, EngineConfig, GenerationRequest, SamplingParams  # noqa: E402

from bench.loadgen import DEFAULT_PROMPTS  # noqa: E402


def steady_decode(engine: Engine, prompter: ChatPrompter, n: int, tokens: int) -> dict:
    decode_s = [0.0]
    real_decode = llama_cpp.llama_decode

    def timed_decode(*args):
        t = time.perf_counter()
        rc = real_decode(*args)
        decode_s[0] += time.perf_counter() - t
        return rc

    greedy = SamplingParams(temperature=0, repeat_penalty=1.0)
    for i in range(n):
        prompt = prompter.tokens([{"role": "user", "content": f"{DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)]} ({i})"}])
        engine.submit(f"s{n}-{i}", GenerationRequest(prompt, tokens, greedy, ignore_eos=True))
    while engine.waiting or any(s.active and s.active.pending_prompt for s in engine.slots):
        engine.step()   # prefill, not timed
    llama_engine.llama_cpp.llama_decode = timed_decode
    try:
        generated, steps, start = engine.stats.tokens_generated, 0, time.perf_counter()
        while engine.is_busy():
            engine.step()
            steps += 1
        wall = time.perf_counter() - start
    finally:
        llama_engine.llama_cpp.llama_decode = real_decode
    done = engine.stats.tokens_generated - generated
    return {"streams": n, "tokens_per_s": done / wall, "step_ms": 1000 * wall / steps,
            "decode_ms": 1000 * decode_s[0] / steps}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--streams", default="1,8,16")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    args = parser.parse_args(argv)
    streams = [int(x) for x in args.streams.split(",")]
    engine = Engine(args.gguf, EngineConfig(n_slots=max(streams), n_ctx_per_slot=2048, n_threads=args.threads,
                                            n_gpu_layers=args.n_gpu_layers))
    # the GGUF's own chat template, as the handler renders it
    prompter = ChatPrompter(engine.metadata.get("tokenizer.chat_template"), engine.bos_text, engine.eos_text,
                            lambda text: engine.tokenize(text, add_special=False, parse_special=True))
    try:
        rows = [steady_decode(engine, prompter, n, args.tokens) for n in streams]
    finally:
        engine.close()
    base = rows[0]["tokens_per_s"]
    print(f"{Path(args.gguf).name}, {args.threads} threads, {args.tokens} greedy tokens per sequence")
    print("| sequences | tok/s | step (ms) | llama_decode (ms) | vs first row |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['streams']} | {r['tokens_per_s']:.1f} | {r['step_ms']:.1f} | {r['decode_ms']:.1f} | "
              f"{r['tokens_per_s'] / base:.2f}x |")


if __name__ == "__main__":
    main()
