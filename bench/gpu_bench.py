"""GPU benchmark: the TorchServe path beside raw batched llama.cpp decode, same GGUF, same run.

raw:        handler/llama_engine.py's Engine driven directly in this process (one
            llama_context with the same slots, context and flash-attention settings
            as the served model; N sequences submitted at once and stepped until done).
torchserve: a TorchServe started with the project's config.properties (free ports)
            through chatstack.TorchServeProcess, the model packed by package_llama.sh
            (--no-embed) with the repo's model-config.yaml plus GPU settings, driven by
            bench/loadgen.py with N concurrent streaming chats.

Both use greedy sampling with no repeat penalty (the same work per token), the
same prompts (rendered with the GGUF's chat template) and the same max_tokens.
tokens/s = completion tokens of all requests / wall time from the first request
to the last token, so prefill and time to first token count in both.

    python bench/gpu_bench.py --gguf model.Q4_0.gguf --streams 1,8,32,64 --out results/
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "handler"))

from bench.loadgen import DEFAULT_PROMPTS, LoadSpec, endpoint, percentile, run_load, summarize  # noqa: E402


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ---- raw llama.cpp ------------------------------------------------------------------------

def raw_bench(gguf: str, streams: list[int], max_tokens: int, n_slots: int, n_ctx: int, n_gpu_layers: int,
              n_batch: int, flash_attn: bool, warmup_tokens: int = 16) -> dict[int, dict]:
    from chat_prompt import ChatPrompter
    from llama_engine import Engine, EngineConfig, GenerationRequest, SamplingParams

    cfg = EngineConfig(n_slots=n_slots, n_ctx_per_slot=n_ctx, n_batch=n_batch, prefill_chunk=256,
                       n_threads=os.cpu_count() or 1, n_gpu_layers=n_gpu_layers, flash_attn=flash_attn)
    t0 = time.monotonic()
    eng = Engine(gguf, cfg)
    log(f"raw: engine loaded in {time.monotonic() - t0:.1f} s ({cfg})")
    prompter = ChatPrompter(eng.metadata.get("tokenizer.chat_template"), eng.bos_text, eng.eos_text,
                            lambda t: eng.tokenize(t, add_special=False, parse_special=True))
    prompts = [prompter.tokens([{"role": "user", "content": p}]) for p in DEFAULT_PROMPTS]
    greedy = SamplingParams(temperature=0.0, repeat_penalty=1.0)

    def one_run(n: int, m: int) -> dict:
        for i in range(n):
            eng.submit(f"r{n}-{i}", GenerationRequest(prompt_tokens=prompts[i % len(prompts)], max_tokens=m,
                                                      sampling=greedy))
        t_start = time.monotonic()
        done = {}
        steps = 0
        while eng.is_busy():
            for rid, upd in eng.step().items():
                if upd.finished:
                    done[rid] = upd
            steps += 1
        wall = time.monotonic() - t_start
        tokens = sum(u.completion_tokens for u in done.values())
        ttfts = [u.time_to_first_token for u in done.values() if u.time_to_first_token is not None]
        speeds = [u.tokens_per_second for u in done.values() if u.tokens_per_second]
        return {"streams": n, "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                "steps": steps, "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
                "stream_tokens_per_s_p50": percentile(speeds, 50),
                "errors": sum(1 for u in done.values() if u.error)}

    out = {}
    try:
        one_run(min(4, n_slots), warmup_tokens)  # CUDA kernels, graphs, allocations
        for n in streams:
            out[n] = one_run(n, max_tokens)
            log(f"raw {n:>3} streams: {out[n]['tokens_per_s']:.1f} tok/s ({out[n]['completion_tokens']} tokens "
                f"in {out[n]['wall_s']:.2f} s, {out[n]['steps']} steps)")
    finally:
        eng.close()
    return out


# ---- TorchServe ---------------------------------------------------------------------------

def served_config(base: Path, dest: Path, settings: dict[str, object], top: dict[str, object]) -> Path:
    """The repo's model-config.yaml with some keys replaced (comments kept)."""
    text = base.read_text()
    for key, value in top.items():
        text, n = re.subn(rf"^({key}:)[^#\n]*", rf"\g<1> {value} ", text, flags=re.M)
        if not n:
            text += f"\n{key}: {value}\n"
    for key, value in settings.items():
        text, n = re.subn(rf"^(  {key}:)[^#\n]*", rf"\g<1> {value} ", text, flags=re.M)
        if not n:
            text = re.sub(r"^handler:\n", f"handler:\n  {key}: {value}\n", text, flags=re.M)
    dest.write_text(text)
    return dest


