"""GPU benchmark: raw batched decode, the TorchServe path and llama-server, greedy and sampled, same GGUF, same run.

raw:          handler/llama_engine.py's Engine driven directly in this process (one llama_context
              with the served model's slots, context and flash-attention settings; N sequences
              submitted at once and stepped until done). Each step is split into llama_decode,
              the token choice (Engine._choose_token) and the rest (Python).
raw variants: `backend-topk`: llama.cpp's backend sampling picks each sequence's top K logits on
              the GPU (a top-k sampler attached to every slot), the engine runs the request's chain
              on those K (the same tokens as the CPU path, checked); `backend-chain`: the request's
              whole chain (penalties, top-k, top-p, min-p, temperature, dist) runs on the GPU.
torchserve:   TorchServe started with the project's config.properties (free ports) through
              chatstack.TorchServeProcess (so with torchserve_fix), the model packed by
              package_llama.sh (--no-embed) with model-config.yaml plus GPU settings, driven by
              bench/loadgen.py with N concurrent streaming chats; once per (workers, step budget).
llama-server: llama.cpp's server built from the same source (--llama-server), same slots, context,
              batch and flash attention, the same chats on /v1/chat/completions.

Samplings (bench/loadgen.py): greedy (temperature 0, no penalties: the argmax fast path) and
sampled (temperature 0.7, top-p 0.95, top-k 40, min-p 0.05, repeat penalty 1.1, a seed per
request). Same prompts (the GGUF's chat template), same max_tokens everywhere. tokens/s =
completion tokens of all requests / wall time from the first request to the last token, so
prefill and time to first token count in every column.

    python bench/gpu_bench.py --gguf model.Q4_0.gguf --streams 1,8,32 --sampling greedy,sampled \\
        --variants backend-topk --workers 1,2 --llama-server PATH --out results/
"""

from __future__ import annotations

import argparse
import hashlib
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

from bench.loadgen import DEFAULT_PROMPTS, SAMPLINGS, LoadSpec, endpoint, percentile, run_load, summarize  # noqa: E402

SEED = 1000    # request i of a run gets seed SEED + i, in every column


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def gpu_memory_mib() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
        return float(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


# ---- raw llama.cpp ------------------------------------------------------------------------

class BackendSampling:
    """Attach llama.cpp backend samplers to an engine's context (a bench-only experiment: the
    engine's _choose_token reads whatever the backend left, candidates or a token)."""

    def __init__(self, engine, mode: str, top_k: int):
        import llama_cpp
        self.llama_cpp, self.engine, self.mode, self.top_k = llama_cpp, engine, mode, top_k
        self.attached: dict[int, object] = {}      # seq_id -> sampler
        self.owned: list = []
        if mode == "backend-topk":
            for slot in engine.slots:
                chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
                llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(top_k))
                self._attach(slot.seq_id, chain)
                self.owned.append(chain)

    def _attach(self, seq_id: int, sampler) -> None:
        if not self.llama_cpp.llama_set_sampler(self.engine.ctx, seq_id, sampler):
            raise RuntimeError(f"llama_set_sampler refused sequence {seq_id}")
        self.attached[seq_id] = sampler

    def admit(self) -> None:
        """backend-chain: give each request its own chain as its slot's backend sampler, and
        detach it before the request frees it."""
        if self.mode != "backend-chain":
            return
        self.engine._admit_waiting()
        for slot in self.engine.slots:
            active = slot.active
            if active is None or active.sampler is None or slot.seq_id in self.attached:
                continue
            self._attach(slot.seq_id, active.sampler)
            close, seq_id = active.close, slot.seq_id

            def detach_then_close(close=close, seq_id=seq_id):
                self.llama_cpp.llama_set_sampler(self.engine.ctx, seq_id, None)
                self.attached.pop(seq_id, None)
                close()
            active.close = detach_then_close

    def close(self) -> None:
        for seq_id in list(self.attached):
            self.llama_cpp.llama_set_sampler(self.engine.ctx, seq_id, None)
        self.attached.clear()
        for chain in self.owned:
            self.llama_cpp.llama_sampler_free(chain)
        self.owned.clear()


