"""The batching engine on the default model, without TorchServe."""

from __future__ import annotations

import time

import numpy as np
import pytest

import llama_engine
from llama_engine import (FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, Engine, EngineConfig, GenerationRequest,
                          SamplingParams, SlotState, StopStringMatcher)
from llama_settings import HandlerSettings, engine_config

GREEDY = SamplingParams(temperature=0)
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Count from 1 to 10.",
           "Name three colors.", "What is 2+2?", "Tell me a joke.", "Who wrote Hamlet?", "Describe a cat."]


def config(**handler_settings) -> EngineConfig:
    """model-config.yaml's defaults with these `handler:` values, 2 threads."""
    return engine_config(HandlerSettings(**{"n_threads": 2, "max_tokens": 64, **handler_settings}),
                         batch_size=1, n_workers=1, gpu_id=None)


@pytest.fixture(scope="module")
def engine(default_gguf):
    eng = Engine(str(default_gguf), config(n_slots=8, n_ctx=1024))
    yield eng
    eng.close()


def chat_tokens(prompter, text):
    return prompter.tokens([{"role": "user", "content": text}])


def run_all(engine, requests: dict[str, GenerationRequest], on_step=None):
    """Submit, step until idle; returns {id: (text, final Update)} and the order requests finished in."""
    for rid, req in requests.items():
        engine.submit(rid, req)
    texts = {rid: "" for rid in requests}
    finals, order, step = {}, [], 0
    while engine.is_busy():
        for rid, upd in engine.step().items():
            texts[rid] = texts.get(rid, "") + upd.text
            if upd.finished:
                finals[rid] = upd
                order.append(rid)
        step += 1
        if on_step:
            on_step(step, texts)
    return {rid: (texts[rid], finals[rid]) for rid in finals}, order


def test_eight_prompts_decoded_together_equal_each_decoded_alone(engine, prompter):
    alone = {}
    for i, p in enumerate(PROMPTS):
        engine.clear_cache()
        out, _ = run_all(engine, {f"alone{i}": GenerationRequest(chat_tokens(prompter, p), 48, GREEDY)})
        alone[i] = out[f"alone{i}"][0]
    engine.clear_cache()
    busy = []
    together, _ = run_all(engine, {f"t{i}": GenerationRequest(chat_tokens(prompter, p), 48, GREEDY)
                                   for i, p in enumerate(PROMPTS)},
                          on_step=lambda step, texts: busy.append(engine.stats.slots_active))
    assert [together[f"t{i}"][0] for i in range(8)] == [alone[i] for i in range(8)]
    assert max(busy) == 8


def test_engine_batches_several_sequences_per_decode(engine, prompter):
    calls, seqs = engine.stats.decode_calls, engine.stats.sequences_decoded
    run_all(engine, {f"b{i}": GenerationRequest(chat_tokens(prompter, p), 24, GREEDY)
                     for i, p in enumerate(PROMPTS[:4])})
    per_call = (engine.stats.sequences_decoded - seqs) / (engine.stats.decode_calls - calls)
    assert per_call > 2.5, f"only {per_call:.2f} sequences per llama_decode"


def test_busy_slots_move_down_so_one_decode_is_one_pass_and_answers_do_not_change(engine, prompter, monkeypatch):
    """llama.cpp decodes only consecutive sequence ids in one ubatch; the engine keeps the
    busy slots on the lowest ids (moving a slot copies its KV), and no answer changes."""
    lengths = [40, 4, 30, 12, 40, 6]    # short ones finish first and leave holes below long ones
    reqs = {f"m{i}": GenerationRequest(chat_tokens(prompter, PROMPTS[i]), n, GREEDY, ignore_eos=True)
            for i, n in enumerate(lengths)}
    alone = {}
    for rid, req in reqs.items():
        engine.clear_cache()
        alone[rid] = run_all(engine, {rid: req})[0][rid][0]
    engine.clear_cache()
    moves = engine.stats.slot_moves
    decoded = []   # the sequence ids of each llama_decode's batch
    fill_batch = engine._fill_batch

    def recording_fill_batch():
        plan = fill_batch()
        decoded.append([slot.seq_id for slot, _, _ in plan])
        return plan

    monkeypatch.setattr(engine, "_fill_batch", recording_fill_batch)
    together, _ = run_all(engine, reqs)
    assert engine.stats.slot_moves > moves
    assert all(ids == list(range(len(ids))) for ids in decoded), decoded
    assert {rid: text for rid, (text, _) in together.items()} == alone


