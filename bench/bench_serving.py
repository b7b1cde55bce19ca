"""CPU serving benchmark: TorchServe + our engine vs llama.cpp's llama-server vs one request at a time.

    .venv/bin/python bench/bench_serving.py [--llama-server PATH] [--max-tokens 128] [--out bench/results]
        [--streams 1,4,8,16] [--sampling greedy,sampled] [--repeats 3] [--throughput-only]

Starts TorchServe with the project's config (free ports, a temporary run folder),
registers the default model twice — `llama` (continuous batching, 16 slots) and
`llama_single` (batch size 1: the original example's one-request-at-a-time
approach) — and sends N = 1, 4, 8, 16 concurrent streaming chats to each, greedy (no
penalties: the argmax fast path) and sampled with the chat defaults (temperature 0.7,
top-p 0.95, top-k 40, min-p 0.05, repeat penalty 1.1, a seed per request; bench/loadgen.py),
every answer max_tokens long (ignore_eos), so both servers do the same work. Where a
`llama-server` binary built from the same llama.cpp source is given, it gets the
same load on the same GGUF with the same thread count, in the same run: both
servers are up together and take turns, REPEATS times per N; the table shows the
median run of each and the median of the per-turn ratios (a small shared
machine's speed drifts by 10% from minute to minute; comparing runs made next to
each other keeps that drift out of the ratio). It also
measures time to first token at turn 1 and turn 10 of one conversation (prompt
cache), and the memory of 1, 2 and 4 workers (not with --throughput-only). Writes
serving.md, serving.json and serving.png into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import SAMPLINGS, LoadSpec, endpoint, run_load, summarize  # noqa: E402
from chatstack.torchserve_client import TorchServeClient  # noqa: E402
from chatstack.torchserve_process import TorchServeProcess, free_port, free_port_overrides  # noqa: E402

GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CONCURRENCY = (1, 4, 8, 16)
REPEATS = 3
SEED = 1000
# Greedy (no penalties) for the conversation and warm-ups: the same work on every server.
SAMPLING = SAMPLINGS["greedy"]


def load(url, key, n, max_tokens, sse=None, extra=None, rounds=2, sampling="greedy"):
    """`rounds` requests per stream, back to back, so the figure is steady-state; each answer
    max_tokens long, each request with its own seed."""
    spec = LoadSpec(url=url, key=key, concurrency=n, requests_per_stream=rounds, max_tokens=max_tokens,
                    extra={**SAMPLINGS[sampling], "ignore_eos": True, **(extra or {})}, sse=sse, seed=SEED)
    results, wall = run_load(spec)
    return summarize(results, wall)


def conversation_ttft(chat_once, turns=10):
    """TTFT of each turn of one growing conversation; chat_once(messages) -> (ttft, reply)."""
    messages = [{"role": "system", "content": "You are a helpful assistant. Answer in detail."}]
    ttfts = []
    topics = ["the moon", "rivers", "bread", "trains", "music", "glass", "bees", "maps", "salt", "clocks"]
    for i in range(turns):
        messages.append({"role": "user", "content": f"Tell me three facts about {topics[i % len(topics)]}."})
        ttft, reply = chat_once(messages)
        ttfts.append(ttft)
        messages.append({"role": "assistant", "content": reply})
    return ttfts


def streamed_chat(url, key, sse):
    import requests

    def chat_once(messages):
        body = {"messages": messages, "max_tokens": 64, "stream": True, **SAMPLING}
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        start = time.monotonic()
        ttft, text = None, []
        with requests.post(url, json=body, headers=headers, stream=True, timeout=600) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines(decode_unicode=True):
                if not line:
                    continue
                if sse:
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    line = line[6:]
                choices = json.loads(line).get("choices")
                delta = choices[0]["delta"].get("content") if choices else None
                if delta:
                    ttft = ttft or time.monotonic() - start
                    text.append(delta)
        return ttft, "".join(text)

    return chat_once


def worker_memory(client: TorchServeClient, model: str) -> dict:
    """Resident and proportional (shared pages split) memory of the model's workers, MB."""
    rss = pss = 0
    workers = client.describe_model(model)[0]["workers"]
    for w in workers:
        rollup = Path(f"/proc/{w['pid']}/smaps_rollup").read_text()
        fields = {line.split(":")[0]: int(line.split()[1]) for line in rollup.splitlines()[1:]}
        rss += fields["Rss"]
        pss += fields["Pss"]
    return {"workers": len(workers), "rss_mb": rss / 1024, "pss_mb": pss / 1024}


def bench_server(work: Path, config_changes: dict[str, str]) -> TorchServeProcess:
    """A TorchServe on free ports in `work`, with the default model packed with
    model-config.yaml edited by `config_changes` (text replacements). Not started."""
    store = work / "store"
    config = work / "model-config.yaml"
    text = (ROOT / "model-config.yaml").read_text()
    for old, new in config_changes.items():
        text = text.replace(old, new)
    config.write_text(text)
    subprocess.run([str(ROOT / "package_llama.sh"), "--model-store", str(store), "--config", str(config)],
                   check=True, capture_output=True)
    return TorchServeProcess(ROOT / "config.properties", store, work / "run", overrides=free_port_overrides())