def raw_bench(gguf: str, streams: list[int], samplings: list[str], variants: list[str], max_tokens: int,
              n_slots: int, n_ctx: int, n_gpu_layers: int, n_batch: int, flash_attn: bool, backend_top_k: int,
              warmup_tokens: int = 16) -> dict:
    import llama_cpp
    import llama_engine
    from chat_prompt import ChatPrompter
    from llama_engine import Engine, GenerationRequest, SamplingParams
    from llama_settings import HandlerSettings, engine_config

    settings = HandlerSettings(n_ctx=n_ctx, n_slots=n_slots, n_batch=n_batch, n_gpu_layers=n_gpu_layers,
                               flash_attn=flash_attn, max_tokens=min(512, n_ctx - 1))
    cfg = engine_config(settings, batch_size=n_slots, n_workers=1, gpu_id=None)
    t0 = time.monotonic()
    eng = Engine(gguf, cfg)
    log(f"raw: engine loaded in {time.monotonic() - t0:.1f} s ({cfg})")
    prompter = ChatPrompter(eng.metadata.get("tokenizer.chat_template"), eng.bos_text, eng.eos_text,
                            lambda t: eng.tokenize(t, add_special=False, parse_special=True))
    prompts = [prompter.tokens([{"role": "user", "content": p}]) for p in DEFAULT_PROMPTS]
    real_decode, real_choose = llama_cpp.llama_decode, eng._choose_token
    spent = {"decode": 0.0, "choose": 0.0}

    def timed_decode(ctx, batch):
        t = time.perf_counter()
        rc = real_decode(ctx, batch)
        llama_cpp.llama_synchronize(ctx)   # on a GPU llama_decode returns before the work is done
        spent["decode"] += time.perf_counter() - t
        return rc

    def timed_choose(*args):
        t = time.perf_counter()
        tok = real_choose(*args)
        spent["choose"] += time.perf_counter() - t
        return tok

    def one_run(n: int, m: int, sampling: str, backend: BackendSampling | None = None) -> dict:
        for i in range(n):
            eng.submit(f"r{n}-{i}", GenerationRequest(prompt_tokens=prompts[i % len(prompts)], max_tokens=m,
                                                      sampling=SamplingParams(**SAMPLINGS[sampling], seed=SEED + i)))
        if backend:
            backend.admit()
        spent.update(decode=0.0, choose=0.0)
        llama_engine.llama_cpp.llama_decode = timed_decode
        eng._choose_token = timed_choose
        texts, done, steps = {}, {}, 0
        t_start = time.monotonic()
        try:
            while eng.is_busy():
                for rid, upd in eng.step().items():
                    texts[rid] = texts.get(rid, "") + upd.text
                    if upd.finished:
                        done[rid] = upd
                steps += 1
        finally:
            llama_engine.llama_cpp.llama_decode = real_decode
            del eng._choose_token
        wall = time.monotonic() - t_start
        tokens = sum(u.completion_tokens for u in done.values())
        ttfts = [u.time_to_first_token for u in done.values() if u.time_to_first_token is not None]
        speeds = [u.tokens_per_second for u in done.values() if u.tokens_per_second]
        step_ms = 1000 * wall / max(1, steps)
        decode_ms, choose_ms = 1000 * spent["decode"] / max(1, steps), 1000 * spent["choose"] / max(1, steps)
        return {"streams": n, "sampling": sampling, "completion_tokens": tokens, "wall_s": wall,
                "tokens_per_s": tokens / wall, "steps": steps, "step_ms": step_ms, "decode_ms": decode_ms,
                "choose_ms": choose_ms, "other_ms": step_ms - decode_ms - choose_ms,
                "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
                "stream_tokens_per_s_p50": percentile(speeds, 50),
                "errors": sum(1 for u in done.values() if u.error),
                "texts_sha256": [hashlib.sha256(texts[f"r{n}-{i}"].encode()).hexdigest()[:16] for i in range(n)]}

    out: dict = {}
    try:
        for variant in ["cpu", *variants]:
            backend = None if variant == "cpu" else BackendSampling(eng, variant, backend_top_k)
            try:
                eng.clear_cache()
                one_run(min(4, n_slots), warmup_tokens, samplings[0], backend)   # kernels, graphs, allocations
                for n in streams:
                    for s in samplings:
                        if variant == "backend-chain" and s == "greedy":
                            continue
                        eng.clear_cache()
                        r = one_run(n, max_tokens, s, backend)
                        out.setdefault(variant, {}).setdefault(s, {})[n] = r
                        log(f"raw {variant} {s} {n:>3} streams: {r['tokens_per_s']:.1f} tok/s "
                            f"({r['completion_tokens']} tokens in {r['wall_s']:.2f} s, {r['steps']} steps of "
                            f"{r['step_ms']:.2f} ms: decode {r['decode_ms']:.2f}, choice {r['choose_ms']:.2f}, "
                            f"rest {r['other_ms']:.2f})")
            except Exception as e:   # keep the other variants' results
                log(f"raw {variant} failed: {type(e).__name__}: {e}")
                out.setdefault("failed", {})[variant] = f"{type(e).__name__}: {e}"
            finally:
                if backend:
                    backend.close()
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


