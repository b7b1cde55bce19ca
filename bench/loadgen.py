"""Command line of the load generator (the generator itself is chatstack/loadgen.py, which the
benchmarks here and the console's batch-size tuner import).

    python bench/loadgen.py --base http://127.0.0.1:8080 --model llama --key-file .run/key_file.json \
        -c 8 --max-tokens 128 [--route openai] [--temperature 0] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The benchmarks import these names from bench.loadgen; they live in chatstack.loadgen.
from chatstack.loadgen import (  # noqa: E402,F401
    DEFAULT_PROMPTS, GREEDY, SAMPLED, SAMPLINGS, LoadSpec, RequestResult, endpoint, format_summary, one_request,
    percentile, read_key, run_load, summarize,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="N concurrent streaming chat requests; prints TTFT and tokens/s.")
    p.add_argument("--url", help="full endpoint URL (overrides --base/--model/--route/--version)")
    p.add_argument("--base", default="http://127.0.0.1:8080",
                   help="TorchServe inference address (the gateway's, e.g. http://127.0.0.1:8000, with --route gateway)")
    p.add_argument("--model", default="llama")
    p.add_argument("--version")
    p.add_argument("--route", choices=["bare", "openai", "gateway"], default="bare")
    p.add_argument("--key", help="inference key")
    p.add_argument("--key-file", help="TorchServe's key_file.json (for the inference key)")
    p.add_argument("-c", "--concurrency", type=int, default=1)
    p.add_argument("-n", "--requests-per-stream", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable; default: a fixed set of 8)")
    p.add_argument("--extra", default="{}", help="JSON object of more body fields, e.g. '{\"top_k\": 40}'")
    p.add_argument("--seed", type=int, help="seed of the first request; each request gets its own (seed + n)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", action="store_true", help="print the summary and every request as JSON")
    a = p.parse_args(argv)
    key = a.key or (read_key(a.key_file) if a.key_file else None)
    extra = json.loads(a.extra)
    if a.route == "gateway":
        extra.setdefault("model", a.model)   # the gateway picks the model from the body
    spec = LoadSpec(url=a.url or endpoint(a.base, a.model, a.route, a.version), concurrency=a.concurrency,
                    requests_per_stream=a.requests_per_stream, max_tokens=a.max_tokens, temperature=a.temperature,
                    prompts=a.prompt or list(DEFAULT_PROMPTS), key=key, timeout=a.timeout, extra=extra, seed=a.seed)
    results, wall = run_load(spec)
    summary = summarize(results, wall)
    if a.json:
        print(json.dumps({"summary": summary, "requests": [r.as_dict() for r in results]}, indent=2))
    else:
        print(format_summary(summary))
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
