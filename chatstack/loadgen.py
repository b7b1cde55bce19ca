"""A small load generator for the chat endpoint: N concurrent streaming requests.

Dependencies: requests and the standard library (one thread per stream).

Routes:
- "bare":   POST {base}/predictions/{model}[/{version}] with {"messages", "stream": true};
            the answer is newline-delimited chat.completion.chunk JSON.
- "openai": POST {base}/predictions/{model}/{version}/v1/chat/completions; the
            answer is server-sent events (`data: {...}` ... `data: [DONE]`).
- "gateway": POST {base}/v1/chat/completions on the OpenAI gateway's address
            (chatstack/openai_gateway.py); the body's `model` (LoadSpec.extra) picks the
            model, the only registered one without it; server-sent events as above.

Each request reports its time to first token (first chunk carrying text), its
token counts (usage in the final chunk), duration and error. `summarize()` turns
a run into aggregate tokens/s, p50/p95 TTFT and per-stream tokens/s.

As a library (the benchmarks in bench/ and the console's batch-size tuner):
    from chatstack.loadgen import LoadSpec, run_load, summarize
    results, wall = run_load(LoadSpec(url=endpoint("http://127.0.0.1:8080", "llama"), key=KEY,
                                      concurrency=8, max_tokens=128))
    print(summarize(results, wall))

From the command line (bench/loadgen.py, a thin CLI over this module):
    python bench/loadgen.py --base http://127.0.0.1:8080 --model llama --key-file .run/key_file.json \
        -c 8 --max-tokens 128 [--route openai] [--temperature 0] [--json]
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import requests

DEFAULT_PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten-year-old.",
    "List ten ideas for a weekend trip and say why each is worth it.",
    "Describe the water cycle in detail.",
    "Write a poem about autumn in a big city.",
    "What are the pros and cons of working from home? Answer at length.",
    "Summarize the history of the printing press.",
    "Give step-by-step instructions for baking bread at home.",
]

STOPPED = "stopped before the end (should_stop)"

# The two sampling settings the benchmarks compare (the same on every server):
# greedy with no penalties (the argmax fast path), and the chat defaults of model-config.yaml
# and the chat client (llama.cpp's sampler chain), each request with its own seed (LoadSpec.seed).
GREEDY = {"temperature": 0.0, "repeat_penalty": 1.0}
SAMPLED = {"temperature": 0.7, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.1}
SAMPLINGS = {"greedy": GREEDY, "sampled": SAMPLED}


def endpoint(base: str, model: str = "llama", route: str = "bare", version: str | None = None) -> str:
    """The URL of the chat endpoint on a TorchServe inference address (for "gateway": the gateway's)."""
    base = base.rstrip("/")
    if route == "openai":
        return f"{base}/predictions/{model}/{version or '1.0'}/v1/chat/completions"
    if route == "gateway":
        return f"{base}/v1/chat/completions"
    if route != "bare":
        raise ValueError(f"route must be 'bare', 'openai' or 'gateway', got {route!r}")
    return f"{base}/predictions/{model}" + (f"/{version}" if version else "")


def read_key(key_file: str | Path) -> str | None:
    """The inference key from TorchServe's key_file.json."""
    data = json.loads(Path(key_file).read_text())
    return data.get("inference", {}).get("key")


@dataclass
class LoadSpec:
    url: str                                  # full endpoint URL (see endpoint())
    concurrency: int = 1                      # streams open at once
    requests_per_stream: int = 1              # requests each stream sends, one after another
    max_tokens: int = 128
    temperature: float | None = None          # None: the server's default
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    key: str | None = None                    # inference key (Authorization: Bearer)
    timeout: float = 600.0                    # per request, seconds (connect and between reads)
    extra: dict = field(default_factory=dict)  # more body fields (top_k, seed, ...)
    sse: bool | None = None                   # None: decided from the URL (/v1/ = SSE)
    seed: int | None = None                   # seed of the first request; each request gets its own (seed + n)


@dataclass
class RequestResult:
    stream: int
    index: int
    ok: bool = False
    error: str | None = None
    status: int | None = None
    start: float = 0.0                        # time.monotonic() when the request was sent
    first_token: float | None = None          # when the first chunk with text came
    end: float = 0.0
    chunks: int = 0
    text_chars: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def decode_tokens_per_s(self) -> float | None:
        """This stream's speed after its first token."""
        if self.first_token is None or not self.completion_tokens or self.completion_tokens < 2:
            return None
        dt = self.end - self.first_token
        return (self.completion_tokens - 1) / dt if dt > 0 else None

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(ttft=self.ttft, duration=self.duration, decode_tokens_per_s=self.decode_tokens_per_s)
        return d


def _chunks(resp: requests.Response, sse: bool):
    """JSON objects of a streaming answer, NDJSON or SSE."""
    for line in resp.iter_lines(decode_unicode=False):
        line = line.strip()
        if not line:
            continue
        if sse:
            if not line.startswith(b"data:"):
                continue
            line = line[5:].strip()
            if line == b"[DONE]":
                return
        yield json.loads(line)


def one_request(session: requests.Session, spec: LoadSpec, stream: int, index: int,
                should_stop: Callable[[], bool] = lambda: False) -> RequestResult:
    """One streaming request; `should_stop()` true between two chunks closes it (which stops its generation)."""
    res = RequestResult(stream=stream, index=index)
    prompt = spec.prompts[(stream * spec.requests_per_stream + index) % len(spec.prompts)]
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": spec.max_tokens, "stream": True,
            **spec.extra}
    if spec.temperature is not None:
        body["temperature"] = spec.temperature
    if spec.seed is not None:
        body["seed"] = spec.seed + stream * spec.requests_per_stream + index
    headers = {"Authorization": f"Bearer {spec.key}"} if spec.key else {}
    sse = spec.sse if spec.sse is not None else "/v1/" in spec.url
    res.start = time.monotonic()
    try:
        with session.post(spec.url, json=body, headers=headers, stream=True, timeout=spec.timeout) as resp:
            res.status = resp.status_code
            if resp.status_code >= 400:
                res.error = f"HTTP {resp.status_code}: {resp.text[:300]}"
                return res
            for chunk in _chunks(resp, sse):
                if should_stop():
                    res.error = STOPPED
                    return res
                res.chunks += 1
                if "error" in chunk:
                    err = chunk["error"]
                    res.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)
                    return res
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                    if text:
                        res.text_chars += len(text)
                        if res.first_token is None:
                            res.first_token = time.monotonic()
                    if choice.get("finish_reason"):
                        res.finish_reason = choice["finish_reason"]
                usage = chunk.get("usage")
                if usage:
                    res.prompt_tokens = usage.get("prompt_tokens")
                    res.completion_tokens = usage.get("completion_tokens")
        if res.completion_tokens is None:
            res.error = "the stream ended without usage (no final chunk)"
        else:
            res.ok = True
    except (requests.RequestException, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        res.end = time.monotonic()
    return res


def run_load(spec: LoadSpec, should_stop: Callable[[], bool] = lambda: False) -> tuple[list[RequestResult], float]:
    """Run spec.concurrency streams at once; returns (results, wall seconds).

    `should_stop()` (a cancel button, a time limit) is asked between chunks and between
    requests: once it is true, open requests are closed with error STOPPED and no more start."""
    results: list[RequestResult] = []
    lock = threading.Lock()
    go = threading.Barrier(spec.concurrency + 1)

    def worker(stream: int):
        session = requests.Session()
        go.wait()
        try:
            for i in range(spec.requests_per_stream):
                if should_stop():
                    break
                r = one_request(session, spec, stream, i, should_stop)
                with lock:
                    results.append(r)
        finally:
            session.close()

    threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in range(spec.concurrency)]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.monotonic()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    results.sort(key=lambda r: (r.stream, r.index))
    return results, wall


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(results: list[RequestResult], wall_s: float | None = None) -> dict:
    """Aggregate figures of one run.

    tokens_per_s:          completion tokens of all requests / wall time (first send to last end)
    ttft_p50_s, ttft_p95_s: time to first token
    stream_tokens_per_s_*:  each request's decode speed after its first token (median, mean)
    """
    ok = [r for r in results if r.ok]
    if wall_s is None:
        wall_s = (max(r.end for r in results) - min(r.start for r in results)) if results else 0.0
    tokens = sum(r.completion_tokens or 0 for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    speeds = [s for s in (r.decode_tokens_per_s for r in ok) if s is not None]
    errors = [r.error for r in results if not r.ok]
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(errors),
        "first_errors": errors[:3],
        "wall_s": wall_s,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p95_s": percentile(ttfts, 95),
        "stream_tokens_per_s_p50": percentile(speeds, 50),
        "stream_tokens_per_s_mean": statistics.fmean(speeds) if speeds else None,
        "finish_reasons": {k: sum(1 for r in ok if r.finish_reason == k)
                           for k in sorted({r.finish_reason or "none" for r in ok})},
    }


def format_summary(s: dict) -> str:
    f = lambda v, spec=".2f": "-" if v is None else format(v, spec)  # noqa: E731
    return (f"{s['ok']}/{s['requests']} ok, {s['completion_tokens']} tokens in {f(s['wall_s'])} s: "
            f"{f(s['tokens_per_s'], '.1f')} tok/s; TTFT p50 {f(s['ttft_p50_s'], '.3f')} s, "
            f"p95 {f(s['ttft_p95_s'], '.3f')} s; per stream {f(s['stream_tokens_per_s_p50'], '.1f')} tok/s (p50)"
            + (f"; errors: {s['first_errors']}" if s["errors"] else ""))

