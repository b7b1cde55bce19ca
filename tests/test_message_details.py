"""The figures, reasoning and tool calls shown with a saved answer (chatstack/message_details.py),
and the message view that draws them (client_pages/message_view.py, through AppTest)."""

from __future__ import annotations

import json

import pytest

from chatstack.message_details import (DetailRow, detail_rows, details_markdown, duration, tool_call_blocks)

FULL = {"queue_ms": 3.4, "prompt_n": 30, "cache_n": 90, "prompt_ms": 250.0, "prompt_per_second": 480.0,
        "ttft_ms": 262.5, "predicted_n": 64, "predicted_ms": 1600.0, "predicted_per_second": 40.0,
        "model_version": "2.0", "finish_reason": "length"}


def test_every_figure_has_its_row_with_units():
    rows = {row.label: row.value for row in detail_rows(FULL)}
    assert rows == {
        "Model version": "2.0",
        "Finish reason": "length (cut at the answer token limit)",
        "Queue wait": "3.4 ms",
        "Prompt tokens": "120 tokens",
        "Prompt tokens reused from cache": "90 tokens (75% of the prompt)",
        "Prompt processing": "250 ms for 30 tokens read, 480.0 tokens/s",
        "Time to first token": "262 ms",
        "Generated tokens": "64 tokens",
        "Generation time": "1.60 s",
        "Generation speed": "40.0 tokens/s",
    }


@pytest.mark.parametrize("details", [None, {}, "", "not json", [], {"queue_ms": None, "prompt_n": None}])
def test_no_figures_no_rows(details):
    assert detail_rows(details) == []


def test_absent_or_malformed_figures_are_left_out_never_shown_as_none():
    rows = detail_rows({"queue_ms": None, "prompt_n": "12", "cache_n": True, "ttft_ms": float("nan"),
                        "predicted_per_second": 12.25, "model_version": None, "finish_reason": ""})
    assert rows == [DetailRow("Generation speed", "12.2 tokens/s")]
    assert "None" not in details_markdown(rows)


def test_details_stored_as_json_text_are_read():
    assert detail_rows(json.dumps({"prompt_n": 1, "finish_reason": "stop"})) == [
        DetailRow("Finish reason", "stop (the model ended its answer)"), DetailRow("Prompt tokens", "1 token")]


def test_prompt_tokens_count_what_was_read_and_what_came_from_the_cache():
    assert detail_rows({"prompt_n": 12, "cache_n": 0}) == [
        DetailRow("Prompt tokens", "12 tokens"), DetailRow("Prompt tokens reused from cache", "0 tokens (0% of the prompt)")]
    assert detail_rows({"cache_n": 5}) == [DetailRow("Prompt tokens reused from cache", "5 tokens")]
    assert detail_rows({"prompt_n": 0, "cache_n": 0})[1] == DetailRow("Prompt tokens reused from cache", "0 tokens")
    assert detail_rows({"prompt_ms": 20.0}) == [DetailRow("Prompt processing", "20 ms")]


@pytest.mark.parametrize("ms, shown", [(0, "0 ms"), (0.42, "0.4 ms"), (12.4, "12 ms"), (999.4, "999 ms"),
                                       (1250, "1.25 s"), (125_000, "2 min 05 s")])
def test_durations(ms, shown):
    assert duration(ms) == shown


def test_markdown_table_keeps_a_pipe_from_breaking_the_row():
    table = details_markdown([DetailRow("Model version", "a|b")])
    assert table.splitlines()[-1] == "| Model version | a/b |"


def test_tool_calls_pretty_printed():
    calls = [{"id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}},
             {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "not json"}},
             {"type": "function"}, "junk"]
    blocks = tool_call_blocks(json.dumps(calls))
    assert [(b.title, b.arguments) for b in blocks] == [
        ("get_weather", '{\n  "city": "Paris",\n  "days": 2\n}'), ("now", "not json")]
    assert tool_call_blocks(None) == [] and tool_call_blocks("[") == [] and tool_call_blocks({"a": 1}) == []


# ---- the view, drawn by Streamlit ----------------------------------------------------------

VIEW_SCRIPT = """
import json
import streamlit as st
from types import SimpleNamespace
from client_pages.message_view import show_assistant_message

message = SimpleNamespace(**json.loads(st.session_state["message"]))
with st.chat_message("assistant"):
    show_assistant_message(message)
"""


def draw(message: dict):
    from streamlit.testing.v1 import AppTest
    app = AppTest.from_string(VIEW_SCRIPT)
    app.session_state["message"] = json.dumps(message)
    app.run()
    assert not app.exception, app.exception
    return app


def test_view_shows_reasoning_text_tool_calls_and_details():
    app = draw({"role": "assistant", "content": "It is sunny.", "reasoning": "The user asks about weather.",
                "tool_calls": [{"function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}],
                "details": FULL})
    expanders = [e.label for e in app.expander]
    assert expanders == ["Reasoning", "Tool call: get_weather"]
    assert app.expander[0].markdown[0].value == "The user asks about weather."
    assert "It is sunny." in [m.value for m in app.markdown]
    assert app.code[0].value == '{\n  "city": "Paris"\n}'
    details = [m.value for m in app.markdown if m.value.startswith("| Figure | This answer |")]
    assert len(details) == 1 and "| Prompt tokens reused from cache | 90 tokens (75% of the prompt) |" in details[0]


def test_view_of_a_plain_answer_has_no_empty_blocks():
    app = draw({"role": "assistant", "content": "Hello!"})
    assert [m.value for m in app.markdown] == ["Hello!"]
    assert len(app.expander) == 0 and len(app.code) == 0
    assert "None" not in str(app._tree)