def start_llama_server(binary, port, slots, threads, n_ctx_per_slot):
    cmd = [binary, "-m", str(GGUF), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
           "-c", str(n_ctx_per_slot * slots), "-t", str(threads), "-tb", str(threads), "-fa", "on",
           "--no-webui"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import requests

    for _ in range(300):
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("llama-server did not start")


def stop_llama_server(proc) -> None:
    """Stop what start_llama_server started (None: nothing was)."""
    if proc:
        proc.terminate()
        proc.wait()


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s, with every run's figure attached."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**ordered[len(ordered) // 2], "runs_tokens_per_s": [r["tokens_per_s"] for r in runs]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", help="path to llama-server built from the same llama.cpp source")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--streams", default=",".join(map(str, CONCURRENCY)), help="comma-separated")
    parser.add_argument("--sampling", default="greedy,sampled", help="comma-separated: greedy, sampled")
    parser.add_argument("--step-budget-ms", type=float, help="the handler's step_budget_ms (default: model-config.yaml's)")
    parser.add_argument("--throughput-only", action="store_true",
                        help="only the streams x sampling table (no conversation, memory or batch-size-1 rows)")
    parser.add_argument("--render", metavar="SERVING_JSON", help="only rewrite the table and plot from a saved run")
    args = parser.parse_args(argv)
    if args.render:
        report = json.loads(Path(args.render).read_text(), object_hook=_int_keys)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "serving.md").write_text(render(report))
        plot(report, Path(args.out) / "serving.png")
        print(render(report))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    changes = {"batchSize: 8 ": "batchSize: 16 ", "n_threads: 0 ": f"n_threads: {args.threads} "}
    if args.step_budget_ms is not None:
        changes["step_budget_ms: 50 "] = f"step_budget_ms: {args.step_budget_ms:g} "
    server = bench_server(work, changes)
    streams = [int(n) for n in args.streams.split(",")]
    samplings = args.sampling.split(",")
    report = {"machine": f"{os.cpu_count()} cores", "max_tokens": args.max_tokens, "threads": args.threads,
              "step_budget_ms": args.step_budget_ms,
              "gguf": GGUF.name, "repeats": args.repeats, "streams": streams, "samplings": samplings,
              "date": time.strftime("%Y-%m-%d %H:%M"), "load_average": os.getloadavg()[0],
              "torchserve": {}, "single": {}, "llama_server": {}}
    llama_server = lurl = None
    lextra = {"stream_options": {"include_usage": True}}
    server.start()
    try:
        client = server.client(timeout=600)
        key = client.keys.inference
        client.register("llama.mar", initial_workers=1)
        url = endpoint(server.address("inference"), "llama")
        load(url, key, 2, 16, rounds=1)  # warm-up
        if args.llama_server:
            port = free_port()
            llama_server = start_llama_server(args.llama_server, port, 16, args.threads, 2048)
            lurl = f"http://127.0.0.1:{port}/v1/chat/completions"
            load(lurl, None, 2, 16, sse=True, extra=lextra, rounds=1)
        for sampling in samplings:
            for n in streams:
                ts_runs, ls_runs = [], []
                for _ in range(args.repeats):
                    ts_runs.append(load(url, key, n, args.max_tokens, sampling=sampling))
                    if lurl:
                        ls_runs.append(load(lurl, None, n, args.max_tokens, sse=True, extra=lextra, sampling=sampling))
                report["torchserve"].setdefault(sampling, {})[n] = median_run(ts_runs)
                print("torchserve", sampling, n, [round(r["tokens_per_s"], 1) for r in ts_runs], flush=True)
                if ls_runs:
                    report["llama_server"].setdefault(sampling, {})[n] = median_run(ls_runs)
                    print("llama-server", sampling, n, [round(r["tokens_per_s"], 1) for r in ls_runs], flush=True)
        report["load_average_end"] = os.getloadavg()[0]
        if not args.throughput_only:   # conversation TTFT, memory of 1/2/4 workers, batch size 1
            report["torchserve_turns"] = conversation_ttft(streamed_chat(url, key, sse=False))
            if lurl:
                report["llama_server_turns"] = conversation_ttft(streamed_chat(lurl, None, sse=True))
                stop_llama_server(llama_server)
                llama_server = None
            for n in (1, 2, 4):
                client.scale("llama", n, n)
                report.setdefault("memory", []).append(worker_memory(client, "llama"))
            client.scale("llama", 1, 1)
            client.register("llama.mar", model_name="llama_single", batch_size=1, initial_workers=1)
            single = endpoint(server.address("inference"), "llama_single")
            for n in (1, 8):
                report["single"][n] = load(single, key, n, args.max_tokens, rounds=1)
                print("single", n, round(report["single"][n]["tokens_per_s"], 1), flush=True)
            client.unregister("llama_single")
    finally:
        stop_llama_server(llama_server)
        server.stop()
    shutil.rmtree(work, ignore_errors=True)
    (out / "serving.json").write_text(json.dumps(report, indent=2, default=str))
    markdown = render(report)
    (out / "serving.md").write_text(markdown)
    plot(report, out / "serving.png")
    print(markdown)


