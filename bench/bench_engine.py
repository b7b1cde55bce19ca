"""Raw engine decode speed: N sequences stepped together, no TorchServe, no HTTP.

    .venv/bin/python bench/bench_engine.py [--gguf PATH] [--streams 1,8,16] [--tokens 128] [--threads 2]
                                           [--sampling greedy,sampled] [--json FILE]

The ceiling for the serving figures: what handler/llama_engine.py's Engine decodes
on this machine when nothing else runs. Each sequence gets a short chat prompt
(prefill is not timed) and then `--tokens` tokens with end-of-generation ignored, so
every step decodes exactly N sequences: greedy (no penalties, the argmax fast path)
or sampled with the chat defaults (bench/loadgen.py SAMPLED: temperature 0.7, top-p
0.95, top-k 40, min-p 0.05, repeat penalty 1.1), a seed per sequence.

Prints tokens/s and where one step's time goes: `llama_decode`, the token choice
(`Engine._choose_token`: the sampler chain or the argmax) and the rest (Python: the
batch, detokenizing, stop strings, updates).
"""

from __future__ import annotations

import argparse
import json
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
from llama_engine import Engine, GenerationRequest, SamplingParams  # noqa: E402
from llama_settings import HandlerSettings, engine_config  # noqa: E402

from bench.loadgen import DEFAULT_PROMPTS, SAMPLINGS  # noqa: E402


def sampling_params(name: str, seed: int) -> SamplingParams:
    return SamplingParams(**SAMPLINGS[name], seed=seed)


def steady_decode(engine: Engine, prompter: ChatPrompter, n: int, tokens: int, sampling: str = "greedy") -> dict:
    """N sequences prefilled, then stepped until each has `tokens` tokens; only the decode steps are timed."""
    decode_s, choose_s = [0.0], [0.0]
    real_decode = llama_cpp.llama_decode
    real_choose = engine._choose_token

    def timed_decode(ctx, batch):
        t = time.perf_counter()
        rc = real_decode(ctx, batch)
        llama_cpp.llama_synchronize(ctx)   # on a GPU llama_decode returns before the work is done
        decode_s[0] += time.perf_counter() - t
        return rc

    def timed_choose(*args):
        t = time.perf_counter()
        token = real_choose(*args)
        choose_s[0] += time.perf_counter() - t
        return token

    for i in range(n):
        prompt = prompter.tokens([{"role": "user", "content": f"{DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)]} ({i})"}])
        engine.submit(f"{sampling}{n}-{i}", GenerationRequest(prompt, tokens, sampling_params(sampling, 1000 + i),
                                                               ignore_eos=True))
    while engine.waiting or any(s.active and s.active.pending_prompt for s in engine.slots):
        engine.step()   # prefill, not timed
    llama_engine.llama_cpp.llama_decode = timed_decode
    engine._choose_token = timed_choose
    try:
        generated, steps, start = engine.stats.tokens_generated, 0, time.perf_counter()
        while engine.is_busy():
            engine.step()
            steps += 1
        wall = time.perf_counter() - start
    finally:
        llama_engine.llama_cpp.llama_decode = real_decode
        del engine._choose_token
    done = engine.stats.tokens_generated - generated
    step_ms = 1000 * wall / steps
    decode_ms, choose_ms = 1000 * decode_s[0] / steps, 1000 * choose_s[0] / steps
    return {"sampling": sampling, "streams": n, "tokens_per_s": done / wall, "step_ms": step_ms,
            "decode_ms": decode_ms, "choose_ms": choose_ms, "other_ms": step_ms - decode_ms - choose_ms}


def table(rows: list[dict]) -> str:
    base = {r["sampling"]: r["tokens_per_s"] for r in reversed(rows)}   # each sampling's first row
    greedy = {r["streams"]: r["tokens_per_s"] for r in rows if r["sampling"] == "greedy"}
    lines = ["| sampling | sequences | tok/s | vs greedy | step (ms) | llama_decode (ms) | token choice (ms) "
             "| rest (ms) | vs first row |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        vs = f"{r['tokens_per_s'] / greedy[r['streams']]:.2f}x" if r["streams"] in greedy else "-"
        lines.append(f"| {r['sampling']} | {r['streams']} | {r['tokens_per_s']:.1f} | {vs} | {r['step_ms']:.2f} | "
                     f"{r['decode_ms']:.2f} | {r['choose_ms']:.2f} | {r['other_ms']:.2f} | "
                     f"{r['tokens_per_s'] / base[r['sampling']]:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--streams", default="1,8,16")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--sampling", default="greedy,sampled", help="comma-separated: greedy, sampled")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each row, interleaved; the median is shown")
    parser.add_argument("--backend-top-k", type=int, default=0,
                        help="K > 0: llama.cpp's backend sampling keeps each sequence's top K logits (a top-k "
                             "sampler attached to every slot) and the engine samples among those")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    streams = [int(x) for x in args.streams.split(",")]
    samplings = args.sampling.split(",")
    settings = HandlerSettings(n_threads=args.threads, n_gpu_layers=args.n_gpu_layers, n_ctx=1024, max_tokens=512)
    engine = Engine(args.gguf, engine_config(settings, batch_size=max(streams), n_workers=1, gpu_id=None))
    # the GGUF's own chat template, as the handler renders it
    prompter = ChatPrompter(engine.metadata.get("tokenizer.chat_template"), engine.bos_text, engine.eos_text,
                            lambda text: engine.tokenize(text, add_special=False, parse_special=True))
    runs: dict[tuple, list[dict]] = {}
    backend = None
    if args.backend_top_k:
        from bench.gpu_bench import BackendSampling
        backend = BackendSampling(engine, "backend-topk", args.backend_top_k)
    try:
        for _ in range(args.rounds):
            for n in streams:
                for s in samplings:
                    runs.setdefault((s, n), []).append(steady_decode(engine, prompter, n, args.tokens, s))
    finally:
        if backend:
            backend.close()
        engine.close()
    rows = [sorted(runs[s, n], key=lambda r: r["tokens_per_s"])[len(runs[s, n]) // 2]
            for s in samplings for n in streams]
    print(f"{Path(args.gguf).name}, {args.threads} threads, {args.tokens} tokens per sequence, "
          f"median of {args.rounds} interleaved runs"
          + (f", backend top-{args.backend_top_k} candidates" if args.backend_top_k else ""))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"gguf": Path(args.gguf).name, "threads": args.threads,
                                               "tokens": args.tokens, "rows": rows, "runs": list(runs.values())},
                                              indent=2))


if __name__ == "__main__":
    main()
