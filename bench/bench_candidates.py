"""Ways to find a sampled sequence's candidates on the CPU, side by side (issue #18).

    .venv/bin/python bench/bench_candidates.py [--rows 32] [--vocab 128256] [--m 104] [--repeats 50]

Random logits for `--rows` sequences of a `--vocab` vocabulary (Llama 3's by default), and the
microseconds per row of:
- argmax: what greedy takes, the floor;
- fast_sampling.top_candidates, one row at a time: what the engine does (a threshold from a strided
  sample, one comparison, the indices above it);
- the same threshold for all rows in one numpy call per pass (np.partition along the rows, one
  comparison of the whole matrix, np.nonzero);
- torch.topk over all rows, and a threshold in torch (the CPU build TorchServe's worker imports),
  on torch's default threads.
Every way's candidates are checked to hold each row's top m.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "handler"))

from fast_sampling import SAMPLE_STRIDE, top_candidates  # noqa: E402


def per_row_us(fn, rows: int, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1e6 * (time.perf_counter() - start) / repeats / rows


def numpy_all_rows(logits: np.ndarray, m: int) -> list[np.ndarray]:
    sample = logits[:, ::SAMPLE_STRIDE]
    j = min(sample.shape[1], 2 * (m // SAMPLE_STRIDE) + 4)
    threshold = np.partition(sample, sample.shape[1] - j, axis=1)[:, sample.shape[1] - j]
    rows, cols = np.nonzero(logits >= threshold[:, None])
    bounds = np.searchsorted(rows, np.arange(logits.shape[0] + 1))
    return [cols[bounds[i]:bounds[i + 1]] for i in range(logits.shape[0])]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--m", type=int, default=104, help="candidates the chain needs: top_k 40 + a 64-token penalty window")
    p.add_argument("--repeats", type=int, default=50)
    a = p.parse_args(argv)
    import torch

    logits = (np.random.default_rng(0).standard_normal((a.rows, a.vocab)) * 3).astype(np.float32)
    as_torch = torch.from_numpy(logits)
    top = [set(np.argpartition(row, a.vocab - a.m)[a.vocab - a.m:].tolist()) for row in logits]

    def torch_threshold():
        sample = as_torch[:, ::SAMPLE_STRIDE]
        j = 2 * (a.m // SAMPLE_STRIDE) + 4
        threshold = torch.topk(sample, j, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
        nz = (as_torch >= threshold).nonzero()
        return [nz[nz[:, 0] == i, 1].numpy() for i in range(a.rows)]

    ways = {
        "argmax, one row at a time (greedy)": (lambda: [int(row.argmax()) for row in logits], None),
        "top_candidates, one row at a time (the engine)": (lambda: [top_candidates(row, a.m) for row in logits], 1),
        "numpy threshold, all rows per call": (lambda: numpy_all_rows(logits, a.m), 1),
        "torch.topk, all rows": (lambda: list(torch.topk(as_torch, a.m, dim=1, sorted=False).indices.numpy()), 1),
        "torch threshold, all rows": (torch_threshold, 1),
    }
    print(f"{a.rows} rows x {a.vocab} logits, top {a.m}, numpy {np.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), median of 3 x {a.repeats} repeats\n")
    print("| way | us per row |\n|---|---:|")
    for name, (fn, check) in ways.items():
        if check:
            got = fn()
            assert all(t <= set(np.asarray(g).tolist()) for t, g in zip(top, got)), f"{name} missed a top candidate"
        us = sorted(per_row_us(fn, a.rows, a.repeats) for _ in range(3))[1]
        print(f"| {name} | {us:.1f} |")


if __name__ == "__main__":
    main()