def test_a_next_turn_admitted_to_a_high_slot_moves_down_keeping_its_cached_prefix(engine, prompter):
    engine.clear_cache()
    turns = {f"c{i}": [{"role": "user", "content": p}] for i, p in enumerate(PROMPTS[:4])}
    first, _ = run_all(engine, {rid: GenerationRequest(prompter.tokens(t), 16, GREEDY) for rid, t in turns.items()})
    follow = turns["c3"] + [{"role": "assistant", "content": first["c3"][0]}, {"role": "user", "content": "Why?"}]
    moves = engine.stats.slot_moves
    out, _ = run_all(engine, {"next": GenerationRequest(prompter.tokens(follow), 16, GREEDY)})
    assert engine.stats.slot_moves == moves + 1
    assert out["next"][1].cached_tokens >= len(prompter.tokens(turns["c3"]))
    engine.clear_cache()
    cold, _ = run_all(engine, {"cold": GenerationRequest(prompter.tokens(follow), 16, GREEDY)})
    assert out["next"][0] == cold["cold"][0]


def test_short_request_sent_during_a_long_one_finishes_first(engine, prompter):
    engine.submit("long", GenerationRequest(chat_tokens(prompter, "Write a long story about a dragon."), 200,
                                            GREEDY))
    for _ in range(5):
        engine.step()
    out, order = run_all(engine, {"short": GenerationRequest(chat_tokens(prompter, "Say yes."), 4, GREEDY)})
    assert order == ["short", "long"]
    assert out["long"][1].completion_tokens > out["short"][1].completion_tokens


def test_second_turn_reuses_the_first_turns_cached_prefix(engine, prompter):
    turn1 = [{"role": "user", "content": "My name is Ada. Remember it."}]
    out, _ = run_all(engine, {"turn1": GenerationRequest(prompter.tokens(turn1), 24, GREEDY)})
    answer = out["turn1"][0]
    turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "What is my name?"}]
    reused_before = engine.stats.tokens_reused
    out, _ = run_all(engine, {"turn2": GenerationRequest(prompter.tokens(turn2), 8, GREEDY)})
    reused = engine.stats.tokens_reused - reused_before
    assert out["turn2"][1].cached_tokens == reused
    assert reused >= len(prompter.tokens(turn1)), "turn 2 must not re-read turn 1"


def test_second_turn_reads_only_its_new_message_when_answers_are_cached(engine, prompter):
    turn1 = [{"role": "user", "content": "My name is Grace. Remember it."}]
    out, _ = run_all(engine, {"t1": GenerationRequest(prompter.tokens(turn1), 24, GREEDY)})
    answer, final = out["t1"]
    turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "What is my name?"}]
    out, _ = run_all(engine, {"t2": GenerationRequest(prompter.tokens(turn2), 8, GREEDY)})
    # all of turn 1's prompt and (but for the last sampled token, never decoded) its answer
    assert out["t2"][1].cached_tokens >= len(prompter.tokens(turn1)) + final.completion_tokens - 2


def test_without_cache_answers_a_slot_keeps_only_the_prompt_and_reuses_whole_chunks_of_it(default_gguf, prompter):
    eng = Engine(str(default_gguf), config(n_slots=2, n_ctx=512, prefill_chunk=16, cache_answers=False))
    try:
        turn1 = [{"role": "user", "content": "My name is Grace. Remember it."}]
        out, _ = run_all(eng, {"t1": GenerationRequest(prompter.tokens(turn1), 24, GREEDY)})
        assert [s.cached for s in eng.slots if s.cached] == [prompter.tokens(turn1)]
        turn2 = turn1 + [{"role": "assistant", "content": out["t1"][0]}, {"role": "user", "content": "My name?"}]
        out, _ = run_all(eng, {"t2": GenerationRequest(prompter.tokens(turn2), 8, GREEDY)})
        n_turn1 = len(prompter.tokens(turn1))
        assert out["t2"][1].cached_tokens == n_turn1 - n_turn1 % 16
    finally:
        eng.close()


def test_without_cache_answers_a_prompt_reads_the_same_from_a_cold_slot_and_after_a_cached_prefix(
        default_gguf, prompter, monkeypatch):
    """What lets replicas answer alike (deploy/README.md): the KV of a prompt does not depend on
    how much of it a slot held before, since it is read in chunks at fixed positions."""
    eng = Engine(str(default_gguf), config(n_slots=1, n_ctx=512, n_batch=64, prefill_chunk=16, cache_answers=False))
    first_logits = []
    get_logits = llama_engine.llama_cpp.llama_get_logits_ith

    def keep_a_copy(ctx, i):
        pointer = get_logits(ctx, i)
        first_logits.append(np.ctypeslib.as_array(pointer, shape=(eng.n_vocab,)).copy())
        return pointer

    monkeypatch.setattr(llama_engine.llama_cpp, "llama_get_logits_ith", keep_a_copy)
    prompt = chat_tokens(prompter, "Describe, in a few sentences, a walk along a river on a cold morning, "
                                   "with the birds, the mist over the water and the town waking up.")
    assert len(prompt) > 3 * 16

    def read(rid):
        first_logits.clear()
        out, _ = run_all(eng, {rid: GenerationRequest(prompt, 32, GREEDY, ignore_eos=True)})
        return out[rid], first_logits[0]

    try:
        (cold, cold_final), cold_logits = read("cold")
        eng.clear_cache()
        run_all(eng, {"prefix": GenerationRequest(prompt[:37], 1, GREEDY)})
        (warm, warm_final), warm_logits = read("warm")
        assert (cold_final.cached_tokens, warm_final.cached_tokens) == (0, 32)   # whole chunks of the 37
        assert np.array_equal(cold_logits, warm_logits)
        assert warm == cold and warm_final.completion_tokens == 32
    finally:
        eng.close()


