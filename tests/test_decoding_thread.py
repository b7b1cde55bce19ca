"""The engine stepped by a thread of its own between handler calls (decoding_thread.py), on the default model."""

from __future__ import annotations

import threading
import time

import pytest

from decoding_thread import DecodingThread
from llama_engine import FINISH_CANCELLED, FINISH_LENGTH, Engine, GenerationRequest, SamplingParams
from test_engine import PROMPTS, chat_tokens, config

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def engine(default_gguf):
    eng = Engine(str(default_gguf), config(n_slots=8, n_ctx=1024))
    yield eng
    eng.close()


@pytest.fixture
def decoder(engine):
    engine.clear_cache()
    thread = DecodingThread(engine)
    yield thread
    thread.stop()          # the module's engine stays open for the next test


def collect(decoder, budget_s=0.05) -> tuple[dict[str, str], dict, int]:
    """Call run() until nothing is left, as the handler does; returns the texts, the final
    updates and how many calls it took."""
    texts, finals, calls = {}, {}, 0
    while decoder.is_busy():
        calls += 1
        for rid, upd in decoder.run(budget_s).items():
            texts[rid] = texts.get(rid, "") + upd.text
            if upd.finished:
                finals[rid] = upd
    return texts, finals, calls


def requests(prompter, n, max_tokens=32):
    """n chats, each answer exactly max_tokens long."""
    return {f"r{i}": GenerationRequest(chat_tokens(prompter, PROMPTS[i]), max_tokens, GREEDY, ignore_eos=True)
            for i in range(n)}


def test_the_engine_keeps_decoding_while_nobody_calls_run(decoder, engine, prompter):
    decoder.submit("alone", GenerationRequest(chat_tokens(prompter, PROMPTS[0]), 24, GREEDY))
    calls_before = engine.stats.decode_calls
    deadline = time.monotonic() + 60
    while engine.is_busy() and time.monotonic() < deadline:   # no run() call at all
        time.sleep(0.01)
    assert engine.stats.decode_calls - calls_before >= 24
    texts, finals, calls = collect(decoder)
    assert calls == 1                          # everything was waiting for the one call
    assert finals["alone"].finish_reason == FINISH_LENGTH and finals["alone"].completion_tokens == 24


def test_answers_equal_the_engine_stepped_by_the_caller(decoder, engine, prompter):
    reqs = requests(prompter, 6)
    for rid, req in reqs.items():
        decoder.submit(rid, req)
    threaded, finals, _ = collect(decoder)
    assert sorted(finals) == sorted(reqs)

    decoder.stop()
    engine.clear_cache()
    stepped = {}
    for rid, req in reqs.items():
        engine.submit("again-" + rid, req)
    while engine.is_busy():
        for rid, upd in engine.run(0.05).items():
            stepped[rid.removeprefix("again-")] = stepped.get(rid.removeprefix("again-"), "") + upd.text
    assert threaded == stepped


def test_a_call_returns_at_a_first_token_without_waiting_for_its_budget(decoder, prompter):
    decoder.submit("a", GenerationRequest(chat_tokens(prompter, PROMPTS[1]), 200, GREEDY))
    start = time.monotonic()
    updates = decoder.run(30.0)
    assert updates["a"].first_token
    assert time.monotonic() - start < 10
    decoder.engine.cancel("a")
    collect(decoder)


def test_requests_submitted_and_cancelled_while_it_decodes_all_end(decoder, prompter):
    reqs = requests(prompter, 8, max_tokens=40)
    ids = list(reqs)
    decoder.submit(ids[0], reqs[ids[0]])
    texts, finals = {}, {}

    def handler_calls():
        while decoder.is_busy() or len(finals) < len(ids):
            for rid, upd in decoder.run(0.02).items():
                texts[rid] = texts.get(rid, "") + upd.text
                if upd.finished:
                    finals[rid] = upd

    for rid in ids[1:]:                       # joins while the first decodes
        time.sleep(0.02)
        decoder.submit(rid, reqs[rid])
    decoder.engine.cancel(ids[-1])
    caller = threading.Thread(target=handler_calls)
    caller.start()
    caller.join(timeout=120)
    assert not caller.is_alive()
    assert finals[ids[-1]].finish_reason == FINISH_CANCELLED
    assert all(finals[rid].finish_reason == FINISH_LENGTH and finals[rid].completion_tokens == 40 for rid in ids[:-1])


def test_an_error_in_a_step_reaches_the_next_call_and_decoding_goes_on(decoder, engine, prompter, monkeypatch):
    real_step, failures = engine.step, []

    def step_failing_once():
        if not failures:
            failures.append(1)
            raise RuntimeError("decode broke")
        return real_step()

    monkeypatch.setattr(engine, "step", step_failing_once)
    decoder.submit("x", GenerationRequest(chat_tokens(prompter, PROMPTS[2]), 8, GREEDY))
    with pytest.raises(RuntimeError, match="decode broke"):
        for _ in range(100):
            decoder.run(0.01)
    texts, finals, _ = collect(decoder)
    assert finals["x"].completion_tokens == 8


def test_close_stops_the_thread(default_gguf):
    decoder = DecodingThread(Engine(str(default_gguf), config(n_slots=2, n_ctx=512)))
    decoder.close()
    assert not decoder._thread.is_alive()
