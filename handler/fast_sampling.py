"""Sampling a token without copying the whole vocabulary: the request's own llama.cpp
sampler chain, run over the few candidates that can win instead of all of them.

llama.cpp's `llama_sampler_sample` copies every logit of the vocabulary (49k tokens for
SmolLM2, 128k for Llama 3) into a candidate array, then its penalties sampler looks every
candidate up in a hash map and top-k sorts them, per sequence and per token. For the
usual chain (penalties, top-k, top-p, min-p, temperature, dist) only the top-k tokens
after the penalties matter, and penalties with repeat_penalty >= 1 and presence and
frequency penalties >= 0 only *lower* the logits of the tokens in the penalty window.
So the top k after the penalties are among the top (k + W) before them, W being the
number of distinct tokens in the window (at most min(penalty_last_n, tokens accepted)):
at least k of those are not penalized and keep logits above every token outside.

`choose` finds a superset of those candidates with numpy (a threshold from a strided
sample of the logits, then one vectorized comparison: no sort of the vocabulary; about
twice the time of the argmax greedy takes), puts
them in a small `llama_token_data_array` in vocabulary order, runs the request's chain on
it (`llama_sampler_apply`) and accepts the token (`llama_sampler_accept`), exactly what
`llama_sampler_sample` does over the full vocabulary. The chain sees the same top-k tokens
with the same logits and draws the same random number, so a seed gives the same tokens
(tests/test_sampling.py checks it against llama.cpp's own full-vocabulary sampling).
The one difference is the order of tokens with exactly equal logits inside the top k, which
std::partial_sort leaves unspecified in both cases.

Chains that cannot be cut this way (top_k <= 0, a grammar, a logit bias, penalties that
raise logits) use `llama_sampler_sample` over the full vocabulary, for that sequence only.
"""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np

# llama_token_data {int32 id; float logit; float p}, as numpy sees it
TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
assert TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)

SAMPLE_STRIDE = 32           # the threshold comes from every 32nd logit
MAX_CANDIDATES = 4096        # more than this above the threshold (many equal logits): cut to the top m


def candidates_needed(sampling, n_accepted: int) -> int | None:
    """How many of the highest raw logits surely hold the token the chain of `sampling`
    (llama_engine.SamplingParams) picks after `n_accepted` accepted tokens; None when the
    chain must see the whole vocabulary."""
    if sampling.grammar or sampling.logit_bias:
        return None
    if sampling.repeat_penalty < 1.0 or sampling.presence_penalty < 0 or sampling.frequency_penalty < 0:
        return None   # such penalties raise logits: a token outside the top may climb into it
    penalized = (sampling.penalty_last_n > 0 and (sampling.repeat_penalty != 1.0 or sampling.presence_penalty
                                                   or sampling.frequency_penalty))
    window = min(sampling.penalty_last_n, n_accepted) if penalized else 0
    if sampling.temperature <= 0:
        return 1 + window                     # greedy after the penalties
    if sampling.top_k <= 0:
        return None
    return sampling.top_k + window


def top_candidates(logits: np.ndarray, m: int) -> np.ndarray:
    """Indices, in increasing order, of a set of logits that holds the m highest (ties at the
    edge aside); usually a few times m of them. No sort of the whole array."""
    n = logits.size
    if m >= n:
        return np.arange(n, dtype=np.int32)
    sample = logits[::SAMPLE_STRIDE]
    # about 2m logits of the whole array lie above the (2m / stride)-th highest of the sample
    j = min(sample.size, 2 * (m // SAMPLE_STRIDE) + 4)
    threshold = np.partition(sample, sample.size - j)[sample.size - j]
    idx = np.flatnonzero(logits >= threshold)
    if idx.size < m:                          # an unlucky sample: the exact way
        idx = np.sort(np.argpartition(logits, n - m)[n - m:])
    elif idx.size > MAX_CANDIDATES:
        idx = np.sort(idx[np.argpartition(logits[idx], idx.size - m)[idx.size - m:]])
    return idx.astype(np.int32, copy=False)


def choose(chain, sampling, n_accepted: int, logits: np.ndarray) -> int:
    """The token `chain` (the request's llama.cpp sampler chain) picks from `logits` (the
    float32 logits of one sequence, the whole vocabulary), accepted into the chain. The
    caller has checked candidates_needed(sampling, n_accepted) is not None."""
    m = candidates_needed(sampling, n_accepted)
    idx = top_candidates(logits, m)
    return choose_among(chain, idx, logits[idx])


def choose_among(chain, ids: np.ndarray, logits: np.ndarray) -> int:
    """The token `chain` picks from these candidates (ids and their logits), accepted into the chain."""
    data = np.empty(ids.size, dtype=TOKEN_DATA)
    data["id"] = ids
    data["logit"] = logits
    data["p"] = 0.0
    cur_p = llama_cpp.llama_token_data_array(
        data=data.ctypes.data_as(llama_cpp.llama_token_data_p), size=ids.size, selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(chain, ctypes.byref(cur_p))
    if not 0 <= cur_p.selected < cur_p.size:
        raise RuntimeError(f"the sampler chain selected no token ({cur_p.selected} of {cur_p.size} candidates)")
    token = int(cur_p.data[cur_p.selected].id)   # a sampler may sort the array, or point it elsewhere
    llama_cpp.llama_sampler_accept(chain, token)
    return token


def backend_choice(ctx, index: int, chain, sampling, n_accepted: int) -> int | None:
    """The token for output `index` when llama.cpp's backend sampling ran for its sequence (a
    sampler attached with llama_set_sampler); None when it did not (then the logits are there).

    - The request's whole chain ran on the backend: its token, accepted into the chain (as
      llama_sampler_sample does).
    - A top-k sampler ran there: its K candidates and their logits came back instead of the
      vocabulary; plain greedy (chain None) takes their argmax, lowest id first as numpy's
      argmax over the vocabulary does; a chain that needs at most K candidates runs on them,
      as `choose` would (the same token)."""
    token = llama_cpp.llama_get_sampled_token_ith(ctx, index)
    if token != llama_cpp.LLAMA_TOKEN_NULL:
        if chain is not None:
            llama_cpp.llama_sampler_accept(chain, token)
        return int(token)
    n = llama_cpp.llama_get_sampled_candidates_count_ith(ctx, index)
    if not n:
        return None
    ids = np.ctypeslib.as_array(llama_cpp.llama_get_sampled_candidates_ith(ctx, index), shape=(n,))
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_sampled_logits_ith(ctx, index), shape=(n,))
    if chain is None:
        return int(ids[logits == logits.max()].min())
    m = candidates_needed(sampling, n_accepted)
    if m is None or m > n:
        raise RuntimeError(f"the backend kept {n} candidates but this request's chain needs "
                           f"{'the whole vocabulary' if m is None else m}")
    order = np.argsort(ids, kind="stable")
    return choose_among(chain, ids[order], logits[order])
