"""Soak benchmark: many simulated users chatting multi-turn against a real TorchServe.

    .venv/bin/python bench/soak.py --users 16 --minutes 10 [--out bench/results]

Each user keeps one conversation going (its history grows turn by turn, as in
the chat client, and starts over when it gets long), streaming every answer.
Reports requests completed, errors by kind (any error is a lost answer), p50/p95
time to first token, aggregate tokens/s, and the workers' memory at start and
end. Loopback only; stops by itself after --minutes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_serving import bench_server, worker_memory  # noqa: E402
from bench.loadgen import percentile  # noqa: E402

QUESTIONS = ["What should I cook tonight?", "Tell me about the ocean.", "Why is the sky blue?",
             "Give me a tip for learning piano.", "What is a good name for a cat?", "Explain gravity briefly.",
             "Suggest a weekend hobby.", "How do plants grow?"]


def user_loop(uid, url, key, deadline, record):
    rng = random.Random(uid)
    history = [{"role": "system", "content": "You are a friendly assistant."}]
    session = requests.Session()
    while time.monotonic() < deadline:
        history.append({"role": "user", "content": rng.choice(QUESTIONS)})
        body = {"messages": history, "max_tokens": rng.randint(32, 96), "stream": True}
        start = time.monotonic()
        ttft, text, usage, kind = None, [], None, None
        try:
            with session.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, stream=True,
                              timeout=300) as resp:
                if resp.status_code != 200:
                    kind = f"http_{resp.status_code}"
                else:
                    for line in resp.iter_lines():
                        if not line.strip():
                            continue
                        chunk = json.loads(line)
                        if "error" in chunk:
                            kind = f"error_{chunk['error'].get('type')}"
                            break
                        delta = chunk["choices"][0]["delta"].get("content")
                        if delta:
                            ttft = ttft or time.monotonic() - start
                            text.append(delta)
                        usage = chunk.get("usage") or usage
                    if kind is None and usage is None:
                        kind = "stream_ended_without_finish"
        except requests.RequestException as e:
            kind = type(e).__name__
        record(kind, ttft, usage["completion_tokens"] if usage and not kind else 0)
        if kind:
            history.pop()
            time.sleep(1)
            continue
        history.append({"role": "assistant", "content": "".join(text)})
        if len(history) > 21:  # the user starts a new conversation
            history = history[:1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    server = bench_server(Path(tempfile.mkdtemp(prefix="soak-")), {"batchSize: 8 ": f"batchSize: {args.users} "})
    server.start()
    try:
        client = server.client(timeout=600)
        client.register("llama.mar", initial_workers=1)
        url = f"{server.address('inference')}/predictions/llama"
        lock = threading.Lock()
        errors, ttfts, tokens = Counter(), [], [0]
        done = [0]

        def record(kind, ttft, n_tokens):
            with lock:
                done[0] += 1
                if kind:
                    errors[kind] += 1
                else:
                    ttfts.append(ttft or 0.0)
                    tokens[0] += n_tokens

        # Memory is read after a short warm-up, so the start figure includes the KV cache and buffers.
        warm = threading.Thread(target=user_loop, args=(999, url, client.keys.inference,
                                                        time.monotonic() + 20, lambda *a: None))
        warm.start()
        warm.join()
        mem_start = worker_memory(client, "llama")
        started = time.monotonic()
        deadline = started + args.minutes * 60
        threads = [threading.Thread(target=user_loop, args=(u, url, client.keys.inference, deadline, record))
                   for u in range(args.users)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - started
        mem_end = worker_memory(client, "llama")
    finally:
        server.stop()
    report = {
        "users": args.users, "minutes": args.minutes, "requests_completed": done[0] - sum(errors.values()),
        "errors": dict(errors), "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
        "tokens_per_s": tokens[0] / wall, "memory_start": mem_start, "memory_end": mem_end,
        "memory_change_pct": 100.0 * (mem_end["rss_mb"] - mem_start["rss_mb"]) / mem_start["rss_mb"],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
