"""Next turns of scattered chats: the engine keeping busy slots together, against leaving them where they are.

    .venv/bin/python bench/bench_slot_layout.py [--gguf PATH] [--slots 16] [--tokens 64] [--threads 2] [--rounds 3]

llama.cpp gives each sequence a KV stream of its own (the engine's kv_unified off) and then
decodes only consecutive sequence ids in one ubatch; every further ubatch is another pass over
the weights. The scene: `--slots` chats answered once (every slot holds a cached conversation),
then the next turn of every other chat (slots 1, 3, 5, ...): each goes to the slot that caches
its conversation. "kept together" is the engine as it is (those slots move down to 0..k-1, one
KV stream copy each); "scattered" switches the move off (`_keep_busy_slots_together` a no-op).
The two take turns, `--rounds` times, in one process; prints generation tokens/s of the next
turns (their prompt reading and the moves included: the whole second turn is timed) and the
process's CPU time per generated token (all llama.cpp threads; what other programs on a shared
machine do not disturb as much as they disturb wall time).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "handler"))

from chat_prompt import ChatPrompter  # noqa: E402
from llama_engine import Engine, GenerationRequest, SamplingParams  # noqa: E402
from llama_settings import HandlerSettings, engine_config  # noqa: E402

from bench.loadgen import DEFAULT_PROMPTS  # noqa: E402

GREEDY = SamplingParams(temperature=0)


def run(engine: Engine, requests: dict[str, GenerationRequest]) -> tuple[dict[str, str], float, float]:
    """Submit and step until idle: the texts, wall seconds and CPU seconds of this process."""
    for rid, req in requests.items():
        engine.submit(rid, req)
    texts = {rid: "" for rid in requests}
    t0, cpu0 = time.perf_counter(), time.process_time()
    while engine.is_busy():
        for rid, upd in engine.step().items():
            texts[rid] += upd.text
    return texts, time.perf_counter() - t0, time.process_time() - cpu0


def next_turns(engine: Engine, prompter: ChatPrompter, n_slots: int,
               tokens: int) -> tuple[float, float, dict[str, str]]:
    """Answer n_slots chats once, then the next turn of every other one; returns tok/s and CPU ms
    per token of the next turns, and their texts."""
    engine.clear_cache()
    chats = {f"c{i}": [{"role": "user", "content": f"{DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)]} (chat {i})"}]
             for i in range(n_slots)}
    first, _, _ = run(engine, {rid: GenerationRequest(prompter.tokens(m), 16, GREEDY) for rid, m in chats.items()})
    follow = {rid: m + [{"role": "assistant", "content": first[rid]}, {"role": "user", "content": "Go on."}]
              for i, (rid, m) in enumerate(chats.items()) if i % 2 == 1}
    texts, wall, cpu = run(engine, {rid: GenerationRequest(prompter.tokens(m), tokens, GREEDY, ignore_eos=True)
                                    for rid, m in follow.items()})
    n = len(follow) * tokens
    return n / wall, 1000 * cpu / n, texts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    settings = HandlerSettings(n_threads=a.threads, n_gpu_layers=a.n_gpu_layers, n_ctx=1024, max_tokens=512)
    engine = Engine(a.gguf, engine_config(settings, batch_size=a.slots, n_workers=1, gpu_id=None))
    prompter = ChatPrompter(engine.metadata.get("tokenizer.chat_template"), engine.bos_text, engine.eos_text,
                            lambda t: engine.tokenize(t, add_special=False, parse_special=True))
    keep_together = engine._keep_busy_slots_together
    figures: dict[str, list[float]] = {"kept together": [], "scattered": []}
    cpu_ms: dict[str, list[float]] = {"kept together": [], "scattered": []}
    answers: dict[str, dict[str, str]] = {}
    next_turns(engine, prompter, a.slots, 8)   # warm-up: kernels, allocations
    for _ in range(a.rounds):
        for layout in figures:
            engine._keep_busy_slots_together = keep_together if layout == "kept together" else (lambda: None)
            moves = engine.stats.slot_moves
            tps, ms, answers[layout] = next_turns(engine, prompter, a.slots, a.tokens)
            figures[layout].append(tps)
            cpu_ms[layout].append(ms)
            print(f"{layout:>13}: {tps:7.1f} tok/s, {ms:6.2f} CPU ms per token "
                  f"({engine.stats.slot_moves - moves} slot moves)", flush=True)
    engine.close()
    tps = {k: statistics.median(v) for k, v in figures.items()}
    ms = {k: statistics.median(v) for k, v in cpu_ms.items()}
    print(f"\n{a.slots} slots, next turns of {a.slots // 2} chats on every other slot, {a.tokens} tokens each, "
          f"{a.threads} threads, median of {a.rounds}, load average {os.getloadavg()[0]:.1f}:")
    print("| layout | tok/s | CPU ms per token |\n|---|---:|---:|")
    for k in figures:
        print(f"| {k} | {tps[k]:.1f} | {ms[k]:.2f} |")
    print(f"kept together / scattered: {tps['kept together'] / tps['scattered']:.2f}x tok/s, "
          f"{ms['scattered'] / ms['kept together']:.2f}x less CPU per token; same answers: "
          f"{answers['kept together'] == answers['scattered']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