def decode_steps(client) -> float:
    return sum(v for name, labels, v in client.metric_samples() if name == "llama_decode_steps")


def served_bench(gguf: str, streams: list[int], samplings: list[str], max_tokens: int, n_slots: int, n_ctx: int,
                 n_gpu_layers: int, n_batch: int, flash_attn: bool, step_budget_ms: float, workers: int,
                 work: Path, name: str, route: str = "bare", served_threads: int = 0,
                 handler_settings: dict[str, str] | None = None) -> dict:
    """{sampling: {streams: summary}} plus the model's memory, for one TorchServe model;
    handler_settings: more `handler:` keys of model-config.yaml to set (a served variant)."""
    from chatstack.torchserve_process import TorchServeProcess, free_port_overrides

    store = work / "model_store"
    store.mkdir(parents=True, exist_ok=True)
    cfg = served_config(ROOT / "model-config.yaml", work / f"{name}-config.yaml",
                        {"n_gpu_layers": n_gpu_layers, "n_ctx": n_ctx, "max_tokens": min(512, n_ctx // 2),
                         "n_threads": served_threads,
                         "n_slots": 0, "n_batch": n_batch,
                         "step_budget_ms": step_budget_ms, "flash_attn": str(flash_attn).lower(),
                         **(handler_settings or {})},
                        {"batchSize": n_slots // workers, "minWorkers": workers, "maxWorkers": workers})
    subprocess.run([str(ROOT / "package_llama.sh"), "--no-embed", "--config", str(cfg), "--name", name,
                    "--model-store", str(store), gguf], check=True, capture_output=True, text=True)
    server = TorchServeProcess(ROOT / "config.properties", store, work / f"run-{name}",
                               overrides=free_port_overrides())
    t0 = time.monotonic()
    memory_before = gpu_memory_mib()
    server.start()
    out: dict = {"workers": workers, "step_budget_ms": step_budget_ms, "slots_per_worker": n_slots // workers,
                 "n_threads": served_threads, "handler_settings": handler_settings or {}}
    try:
        client = server.client(timeout=60)
        client.register(f"{name}.mar", initial_workers=workers, timeout=600)
        log(f"torchserve ({name}: {workers} worker(s) x {n_slots // workers} slots, step_budget_ms "
            f"{step_budget_ms}): up and registered in {time.monotonic() - t0:.1f} s")
        url = endpoint(server.address("inference"), name, route)
        base = dict(url=url, key=client.keys.inference, prompts=list(DEFAULT_PROMPTS))
        run_load(LoadSpec(concurrency=min(4, n_slots), max_tokens=16, extra=dict(SAMPLINGS[samplings[0]]),
                          **base))  # warm-up
        out["gpu_memory_mib"] = gpu_memory_mib()
        out["gpu_memory_model_mib"] = (out["gpu_memory_mib"] - memory_before
                                       if out["gpu_memory_mib"] is not None and memory_before is not None else None)
        rss = 0
        for w in client.describe_model(name)[0]["workers"]:
            try:
                rss += int(Path(f"/proc/{w['pid']}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
            except (OSError, IndexError, ValueError, KeyError):
                pass
        out["worker_rss_mb"] = rss or None
        for s in samplings:
            for n in streams:
                try:
                    steps0 = decode_steps(client)
                except Exception:   # noqa: BLE001 (metrics are a nicety)
                    steps0 = None
                results, wall = run_load(LoadSpec(concurrency=n, max_tokens=max_tokens, extra=dict(SAMPLINGS[s]),
                                                  seed=SEED, **base))
                summary = summarize(results, wall)
                summary["streams"] = n
                if steps0 is not None:
                    time.sleep(1.1)   # the handler reports its counters at most once a second
                    run_load(LoadSpec(concurrency=1, max_tokens=1, **base))
                    steps = decode_steps(client) - steps0
                    summary["steps"] = steps
                    summary["step_ms"] = 1000 * wall / steps * workers if steps else None
                out.setdefault(s, {})[n] = summary
                log(f"torchserve {name} {s} {n:>3} streams: {summary['tokens_per_s']:.1f} tok/s "
                    f"({summary['completion_tokens']} tokens in {summary['wall_s']:.2f} s, TTFT p50 "
                    f"{summary['ttft_p50_s'] or 0:.3f} s, {summary['errors']} errors {summary['first_errors']})")
    finally:
        tail = server.log_tail(40, "model_log.log")
        server.stop()
        (work / f"{name}-model_log.tail").write_text("\n".join(tail))
    return out


# ---- llama-server ----------------------------------------------------------------------------

def llama_server_bench(binary: str, gguf: str, streams: list[int], samplings: list[str], max_tokens: int,
                       n_slots: int, n_ctx: int, n_gpu_layers: int, n_batch: int, flash_attn: bool,
                       work: Path) -> dict:
    import requests
    from chatstack.torchserve_process import free_port

    port = free_port()
    cmd = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(n_slots),
           "-c", str(n_ctx * n_slots), "-b", str(n_batch), "-ub", str(n_batch), "-ngl", str(n_gpu_layers),
           "-fa", "on" if flash_attn else "off", "-t", str(os.cpu_count() or 1), "--no-webui"]
    log("llama-server: " + " ".join(cmd))
    logf = open(work / "llama-server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
    out: dict = {}
    try:
        for _ in range(1200):
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {proc.returncode}")
            time.sleep(0.25)
        else:
            raise RuntimeError("llama-server did not start")
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        base = dict(url=url, sse=True, prompts=list(DEFAULT_PROMPTS))
        usage = {"stream_options": {"include_usage": True}}
        run_load(LoadSpec(concurrency=min(4, n_slots), max_tokens=16, extra={**SAMPLINGS[samplings[0]], **usage},
                          **base))
        for s in samplings:
            for n in streams:
                results, wall = run_load(LoadSpec(concurrency=n, max_tokens=max_tokens,
                                                  extra={**SAMPLINGS[s], **usage}, seed=SEED, **base))
                summary = summarize(results, wall)
                summary["streams"] = n
                out.setdefault(s, {})[n] = summary
                log(f"llama-server {s} {n:>3} streams: {summary['tokens_per_s']:.1f} tok/s "
                    f"({summary['completion_tokens']} tokens in {summary['wall_s']:.2f} s, TTFT p50 "
                    f"{summary['ttft_p50_s'] or 0:.3f} s, {summary['errors']} errors {summary['first_errors']})")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        logf.close()
    return out


# ---- report ---------------------------------------------------------------------------------

def _f(v, spec=".0f"):
    return "-" if v is None else format(v, spec)


def tables(report: dict) -> str:
    raw, served, ls = report.get("raw", {}), report.get("served", {}), report.get("llama_server", {})
    cpu = raw.get("cpu", {})
    main = next((c for c in served.values() if c.get("workers") == 1), None)   # the first: n_threads as asked first
    lines = ["| sampling | streams | raw tok/s | sampled / greedy raw | raw, backend top-k tok/s | "
             "TorchServe tok/s | TorchServe / raw | TTFT p50 / p95 (s) | llama-server tok/s | "
             "TorchServe / llama-server | raw / llama-server |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    samplings = report["settings"]["samplings"]
    for s in samplings:
        for n in report["settings"]["streams"]:
            r = cpu.get(s, {}).get(n, {})
            g = cpu.get("greedy", {}).get(n, {})
            b = raw.get("backend-topk", {}).get(s, {}).get(n, {})
            t = (main or {}).get(s, {}).get(n, {})
            ll = ls.get(s, {}).get(n, {})
            rt, gt, tt, lt = (x.get("tokens_per_s") for x in (r, g, t, ll))
            ratio = lambda a, b_: _f(a / b_, ".2f") if a and b_ else "-"  # noqa: E731
            lines.append(f"| {s} | {n} | {_f(rt)} | {ratio(rt, gt)} | {_f(b.get('tokens_per_s'))} | {_f(tt)} | "
                         f"{ratio(tt, rt)} | {_f(t.get('ttft_p50_s'), '.3f')} / {_f(t.get('ttft_p95_s'), '.3f')} | "
                         f"{_f(lt)} | {ratio(tt, lt)} | {ratio(rt, lt)} |")
    out = ["Throughput (tok/s = completion tokens / wall time, prefill included):", "", *lines]
    # where one step's time goes
    prof = ["", "Where one decode step's time goes (ms; raw engine, all streams generating; TorchServe: wall / "
                "decode steps, the difference is the round trip through TorchServe and HTTP):", "",
            "| path | sampling | streams | raw tok/s | step | llama_decode | token choice | rest (Python) | TorchServe step |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for variant, by_s in raw.items():
        if variant == "failed":
            continue
        for s, by_n in by_s.items():
            for n, r in by_n.items():
                t = (main or {}).get(s, {}).get(n, {}) if variant == "cpu" else {}
                prof.append(f"| {variant} | {s} | {n} | {r['tokens_per_s']:.0f} | {r['step_ms']:.2f} | {r['decode_ms']:.2f} | "
                            f"{r['choose_ms']:.2f} | {r['other_ms']:.2f} | {_f(t.get('step_ms'), '.2f')} |")
    out += prof
    # same tokens?
    checks = []
    for variant in ("backend-topk", "backend-chain"):
        for s, by_n in raw.get(variant, {}).items():
            for n, r in by_n.items():
                ref = cpu.get(s, {}).get(n, {}).get("texts_sha256")
                if ref:
                    same = sum(a == b for a, b in zip(ref, r["texts_sha256"]))
                    checks.append(f"- {variant}, {s}, {n} streams: {same} of {len(ref)} answers identical to the CPU path")
    if checks:
        out += ["", "Same seeds, same answers?", "", *checks]
    if raw.get("failed"):
        out += ["", *(f"- raw {k} failed: {v}" for k, v in raw["failed"].items())]
    out += [f"- {k} failed: {v}" for k, v in report.get("failed", {}).items()]
    out += [f"- {k}: skipped (deadline)" for k in report.get("skipped", [])]
    # llama.cpp threads of the served model (issue #18: is the sampled TorchServe gap CPU threads?)
    by_threads = [c for c in served.values() if c.get("workers") == 1 and c.get("step_budget_ms") == (main or {}).get(
        "step_budget_ms")]
    if len({c.get("n_threads") for c in by_threads}) > 1:
        out += ["", "TorchServe, one worker, by llama.cpp threads (n_threads 0 = cores / workers):", "",
                "| n_threads | sampling | streams | tok/s | / raw | TTFT p50 (s) | TorchServe step (ms) |",
                "|---:|---|---:|---:|---:|---:|---:|"]
        for c in by_threads:
            for s in samplings:
                for n, t in sorted(c.get(s, {}).items()):
                    rt = cpu.get(s, {}).get(n, {}).get("tokens_per_s")
                    tt = t.get("tokens_per_s")
                    out.append(f"| {c.get('n_threads')} | {s} | {n} | {_f(tt)} | "
                               f"{_f(tt / rt, '.2f') if tt and rt else '-'} | {_f(t.get('ttft_p50_s'), '.3f')} | "
                               f"{_f(t.get('step_ms'), '.2f')} |")
    # served variants: the main model against the same with some handler settings changed
    variants = [c for c in served.values() if c.get("handler_settings")]
    if main and variants:
        out += ["", "TorchServe variants (one worker, the first budget; tok/s, and / the main model's):", "",
                "| handler settings | sampling | streams | tok/s | / main | TTFT p50 (s) | TorchServe step (ms) |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for c in [main, *variants]:
            label = ", ".join(f"{k}={v}" for k, v in c["handler_settings"].items()) or "main (model-config.yaml)"
            for s in samplings:
                for n, t in sorted(c.get(s, {}).items()):
                    mt = main.get(s, {}).get(n, {}).get("tokens_per_s")
                    tt = t.get("tokens_per_s")
                    out.append(f"| {label} | {s} | {n} | {_f(tt)} | {_f(tt / mt, '.2f') if tt and mt else '-'} | "
                               f"{_f(t.get('ttft_p50_s'), '.3f')} | {_f(t.get('step_ms'), '.2f')} |")
    # workers (issue #16)
    configs = [c for c in served.values() if "workers" in c]
    if len({c["workers"] for c in configs}) > 1:
        out += ["", "Workers sharing the GPU (greedy; same slots in total):", "",
                "| workers x slots | streams | tok/s | TTFT p50 / p95 (s) | per-stream tok/s | GPU memory (MiB) | "
                "worker RSS (MB) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for c in sorted(configs, key=lambda c: c["workers"]):
            for n, t in sorted(c.get("greedy", {}).items()):
                if n not in report["settings"]["worker_streams"]:
                    continue
                out.append(f"| {c['workers']} x {c['slots_per_worker']} | {n} | {_f(t['tokens_per_s'])} | "
                           f"{_f(t['ttft_p50_s'], '.3f')} / {_f(t['ttft_p95_s'], '.3f')} | "
                           f"{_f(t['stream_tokens_per_s_p50'], '.1f')} | {_f(c.get('gpu_memory_model_mib'))} | "
                           f"{_f(c.get('worker_rss_mb'))} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", required=True)
    p.add_argument("--streams", default="1,8,32")
    p.add_argument("--sampling", default="greedy,sampled", help="comma-separated: greedy, sampled")
    p.add_argument("--variants", default="", help="raw engine variants beside the CPU token choice: "
                   "backend-topk, backend-chain (comma-separated)")
    p.add_argument("--backend-top-k", type=int, default=128, help="candidates the backend keeps (backend-topk)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--n-slots", type=int, default=0, help="sequence slots in all (0: max streams)")
    p.add_argument("--n-ctx", type=int, default=2048, help="context per slot")
    p.add_argument("--n-batch", type=int, default=512)
    p.add_argument("--n-gpu-layers", type=int, default=999)
    p.add_argument("--no-flash-attn", action="store_true")
    p.add_argument("--step-budget-ms", default="100", help="comma-separated: one TorchServe model per value")
    p.add_argument("--workers", default="1", help="comma-separated worker counts (the first budget); "
                   "more than 1: greedy only, at --worker-streams")
    p.add_argument("--worker-streams", default="32,64")
    p.add_argument("--route", choices=["bare", "openai"], default="bare")
    p.add_argument("--served-variants", default="", help="';'-separated, each a comma list of handler key=value "
                   "(e.g. 'step_budget_ms=50,n_batch=1024;cache_answers=false'): one more TorchServe model per variant, "
                   "the first budget, one worker, the same streams and samplings")
    p.add_argument("--served-threads", default="0", help="comma-separated handler n_threads of the served model "
                   "(0: cores / workers); each value after the first adds a TorchServe model at the first budget")
    p.add_argument("--llama-server", help="llama-server binary built from the same llama.cpp source")
    p.add_argument("--skip-raw", action="store_true")
    p.add_argument("--skip-served", action="store_true")
    p.add_argument("--deadline-s", type=float, default=0,
                   help="start no TorchServe or llama-server part after this many seconds (0: no deadline)")
    p.add_argument("--out", help="folder for results.json and table.md")
    a = p.parse_args(argv)
    streams = [int(s) for s in a.streams.split(",")]
    samplings = a.sampling.split(",")
    workers = [int(w) for w in a.workers.split(",")]
    worker_streams = [int(s) for s in a.worker_streams.split(",")] if len(workers) > 1 else []
    n_slots = a.n_slots or max(streams + worker_streams)
    common = dict(max_tokens=a.max_tokens, n_slots=n_slots, n_ctx=a.n_ctx, n_gpu_layers=a.n_gpu_layers,
                  n_batch=a.n_batch, flash_attn=not a.no_flash_attn)
    report: dict = {"settings": {**common, "streams": streams, "samplings": samplings, "gguf": a.gguf,
                                 "workers": workers, "worker_streams": worker_streams,
                                 "date": time.strftime("%Y-%m-%d %H:%M")},
                    "raw": {}, "served": {}, "llama_server": {}}
    if not a.skip_raw:
        report["raw"] = raw_bench(a.gguf, streams, samplings, [v for v in a.variants.split(",") if v],
                                  backend_top_k=a.backend_top_k, **common)
    work = Path(tempfile.mkdtemp(prefix="gpu_bench_"))
    t0 = time.monotonic()
    parts = []   # in order of importance: what a deadline cuts is the end
    if not a.skip_served:
        budgets = [float(x) for x in a.step_budget_ms.split(",")]
        threads = [int(t) for t in a.served_threads.split(",")]
        configs = ([(1, b, threads[0]) for b in budgets] + [(w, budgets[0], threads[0]) for w in workers if w != 1]
                   + [(1, budgets[0], t) for t in threads[1:]])
        for i, (w, b, t) in enumerate(configs):
            name = f"bench{i}"
            if w == 1:
                ns = sorted(set(streams + (worker_streams if b == budgets[0] else [])))
                kw = dict(streams=ns, samplings=samplings, workers=1)
            else:
                kw = dict(streams=worker_streams, samplings=["greedy"], workers=w)
            parts.append((f"torchserve, {w} worker(s), step_budget_ms {b:g}, n_threads {t or 'cores / workers'}", name,
                          lambda kw=kw, b=b, t=t, name=name: served_bench(a.gguf, step_budget_ms=b, work=work,
                                                                          name=name, route=a.route, served_threads=t,
                                                                     **kw, **common)))
        for j, variant in enumerate(v for v in a.served_variants.split(";") if v.strip()):
            settings = dict(kv.strip().split("=", 1) for kv in variant.split(","))
            name = f"variant{j}"
            parts.append((f"torchserve, {variant}", name,
                          lambda settings=settings, name=name: served_bench(
                              a.gguf, streams=streams, samplings=samplings, workers=1, step_budget_ms=budgets[0],
                              work=work, name=name, route=a.route, served_threads=threads[0],
                              handler_settings=settings, **common)))
    if a.llama_server:
        parts.insert(min(1, len(parts)), ("llama-server", None, lambda: llama_server_bench(
            a.llama_server, a.gguf, streams, samplings, work=work, **common)))
    for what, name, run in parts:
        if a.deadline_s and time.monotonic() - t0 > a.deadline_s:
            log(f"{what}: skipped, past the {a.deadline_s:g} s deadline")
            report.setdefault("skipped", []).append(what)
            continue
        try:
            result = run()
            if name is None:
                report["llama_server"] = result
            else:
                report["served"][name] = result
        except Exception as e:  # keep the other results
            log(f"{what} failed: {type(e).__name__}: {e}")
            report.setdefault("failed", {})[what] = f"{type(e).__name__}: {e}"
    md = tables(report)
    print(md, flush=True)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
        (out / "table.md").write_text(md + "\n")
        logs = [f"==== {f.name}\n{f.read_text(errors='replace')}" for f in sorted(work.glob("*.tail"))]
        if (work / "llama-server.log").exists():
            logs.append("==== llama-server.log (last 60 lines)\n" + "\n".join(
                (work / "llama-server.log").read_text(errors="replace").splitlines()[-60:]))
        (out / "logs.txt").write_text("\n\n".join(logs))   # one file: the GPU machine sends back 8 at most
    return 0


if __name__ == "__main__":
    sys.exit(main())
