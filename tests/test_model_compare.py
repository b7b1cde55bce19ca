"""Compare and replay logic (chatstack/model_compare.py), with a fake client at the HTTP edge.
The real thing, two registered versions in Chromium, is tests/test_compare_browser.py."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from chatstack.conversations import FAILED
from chatstack.model_compare import (MEASURED, SERVER, Comparison, SideAnswer, Target, TurnReplay, compare_messages,
                                     diff_html, diff_ops, list_targets, replay, saved_turns)
from chatstack.server_settings import ServerSettings
from chatstack.torchserve_client import TorchServeError


def message(role, content, status="complete", model=None):
    return SimpleNamespace(role=role, content=content, status=status, model=model)


def chunk(content="", finish=None, **extra):
    return {"choices": [{"delta": {"content": content}, "finish_reason": finish}], **extra}


class FakeClient:
    """Streams the given chunks, `pause` seconds apart; records what it was asked."""

    def __init__(self, chunks=(), pause=0.0, fail=None, answers=None):
        self.chunks, self.pause, self.fail, self.answers = list(chunks), pause, fail, answers or {}
        self.asked = []
        self.closed = threading.Event()

    def chat_stream(self, model, messages, version=None, **params):
        self.asked.append((model, version, messages, params))
        try:
            if self.fail:
                raise self.fail
            for item in self.chunks:
                time.sleep(self.pause)
                yield item
        finally:
            self.closed.set()

    def chat(self, model, messages, version=None, **params):
        self.asked.append((model, version, messages, params))
        answer = self.answers[messages[-1]["content"]]
        if isinstance(answer, Exception):
            raise answer
        return {"choices": [{"message": {"role": "assistant", "content": answer}}]}


def run_to_end(comparison: Comparison, timeout=10) -> None:
    deadline = time.monotonic() + timeout
    while not comparison.done:
        comparison.poll()
        assert time.monotonic() < deadline, "the comparison did not end"
        time.sleep(0.01)


# ---- what is sent ---------------------------------------------------------------------------

def test_compare_sends_the_conversation_then_the_new_message():
    history = [message("user", "Hi"), message("assistant", "broken", status=FAILED), message("user", "Hi?"),
               message("assistant", "Hello")]
    assert compare_messages("Be brief.", history, "Name a color") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Name a color"}]


def test_compare_without_a_new_message_needs_a_question_at_the_end():
    assert compare_messages("", [message("user", "Hi")], "  ") == [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="Write a message"):
        compare_messages("", [message("user", "Hi"), message("assistant", "Hello")], "")
    with pytest.raises(ValueError, match="Write a message"):
        compare_messages("sys", [], "")


def test_targets_without_the_management_key_are_the_configured_model():
    assert list_targets(ServerSettings(default_model="llama", management_key=None)) == [Target("llama")]
    assert Target("llama", "2.0").label() == "llama 2.0" and Target("llama").label() == "llama"


# ---- two streams at once --------------------------------------------------------------------

def test_two_sides_stream_concurrently_to_the_chosen_versions():
    left = FakeClient([chunk("a"), chunk("b"), chunk("c", "stop")], pause=0.2)
    right = FakeClient([chunk("x"), chunk("y", "length")], pause=0.2)
    clients = iter([left, right])
    began = time.monotonic()
    comparison = Comparison.start(ServerSettings(), [Target("llama", "1.0"), Target("llama", "2.0")],
                                  [{"role": "user", "content": "hi"}], {"max_tokens": 8}, client=lambda: next(clients))
    run_to_end(comparison)
    # Concurrent: about the longer side's 0.6 s, not the sum of 1.0 s.
    assert time.monotonic() - began < 0.95
    assert [a.text for a in comparison.answers] == ["abc", "xy"]
    assert [a.finish_reason for a in comparison.answers] == ["stop", "length"]
    assert left.asked[0][:2] == ("llama", "1.0") and right.asked[0][:2] == ("llama", "2.0")
    assert left.asked[0][3] == {"max_tokens": 8}


def test_a_failing_side_reports_its_error_and_the_other_finishes():
    ok = FakeClient([chunk("fine", "stop")])
    bad = FakeClient(fail=TorchServeError("Model version: 9.0 does not exist", 404))
    clients = iter([ok, bad])
    comparison = Comparison.start(ServerSettings(), [Target("llama"), Target("llama", "9.0")], [], {},
                                  client=lambda: next(clients))
    run_to_end(comparison)
    assert comparison.answers[0].text == "fine" and comparison.answers[0].error is None
    assert comparison.answers[1].error == "Model version: 9.0 does not exist"


def test_stop_closes_the_stream():
    endless = FakeClient([chunk("w")] * 1000, pause=0.01)
    comparison = Comparison.start(ServerSettings(), [Target("llama")], [], {}, client=lambda: endless)
    time.sleep(0.05)
    comparison.stop()
    assert endless.closed.wait(2), "the HTTP stream was not closed"
    assert comparison.done and comparison.answers[0].ending() == "stopped"
    assert 0 < len(comparison.answers[0].text) < 1000


# ---- the figures shown with each side -------------------------------------------------------

def test_server_timings_win_over_measured_figures():
    answer = SideAnswer(Target("llama"), started_at=10.0)
    answer.take(chunk("a"), 10.5)
    answer.take(chunk("b"), 10.6)
    answer.take(chunk("", "stop", usage={"completion_tokens": 2},
                      timings={"predicted_n": 2, "predicted_per_second": 33.3, "ttft_ms": 420.0},
                      model_version="2.0"), 10.7)
    figures = answer.figures()
    assert (figures.tokens, figures.tokens_per_second, figures.ttft_ms, figures.source) == (2, 33.3, 420.0, SERVER)
    assert answer.model_version == "2.0"
    assert answer.details() == {"predicted_n": 2, "predicted_per_second": 33.3, "ttft_ms": 420.0,
                                "model_version": "2.0", "finish_reason": "stop"}
    assert figures.caption() == "2 tokens · 33.3 tokens/s · first token after 420 ms (server)"


def test_without_timings_the_figures_are_measured_here_and_say_so():
    answer = SideAnswer(Target("llama"), started_at=10.0)
    for i, at in enumerate((10.5, 10.6, 10.7, 10.8, 10.9)):
        answer.take(chunk(f"w{i} "), at)
    answer.take(chunk("", "stop", usage={"completion_tokens": 5}), 10.9)
    figures = answer.figures()
    assert figures.source == MEASURED and figures.tokens == 5
    assert figures.ttft_ms == pytest.approx(500) and figures.tokens_per_second == pytest.approx(10.0)


def test_partial_timings_name_what_was_measured_here():
    answer = SideAnswer(Target("llama"), started_at=0.0)
    answer.take(chunk("a"), 0.25)
    answer.take(chunk("b", "stop", timings={"predicted_n": 2, "predicted_per_second": 50.0}), 0.3)
    figures = answer.figures()
    assert figures.ttft_ms == pytest.approx(250) and figures.tokens_per_second == 50.0
    assert figures.source == "server; ttft measured here"


def test_no_tokens_no_figures():
    assert SideAnswer(Target("llama")).figures().caption() == ""


# ---- replay ---------------------------------------------------------------------------------

HISTORY = [message("user", "Q1"), message("assistant", "The sky is blue.", model="llama"),
           message("user", "Q2"), message("assistant", "Grass is green.", model="llama"),
           message("user", "Q3")]


def test_replayed_and_saved_speeds_come_from_the_servers_timings():
    timings = {"predicted_n": 12, "predicted_per_second": 30.0, "ttft_ms": 150.0}
    saved = [message("user", "Q1"), SimpleNamespace(role="assistant", content="A", status="complete", model="llama",
                                                    details={**timings, "model_version": "1.0"})]
    client = FakeClient(answers={"Q1": "A"})
    client.chat = lambda model, messages, version=None, **params: {
        "choices": [{"message": {"content": "A"}}], "timings": {**timings, "predicted_per_second": 45.5}}
    [turn] = list(replay(client, Target("llama", "2.0"), "", saved, {}))
    assert turn.saved_figures.caption() == "12 tokens · 30.0 tokens/s · first token after 150 ms (server)"
    assert turn.replayed_figures.tokens_per_second == 45.5
    assert saved_turns([message("user", "Q"), message("assistant", "A")])[0].saved_figures is None


def test_saved_turns_pair_each_question_with_its_answer():
    turns = saved_turns(HISTORY)
    assert [(t.index, t.question, t.saved, t.saved_model) for t in turns] == [
        (1, "Q1", "The sky is blue.", "llama"), (2, "Q2", "Grass is green.", "llama"), (3, "Q3", "", None)]


def test_replay_asks_each_question_with_the_saved_conversation_before_it():
    client = FakeClient(answers={"Q1": "The sky is blue.", "Q2": "Grass is very green.",
                                 "Q3": TorchServeError("Worker died.", 500)})
    turns = list(replay(client, Target("llama", "2.0"), "Be brief.", HISTORY, {"temperature": 0.0}))
    assert [t.summary() for t in turns] == ["Turn 1: identical",
                                            "Turn 2: differs from word 3 (86% of the words alike)",
                                            "Turn 3: failed: Worker died."]
    sent_for_q2 = client.asked[1][2]
    assert sent_for_q2 == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
                           {"role": "assistant", "content": "The sky is blue."}, {"role": "user", "content": "Q2"}]
    assert {(model, version) for model, version, _, _ in client.asked} == {("llama", "2.0")}
    assert client.asked[0][3] == {"temperature": 0.0}


def test_word_diff_marks_removed_and_added_words():
    saved, replayed = "One two  three four.\nFive", "One 2 three four.\nFive six"
    ops = diff_ops(saved, replayed)
    assert ops == [("same", "One "), ("removed", "two  "), ("added", "2 "), ("same", "three four.\nFive "),
                   ("added", "six")]
    # The replayed answer reads back exactly (with its own line breaks); the saved one word for word.
    assert "".join(t for k, t in ops if k != "removed") == replayed
    assert "".join(t for k, t in ops if k != "added").split() == saved.split()


def test_diff_html_escapes_the_model_text():
    page = diff_html(diff_ops("<b>a</b>", "<script>alert(1)</script>"))
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<del" in page and "<ins" in page


def test_first_difference_counts_words():
    turn = TurnReplay(1, "q", "a b c", None, replayed="a b c d")
    assert not turn.identical and turn.first_difference() == 4
    assert TurnReplay(1, "q", "a b", None, replayed="a b ").identical


def test_how_a_side_ended():
    answer = SideAnswer(Target("llama"))
    assert answer.ending() is None  # still streaming
    answer.ended = True
    assert answer.ending() == "stopped"
    answer.finish_reason = "length"
    assert answer.ending() == "cut at the token limit"
    answer.finish_reason = "stop"
    assert answer.ending() is None
    answer.error = "Worker died."
    assert answer.ending() is None
