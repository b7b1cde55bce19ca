"""The console's batch-size tuner from the command line, against the console's running TorchServe
(the one its environment names: CHATSTACK_RUN_DIR, CHATSTACK_MODEL_STORE, CHATSTACK_PORTS).

Measures each (batch size, workers) setting at each concurrency level side by side in one run
(chatstack/batch_tuning.py), prints the table and the recommendation for a TTFT limit, and
saves the run where the Tuning page shows it. It applies nothing.

    python bench/tune_batch_size.py --model llama --batch-sizes 1,4,8 --concurrency 1,4,8 \
        --max-tokens 64 --ttft-limit 2
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatstack.batch_tuning import TunePlan, candidates, recommend, results_folder, tune_and_save  # noqa: E402
from chatstack.console_config import ConsoleConfig  # noqa: E402
from chatstack.model_archive import ModelSettings  # noqa: E402


def numbers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Measure batch sizes and worker counts; recommend one for a TTFT limit.")
    p.add_argument("--model", default="llama")
    p.add_argument("--batch-sizes", type=numbers, default=[1, 4, 8, 16])
    p.add_argument("--workers", type=numbers, default=[1])
    p.add_argument("--concurrency", type=numbers, default=[1, 4, 8])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-per-stream", type=int, default=1)
    p.add_argument("--level-limit", type=float, default=30.0, help="seconds a load may take")
    p.add_argument("--ttft-limit", type=float, default=2.0, help="TTFT p95 limit of the recommendation, seconds")
    a = p.parse_args(argv)
    process = ConsoleConfig.from_env().process()
    client = process.client(timeout=60)
    serving = client.describe_model(a.model)[0]
    plan = TunePlan(model=a.model, candidates=tuple(candidates(a.batch_sizes, a.workers)),
                    concurrency=tuple(a.concurrency), max_tokens=a.max_tokens,
                    requests_per_stream=a.requests_per_stream, level_limit_s=a.level_limit)
    print(f"{len(plan.candidates)} settings x {len(plan.concurrency)} loads, at most {plan.limit_s:.0f} s",
          file=sys.stderr)
    run = tune_and_save(client, process.model_store, process.run_dir, plan, serving["modelUrl"],
                        ModelSettings.from_description(serving), threading.Event(),
                        lambda fraction, text: print(f"{fraction:4.0%} {text}", file=sys.stderr))
    print(f"{'setting':<24} {'chats':>5} {'ok':>7} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p95':>9}")
    for r in run.rows:
        f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        print(f"{r.candidate.label:<24} {r.concurrency:>5} {f'{r.ok}/{r.requests}':>7} {f(r.tokens_per_s, '9.1f')} "
              f"{f(r.ttft_p50_s, '9.2f')} {f(r.ttft_p95_s, '9.2f')}" + (f"  {r.error}" if r.error else ""))
    best = recommend(run.rows, a.ttft_limit)
    print(f"recommended for TTFT p95 <= {a.ttft_limit:g} s: "
          + (f"{best.candidate.label} ({best.tokens_per_s:.1f} tokens/s at {best.concurrency} chats at once)"
             if best else "none"))
    print(f"saved in {results_folder(process.run_dir)}", file=sys.stderr)
    return 0 if run.state == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