def test_greedy_argmax_picks_the_tokens_llama_cpps_greedy_sampler_picks(engine, prompter, monkeypatch):
    prompt = chat_tokens(prompter, "Describe a rainy day in a small town.")
    engine.clear_cache()
    fast, _ = run_all(engine, {"fast": GenerationRequest(prompt, 40, GREEDY)})
    monkeypatch.setattr(SamplingParams, "is_plain_greedy", property(lambda self: False))
    engine.clear_cache()
    chain, _ = run_all(engine, {"chain": GenerationRequest(prompt, 40, GREEDY)})
    assert fast["fast"][0] == chain["chain"][0] and fast["fast"][1].completion_tokens == 40


def test_run_returns_when_a_request_gets_its_first_token_however_large_the_budget(engine, prompter):
    engine.submit("first", GenerationRequest(chat_tokens(prompter, "Tell me a long story."), 100, GREEDY))
    updates = engine.run(budget_s=60)
    assert updates["first"].first_token and updates["first"].completion_tokens == 1
    more = engine.run(budget_s=1.0)   # later calls keep stepping within the budget
    assert more["first"].completion_tokens > 2
    engine.cancel("first")
    engine.step()


def test_a_slot_reads_the_prompt_then_generates_then_is_idle(engine, prompter):
    engine.clear_cache()
    engine.submit("s", GenerationRequest(chat_tokens(prompter, "Say hi. " * 100), 3, GREEDY))
    states = []
    while engine.is_busy():
        engine.step()
        states.append(engine.slots[0].state)
    assert states[0] == SlotState.READING_PROMPT     # a prompt longer than one prefill chunk
    assert states[-3:] == [SlotState.GENERATING, SlotState.GENERATING, SlotState.IDLE]


def test_stats_show_each_slot_and_the_waiting_requests_as_they_move(default_gguf, prompter):
    """Two slots, three requests: one waits; each slot's state and context as the steps go."""
    small = Engine(str(default_gguf), config(n_slots=2, n_ctx=512))
    try:
        assert [s.state for s in small.stats.slots] == [SlotState.IDLE] * 2
        for i in range(3):
            small.submit(f"r{i}", GenerationRequest(chat_tokens(prompter, f"Say hi {i}."), 4, GREEDY))
        seen = []
        while small.is_busy():
            finals = {rid: u for rid, u in small.step().items() if u.finished}
            stats = small.stats
            seen.append((stats.requests_waiting, stats.slots_reading_prompt, stats.slots_generating))
            assert stats.slots_active == sum(s.state is not SlotState.IDLE for s in stats.slots)
            assert [s.context_tokens for s in stats.slots] == [len(s.cached) for s in small.slots]
            for rid, upd in finals.items():
                times = upd.times
                assert times.arrived_at <= times.started_at <= times.first_token_at <= times.finished_at, rid
        assert seen[0] == (1, 0, 2)        # both slots read a short prompt whole and generate at once
        assert seen[-1] == (0, 0, 0) and all(s.state is SlotState.IDLE for s in small.stats.slots)
        # an idle slot keeps its prompt and all of its answer but the last token, never decoded
        assert sorted(s.context_tokens for s in small.stats.slots)[0] > 4
    finally:
        small.close()


def test_a_request_that_never_got_a_slot_has_no_start_time(engine, prompter):
    arrived = time.monotonic() - 1.0
    handle = engine.submit("late", GenerationRequest(chat_tokens(prompter, "Hi."), 4, GREEDY, arrived_at=arrived))
    handle.cancel()
    update = engine.step()["late"]
    assert update.finish_reason == FINISH_CANCELLED
    assert update.times.arrived_at == arrived and update.times.started_at is None and update.times.first_token_at is None


def test_cancelled_request_frees_its_slot_at_the_next_step(engine, prompter):
    handle = engine.submit("gone", GenerationRequest(chat_tokens(prompter, "Tell me a very long story."), 500,
                                                     GREEDY))
    for _ in range(3):
        engine.step()
    assert engine.stats.slots_active == 1 and handle.id == "gone"
    handle.cancel()
    updates = engine.step()
    assert updates["gone"].finished and updates["gone"].finish_reason == FINISH_CANCELLED
    assert engine.stats.slots_active == 0 and not engine.is_busy()
    assert all(slot.state is SlotState.IDLE for slot in engine.slots)
    out, _ = run_all(engine, {"next": GenerationRequest(chat_tokens(prompter, "Say hi."), 4, GREEDY)})
    assert out["next"][0]


