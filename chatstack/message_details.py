"""What a saved answer shows besides its text: the model's reasoning, its tool
calls, and the server's own figures for it (the handler's `timings`, the model
version that answered, the finish reason), each as plain rows with units.

Plain Python (no Streamlit): `client_pages/message_view.py` draws what this returns.
A figure the server did not send is left out, never shown as "None".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

# What each finish reason means to the person reading the answer.
FINISH_REASONS = {
    "stop": "stop (the model ended its answer)",
    "length": "length (cut at the answer token limit)",
    "tool_calls": "tool_calls (the model called a tool)",
    "content_filter": "content_filter",
}


@dataclass(frozen=True)
class DetailRow:
    label: str
    value: str


@dataclass(frozen=True)
class ToolCallBlock:
    title: str      # "get_weather" (the function's name)
    arguments: str  # pretty JSON, or the text as sent when it is not JSON


def _number(value) -> float | None:
    """A figure the server sent, or None for anything that is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def duration(ms: float) -> str:
    """12 ms, 480 ms, 1.25 s, 2 min 05 s."""
    if ms < 1000:
        return f"{ms:.0f} ms" if ms >= 10 or ms == 0 else f"{ms:.1f} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def tokens(n: float) -> str:
    n = int(n)
    return f"{n:,} token" + ("" if n == 1 else "s")


def rate(per_second: float) -> str:
    return f"{per_second:,.1f} tokens/s"


def as_dict(value) -> dict:
    """A stored JSON dict (already parsed, or its text); anything else is empty."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def detail_rows(details) -> list[DetailRow]:
    """The server's figures for one answer, in the order a reader asks about them.

    `details` is what the store keeps with an answer: the handler's `timings`
    (queue_ms, prompt_n, cache_n, prompt_ms, prompt_per_second, ttft_ms,
    predicted_n, predicted_ms, predicted_per_second) plus `model_version` and
    `finish_reason`, flat in one dict. Queue wait and time to first token count
    from the request's arrival at the handler (TorchServe's own queue before it
    is not in them)."""
    details = as_dict(details)
    figure = {name: _number(details.get(name)) for name in (
        "queue_ms", "prompt_n", "cache_n", "prompt_ms", "prompt_per_second", "ttft_ms",
        "predicted_n", "predicted_ms", "predicted_per_second")}
    rows = []

    def add(label: str, value: str | None) -> None:
        if value is not None:
            rows.append(DetailRow(label, value))

    version = details.get("model_version")
    add("Model version", str(version) if isinstance(version, (str, int, float)) and not isinstance(version, bool)
        and str(version) else None)
    reason = details.get("finish_reason")
    add("Finish reason", FINISH_REASONS.get(reason, reason) if isinstance(reason, str) and reason else None)
    add("Queue wait", duration(figure["queue_ms"]) if figure["queue_ms"] is not None else None)
    # As llama-server counts them: prompt_n tokens were read, cache_n more were reused from the cache.
    read, cached = figure["prompt_n"], figure["cache_n"]
    if read is not None:
        add("Prompt tokens", tokens(read + (cached or 0)))
    if cached is not None:
        whole = (read or 0) + cached
        add("Prompt tokens reused from cache", tokens(cached) + (f" ({cached / whole:.0%} of the prompt)"
                                                                 if read is not None and whole else ""))
    if figure["prompt_ms"] is not None:
        speed = f", {rate(figure['prompt_per_second'])}" if figure["prompt_per_second"] else ""
        counted = f" for {tokens(read)} read" if read is not None else ""
        add("Prompt processing", duration(figure["prompt_ms"]) + counted + speed)
    add("Time to first token", duration(figure["ttft_ms"]) if figure["ttft_ms"] is not None else None)
    add("Generated tokens", tokens(figure["predicted_n"]) if figure["predicted_n"] is not None else None)
    add("Generation time", duration(figure["predicted_ms"]) if figure["predicted_ms"] is not None else None)
    add("Generation speed", rate(figure["predicted_per_second"])
        if figure["predicted_per_second"] is not None else None)
    return rows


def details_markdown(rows: list[DetailRow]) -> str:
    """The rows as a two-column Markdown table."""
    lines = ["| Figure | This answer |", "|---|---|"]
    lines += [f"| {row.label} | {row.value.replace('|', '/')} |" for row in rows]
    return "\n".join(lines)


def tool_call_blocks(tool_calls) -> list[ToolCallBlock]:
    """An answer's tool calls (OpenAI shape: {"function": {"name", "arguments"}}, arguments a
    JSON text), each with its arguments pretty-printed. Entries of another shape are skipped."""
    if isinstance(tool_calls, str):
        try:
            tool_calls = json.loads(tool_calls)
        except ValueError:
            return []
    if not isinstance(tool_calls, list):
        return []
    blocks = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        name = function.get("name") if isinstance(function.get("name"), str) and function.get("name") else "(unnamed)"
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                blocks.append(ToolCallBlock(name, arguments))  # shown as the model wrote it
                continue
        blocks.append(ToolCallBlock(name, json.dumps(arguments, indent=2, ensure_ascii=False)))
    return blocks