def served_bench(gguf: str, streams: list[int], max_tokens: int, n_slots: int, n_ctx: int, n_gpu_layers: int,
                 n_batch: int, flash_attn: bool, step_budget_ms: float, work: Path, name: str,
                 route: str = "bare") -> dict[int, dict]:
    from chatstack.torchserve_process import TorchServeProcess, free_port_overrides

    store = work / "model_store"
    store.mkdir(parents=True, exist_ok=True)
    cfg = served_config(ROOT / "model-config.yaml", work / f"{name}-config.yaml",
                        {"n_gpu_layers": n_gpu_layers, "n_ctx": n_ctx, "n_slots": 0, "n_batch": n_batch,
                         "step_budget_ms": step_budget_ms, "flash_attn": str(flash_attn).lower()},
                        {"batchSize": n_slots, "minWorkers": 1, "maxWorkers": 1})
    subprocess.run([str(ROOT / "package_llama.sh"), "--no-embed", "--config", str(cfg), "--name", name,
                    "--model-store", str(store), gguf], check=True, capture_output=True, text=True)
    server = TorchServeProcess(ROOT / "config.properties", store, work / f"run-{name}",
                               overrides=free_port_overrides())
    t0 = time.monotonic()
    server.start()
    out = {}
    try:
        client = server.client(timeout=60)
        client.register(f"{name}.mar", initial_workers=1, timeout=600)
        log(f"torchserve ({name}, step_budget_ms {step_budget_ms}): up and registered in "
            f"{time.monotonic() - t0:.1f} s")
        url = endpoint(server.address("inference"), name, route)
        base = dict(url=url, key=client.keys.inference, temperature=0.0, extra={"repeat_penalty": 1.0},
                    prompts=list(DEFAULT_PROMPTS))
        run_load(LoadSpec(concurrency=min(4, n_slots), max_tokens=16, **base))  # warm-up
        for n in streams:
            results, wall = run_load(LoadSpec(concurrency=n, max_tokens=max_tokens, **base))
            s = summarize(results, wall)
            s["streams"] = n
            out[n] = s
            log(f"torchserve {n:>3} streams: {s['tokens_per_s']:.1f} tok/s ({s['completion_tokens']} tokens in "
                f"{s['wall_s']:.2f} s, {s['errors']} errors {s['first_errors']})")
    finally:
        tail = server.log_tail(40, "model_log.log")
        server.stop()
        (work / f"{name}-model_log.tail").write_text("\n".join(tail))
    return out


# ---- report ---------------------------------------------------------------------------------

def table(raw: dict, served: dict[float, dict]) -> str:
    f = lambda v, spec=".0f": "-" if v is None else format(v, spec)  # noqa: E731
    budgets = sorted(served)
    head = "| streams | raw llama.cpp tok/s |"
    sep = "| ---: | ---: |"
    for b in budgets:
        head += f" TorchServe tok/s (step {b:g} ms) | ratio | TTFT p50 / p95 (s) | per-stream tok/s |"
        sep += " ---: | ---: | ---: | ---: |"
    lines = [head, sep]
    for n in sorted(set(raw) | {n for b in budgets for n in served[b]}):
        r = raw.get(n, {})
        row = f"| {n} | {f(r.get('tokens_per_s'))} |"
        for b in budgets:
            s = served[b].get(n)
            if not s:
                row += " - | - | - | - |"
                continue
            ratio = s["tokens_per_s"] / r["tokens_per_s"] if r.get("tokens_per_s") else None
            row += (f" {f(s['tokens_per_s'])} | {f(ratio, '.2f')} | {f(s['ttft_p50_s'], '.3f')} / "
                    f"{f(s['ttft_p95_s'], '.3f')} | {f(s['stream_tokens_per_s_p50'], '.1f')} |")
        lines.append(row)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", required=True)
    p.add_argument("--streams", default="1,8,32,64")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--n-slots", type=int, default=0, help="sequence slots = TorchServe batchSize (0: max streams)")
    p.add_argument("--n-ctx", type=int, default=2048, help="context per slot")
    p.add_argument("--n-batch", type=int, default=512)
    p.add_argument("--n-gpu-layers", type=int, default=999)
    p.add_argument("--no-flash-attn", action="store_true")
    p.add_argument("--step-budget-ms", default="25", help="comma-separated: one TorchServe model per value")
    p.add_argument("--route", choices=["bare", "openai"], default="bare")
    p.add_argument("--skip-raw", action="store_true")
    p.add_argument("--skip-served", action="store_true")
    p.add_argument("--out", help="folder for results.json and table.md")
    a = p.parse_args(argv)
    streams = [int(s) for s in a.streams.split(",")]
    n_slots = a.n_slots or max(streams)
    common = dict(max_tokens=a.max_tokens, n_slots=n_slots, n_ctx=a.n_ctx, n_gpu_layers=a.n_gpu_layers,
                  n_batch=a.n_batch, flash_attn=not a.no_flash_attn)
    raw = {} if a.skip_raw else raw_bench(a.gguf, streams, **common)
    served = {}
    work = Path(tempfile.mkdtemp(prefix="gpu_bench_"))
    if not a.skip_served:
        for i, b in enumerate(float(x) for x in a.step_budget_ms.split(",")):
            try:
                served[b] = served_bench(a.gguf, streams, step_budget_ms=b, work=work, name=f"bench{i}",
                                         route=a.route, **common)
            except Exception as e:  # keep the other results
                log(f"torchserve with step_budget_ms {b} failed: {type(e).__name__}: {e}")
    md = table(raw, served)
    print(md, flush=True)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"settings": {**common, "streams": streams, "gguf": a.gguf},
                                                      "raw": raw, "served": served}, indent=2, default=str))
        (out / "table.md").write_text(md + "\n")
        for f in work.glob("*.tail"):
            (out / f.name).write_text(f.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
