"""Sampled requests: the candidate prefilter (handler/fast_sampling.py) picks what llama.cpp's own
chain picks over the whole vocabulary, and a seeded request gives the same text alone or in a batch."""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np
import pytest

import fast_sampling
from fast_sampling import TOKEN_DATA, candidates_needed, top_candidates
from llama_engine import Engine, GenerationRequest, SamplingParams, make_sampler
from llama_settings import HandlerSettings, engine_config

CHAT = SamplingParams(temperature=0.7, top_p=0.95, top_k=40, min_p=0.05, repeat_penalty=1.1)
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Count from 1 to 10.",
           "Name three colors.", "What is 2+2?", "Tell me a joke.", "Who wrote Hamlet?", "Describe a cat."]


def with_(p: SamplingParams, **changes) -> SamplingParams:
    return SamplingParams(**{**p.__dict__, **changes})


def full_vocabulary_choice(chain, logits: np.ndarray) -> int:
    """What llama_sampler_sample does without backend sampling: every token, in vocabulary
    order, through the chain; then accept."""
    data = np.empty(logits.size, dtype=TOKEN_DATA)
    data["id"] = np.arange(logits.size)
    data["logit"] = logits
    data["p"] = 0.0
    cur_p = llama_cpp.llama_token_data_array(data=data.ctypes.data_as(llama_cpp.llama_token_data_p),
                                             size=logits.size, selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(chain, ctypes.byref(cur_p))
    token = int(cur_p.data[cur_p.selected].id)
    llama_cpp.llama_sampler_accept(chain, token)
    return token


def model_like_logits(rng, n_vocab: int, recent: list[int]) -> np.ndarray:
    """A peaked, heavy-tailed distribution like a language model's, whose favourites are
    often tokens already produced (so the penalties decide between them)."""
    logits = rng.standard_normal(n_vocab, dtype=np.float32) * 2.0
    logits[rng.integers(0, n_vocab, 20)] += rng.uniform(4, 12, 20).astype(np.float32)
    if recent:   # up to 30 of the last tokens among the favourites: the top 40 is mostly penalized tokens
        n = min(len(recent), 30)
        logits[rng.choice(recent, n, replace=False)] += rng.uniform(8, 14, n).astype(np.float32)
    return logits


@pytest.mark.parametrize("params", [
    CHAT,
    with_(CHAT, repeat_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.3, penalty_last_n=16),
    with_(CHAT, top_k=5, top_p=1.0, min_p=0.0, temperature=1.5),
    with_(CHAT, temperature=0.0),                       # greedy after the penalties
    with_(CHAT, repeat_penalty=1.0, top_k=200),
], ids=["chat-defaults", "all-penalties", "top-k-5-hot", "greedy-with-penalties", "no-penalties-top-k-200"])
def test_prefiltered_chain_picks_the_same_tokens_as_the_full_vocabulary(params):
    """Three chains with one seed: the whole vocabulary (llama.cpp's way), fast_sampling.choose,
    and exactly the top candidates_needed() logits (the bound itself, with nothing to spare)."""
    n_vocab = 49152
    rng = np.random.default_rng(7)
    steps = 0
    for seed in range(8):
        p = with_(params, seed=seed)
        full, fast, tight = (make_sampler(p, n_vocab) for _ in range(3))
        history: list[int] = []
        try:
            for step in range(50):
                logits = model_like_logits(rng, n_vocab, sorted(set(history[-40:])))
                expected = full_vocabulary_choice(full, logits)
                assert fast_sampling.choose(fast, p, step, logits) == expected, f"seed {seed} step {step}"
                m = candidates_needed(p, step)
                top = np.sort(np.argpartition(logits, n_vocab - m)[n_vocab - m:])
                assert fast_sampling.choose_among(tight, top, logits[top]) == expected, f"seed {seed} step {step}"
                history.append(expected)
                steps += 1
        finally:
            for chain in (full, fast, tight):
                llama_cpp.llama_sampler_free(chain)
    assert steps == 8 * 50


def test_top_candidates_hold_the_highest_logits():
    rng = np.random.default_rng(3)
    for n, m in [(49152, 104), (128256, 41), (1000, 999), (50, 80), (49152, 3000)]:
        for _ in range(20):
            logits = (rng.standard_normal(n) * rng.uniform(0.1, 5)).astype(np.float32)
            idx = top_candidates(logits, m)
            assert np.all(np.diff(idx) > 0)
            best = np.argsort(-logits, kind="stable")[:min(m, n)]
            assert set(best.tolist()) <= set(idx.tolist())
    flat = np.zeros(49152, dtype=np.float32)      # all equal: any m of them, not the whole vocabulary
    assert fast_sampling.MAX_CANDIDATES >= top_candidates(flat, 50).size >= 50


def test_chains_that_need_the_whole_vocabulary_are_not_prefiltered():
    assert candidates_needed(CHAT, 0) == 40
    assert candidates_needed(CHAT, 10) == 50
    assert candidates_needed(CHAT, 500) == 40 + 64
    assert candidates_needed(with_(CHAT, repeat_penalty=1.0), 500) == 40
    assert candidates_needed(with_(CHAT, top_k=0), 0) is None
    assert candidates_needed(with_(CHAT, grammar='root ::= "a"'), 0) is None
    assert candidates_needed(with_(CHAT, logit_bias={5: 2.0}), 0) is None
    assert candidates_needed(with_(CHAT, repeat_penalty=0.9), 0) is None
    assert candidates_needed(with_(CHAT, presence_penalty=-0.5), 0) is None
    assert candidates_needed(with_(CHAT, frequency_penalty=-0.5), 0) is None


# ---- the engine, on the default model --------------------------------------------------------

@pytest.fixture(scope="module")
def engine(default_gguf):
    eng = Engine(str(default_gguf), engine_config(HandlerSettings(n_threads=2, n_ctx=512, max_tokens=64, n_slots=8),
                                                  batch_size=8, n_workers=1, gpu_id=None))
    yield eng
    eng.close()


def run_all(engine, requests: dict[str, GenerationRequest]) -> dict[str, str]:
    for rid, req in requests.items():
        engine.submit(rid, req)
    texts = {rid: "" for rid in requests}
    while engine.is_busy():
        for rid, upd in engine.step().items():
            texts[rid] += upd.text
    return texts


def requests(prompter, params: SamplingParams, tag: str, max_tokens: int = 40) -> dict[str, GenerationRequest]:
    return {f"{tag}{i}": GenerationRequest(prompter.tokens([{"role": "user", "content": p}]), max_tokens,
                                           with_(params, seed=100 + i))
            for i, p in enumerate(PROMPTS)}


def test_seeded_request_gives_the_same_text_alone_and_in_a_batch_of_eight(engine, prompter):
    batch = requests(prompter, CHAT, "b")
    alone = {}
    for rid, req in batch.items():
        engine.clear_cache()
        alone[rid] = run_all(engine, {rid: req})[rid]
    engine.clear_cache()
    together = run_all(engine, requests(prompter, CHAT, "b"))
    assert together == alone
    assert len(set(together.values())) == len(PROMPTS)


def test_engine_samples_what_llama_cpps_own_sampling_gives(engine, prompter, monkeypatch):
    """Same seeds, same batch: the engine's token choice against llama_sampler_sample over the
    whole vocabulary, for the chat defaults and for a chain with every penalty."""
    for params in (CHAT, with_(CHAT, presence_penalty=0.4, frequency_penalty=0.2, penalty_last_n=8)):
        engine.clear_cache()
        fast = run_all(engine, requests(prompter, params, "f", max_tokens=48))
        with monkeypatch.context() as m:
            m.setattr(fast_sampling, "candidates_needed", lambda sampling, n: None)   # always the full vocabulary
            engine.clear_cache()
            full = run_all(engine, requests(prompter, params, "f", max_tokens=48))
        assert fast == full


def test_requests_that_need_the_whole_vocabulary_are_sampled_beside_prefiltered_ones(engine, prompter):
    mixed = requests(prompter, CHAT, "m")
    for i, rid in enumerate(mixed):
        if i % 2:
            mixed[rid].sampling = with_(mixed[rid].sampling, top_k=0)
    engine.clear_cache()
    first = run_all(engine, mixed)
    engine.clear_cache()
    again = run_all(engine, {rid: GenerationRequest(r.prompt_tokens, r.max_tokens, r.sampling)
                             for rid, r in mixed.items()})
    assert first == again
    assert all(first.values())