def _int_keys(d: dict) -> dict:
    return {int(k) if k.isdigit() else k: v for k, v in d.items()}


def turn_ratio(ts: dict, ls: dict) -> float:
    """Median over turns of TorchServe / llama-server tokens/s, runs made next to each other."""
    return statistics.median(a / b for a, b in zip(ts.get("runs_tokens_per_s", [ts["tokens_per_s"]]),
                                                   ls.get("runs_tokens_per_s", [ls["tokens_per_s"]])))


def _by_sampling(data: dict) -> dict:
    """{sampling: {streams: run}}; a serving.json from before the sampled column holds greedy runs only."""
    return {"greedy": data} if data and all(isinstance(k, int) for k in data) else data


def render(r) -> str:
    ts, ls, single = _by_sampling(r["torchserve"]), _by_sampling(r["llama_server"]), r["single"]
    streams = r.get("streams", list(CONCURRENCY))
    ignore_eos = "samplings" in r    # runs since the sampled column: every answer max_tokens long
    lines = [f"Default model ({r['gguf']}), {r['machine']}, {r['threads']} llama.cpp threads, max_tokens "
             f"{r['max_tokens']}{' (ignore_eos)' if ignore_eos else ''}, streaming chats, 2 requests per stream; "
             f"greedy = temperature 0, no penalties; sampled = temperature 0.7, top-p 0.95, top-k 40, min-p 0.05, "
             f"repeat penalty 1.1, a seed per request; median of {r.get('repeats', 1)} runs, the two servers "
             f"taking turns; ratio = median of the per-turn ratios"
             + (f"; {r['date']}, load average {r['load_average']:.1f} at the start, "
                f"{r.get('load_average_end', 0):.1f} at the end" if "date" in r else "") + ".", "",
             "| sampling | streams | TorchServe tok/s | llama-server tok/s | ratio | TTFT p50 / p95 (s) | "
             "per-stream tok/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for sampling, by_n in ts.items():
        for n in streams:
            t = by_n.get(n)
            if not t:
                continue
            lsn = ls.get(sampling, {}).get(n, {})
            l_tps = lsn.get("tokens_per_s")
            l_col, ratio = (f"{l_tps:.1f}", f"{turn_ratio(t, lsn):.2f}") if l_tps else ("–", "–")
            lines.append(f"| {sampling} | {n} | {t['tokens_per_s']:.1f} | {l_col} | {ratio} | "
                         f"{t['ttft_p50_s']:.2f} / {t['ttft_p95_s']:.2f} | {t['stream_tokens_per_s_p50'] or 0:.1f} |")
    greedy = ts.get("greedy", {})
    if single and 8 in greedy:
        lines += ["", f"One request at a time (batch size 1, the original example's approach): "
                      f"{single[1]['tokens_per_s']:.1f} tok/s for 1 stream, {single[8]['tokens_per_s']:.1f} tok/s "
                      f"for 8 streams; TorchServe with continuous batching at 8 streams: "
                      f"{greedy[8]['tokens_per_s'] / single[8]['tokens_per_s']:.2f}x."]
    turns = r.get("torchserve_turns")
    if turns:
        lines += ["", f"Prompt cache, one conversation: TTFT turn 1 {turns[0]:.3f} s, turn 10 {turns[-1]:.3f} s "
                      f"(ratio {turns[-1] / turns[0]:.2f})"
                  + (f"; llama-server {r['llama_server_turns'][0]:.3f} s → {r['llama_server_turns'][-1]:.3f} s"
                     if r.get("llama_server_turns") else "") + "."]
    if r.get("memory"):
        lines += ["", "| workers | RSS total (MB) | PSS total (MB, shared pages split) |", "|---:|---:|---:|"]
        lines += [f"| {m['workers']} | {m['rss_mb']:.0f} | {m['pss_mb']:.0f} |" for m in r["memory"]]
    return "\n".join(lines) + "\n"


def plot(r, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -r bench/requirements.txt)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    series = [(f"TorchServe + engine, {s}", d) for s, d in _by_sampling(r["torchserve"]).items()]
    series += [(f"llama-server, {s}", d) for s, d in _by_sampling(r["llama_server"]).items()]
    series.append(("one at a time (greedy)", r["single"]))
    for name, data in series:
        if data:
            xs = sorted(int(k) for k in data)
            ax.plot(xs, [data[x]["tokens_per_s"] for x in xs], marker="o", label=name,
                    linestyle="--" if "sampled" in name else "-")
    ax.set_xlabel("concurrent streaming chats")
    ax.set_ylabel("tokens/s (all streams)")
    ax.set_title("Default model on CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