def test_max_tokens_ends_with_length(engine, prompter):
    out, _ = run_all(engine, {"m": GenerationRequest(chat_tokens(prompter, "Count to one hundred."), 5, GREEDY)})
    assert out["m"][1].finish_reason == FINISH_LENGTH and out["m"][1].completion_tokens == 5


def test_end_of_generation_token_ends_with_stop(engine, prompter):
    out, _ = run_all(engine, {"e": GenerationRequest(chat_tokens(prompter, "What is 2+2?"), 200, GREEDY)})
    text, final = out["e"]
    assert final.finish_reason == FINISH_STOP and final.completion_tokens < 200
    assert "<|im_end|>" not in text


def test_stop_string_ends_the_stream_and_never_leaks(engine, prompter):
    prompt = chat_tokens(prompter, "Count from 1 to 10, separated by commas.")
    full, _ = run_all(engine, {"full": GenerationRequest(prompt, 40, GREEDY)})
    assert "5" in full["full"][0]
    seen = []
    out, _ = run_all(engine, {"s": GenerationRequest(prompt, 40, GREEDY, stop=["5"])},
                     on_step=lambda step, texts: seen.append(texts["s"]))
    text, final = out["s"]
    assert final.finish_reason == FINISH_STOP
    assert text == full["full"][0].split("5")[0]
    assert all("5" not in partial for partial in seen)


def test_stop_string_matcher_holds_back_a_possible_start():
    m = StopStringMatcher(["</end>"])
    assert m.feed("hello </e") == ("hello ", False)
    assert m.feed("xtra") == ("</extra", False)
    assert m.feed(" </end> tail") == (" ", True)


@pytest.mark.parametrize("prompt, expected", [
    ("🎉🎉🎉 party 🎉🎉🎉 party 🎉🎉🎉 party", "🎉"),
    ("你好，世界。你好，世界。你好，世界。你好，", "世"),
])
def test_multibyte_text_streams_intact(engine, prompt, expected):
    # A plain completion the small model continues with the same multi-byte characters.
    engine.submit("u", GenerationRequest(engine.tokenize(prompt), 19, GREEDY))
    pieces = []
    while engine.is_busy():
        pieces.extend(upd.text for upd in engine.step().values())
    assert all("\ufffd" not in p for p in pieces), pieces
    assert expected in "".join(pieces)
    assert "" in pieces, "a character split over several tokens must be held back until complete"


def test_prompt_longer_than_the_context_is_refused(engine):
    with pytest.raises(ValueError, match="the prompt has 2000 tokens but at most 1023 fit"):
        engine.submit("big", GenerationRequest(list(range(100, 100 + 2000)), 8, GREEDY))
    assert not engine.is_busy()


def test_more_slots_than_a_decode_batch_holds_is_a_configuration_error():
    with pytest.raises(ValueError, match="raise n_batch or lower the slots"):
        config(n_slots=600, n_batch=512)


def test_over_long_conversation_keeps_system_prompt_and_newest_turns(prompter):
    system = {"role": "system", "content": "You are terse."}
    turns = []
    for i in range(40):
        turns.append({"role": "user", "content": f"Question {i}: " + "blah " * 20})
        turns.append({"role": "assistant", "content": f"Answer {i}: " + "meh " * 20})
    turns.append({"role": "user", "content": "Last question?"})
    fitted = prompter.fit([system] + turns, n_fit=600)
    assert 0 < fitted.messages_dropped < len(turns)
    assert len(fitted.tokens) <= 600
    text = prompter.render([system] + turns[fitted.messages_dropped:])
    assert fitted.tokens == prompter.tokens([system] + turns[fitted.messages_dropped:])
    assert "You are terse." in text and "Last question?" in text and "Question 0:" not in text
    assert turns[fitted.messages_dropped]["role"] == "user"


def test_single_message_too_long_for_the_context_is_refused(prompter):
    from chat_prompt import ContextOverflow

    with pytest.raises(ContextOverflow, match="at most 100 fit"):
        prompter.fit([{"role": "user", "content": "word " * 500}], n_fit=100)


def test_ignore_eos_keeps_generating_to_max_tokens(engine, prompter):
    out, _ = run_all(engine, {"i": GenerationRequest(chat_tokens(prompter, "What is 2+2?"), 40, GREEDY,
                                                     ignore_eos=True)})
    assert out["i"][1].finish_reason == FINISH_LENGTH and out["i"][1].completion_tokens == 40
