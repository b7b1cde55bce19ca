"""One request's answer, rendered step by step in the format its route asks for:
OpenAI server-sent events on /v1/..., newline-delimited JSON chunks on the bare
/predictions route, or one JSON object when not streaming.

An answer has one choice per engine request (`n` of them); each choice's text is split
into reasoning (reasoning.ReasoningSplitter), content and tool calls
(tool_calls.ToolCallParser) as it arrives."""

from __future__ import annotations

import json
import math
import time
import uuid

from answer_timings import AnswerTimings, answer_timings
from api_errors import ApiError, GenerationFailed, api_error
from chat_protocol import ChatCompletionRequest
from llama_engine import FINISH_STOP, RequestHandle, TokenLogprob, Update
from reasoning import ReasoningSplitter
from tool_calls import ToolCallParser



def _feed(splitter, text: str, last: bool) -> tuple:
    """Pass text through a splitter of the answer (reasoning, tool calls): the two parts it
    returns, with what it still held added when this is the answer's last text."""
    first, second = splitter.feed(text)
    if last:
        more_first, more_second = splitter.finish()
        first, second = first + more_first, second + more_second
    return first, second

class Choice:
    """One choice of an answer: the engine request behind it, and what it said so far."""

    def __init__(self, index: int, handle: RequestHandle, parse_tools: bool, max_calls: int | None = None,
                 logprobs: bool = False, reasoning: ReasoningSplitter | None = None):
        self.index = index
        self.handle = handle
        self.reasoning = reasoning
        self.thought: list[str] = []
        self.logprobs: list[TokenLogprob] | None = [] if logprobs else None
        self.tools = ToolCallParser(max_calls) if parse_tools else None
        self.content: list[str] = []
        self.last: Update | None = None       # the latest update (token counts)
        self.finish_reason: str | None = None
        self.started = False                  # its first chunk went out

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def take(self, upd: Update) -> dict:
        """What this update adds, as a delta: content and tool_calls fragments."""
        text, calls, thought = upd.text, [], ""
        if self.reasoning is not None:
            thought, text = _feed(self.reasoning, text, upd.finished)
            self.thought.append(thought)
        if self.tools is not None:
            text, calls = _feed(self.tools, text, upd.finished)
        self.content.append(text)
        self.last = upd
        if self.logprobs is not None:
            self.logprobs += upd.logprobs
        if upd.finished:
            called = self.tools is not None and self.tools.calls
            self.finish_reason = "tool_calls" if called and upd.finish_reason == FINISH_STOP else upd.finish_reason
        delta = {}
        if thought:
            delta["reasoning_content"] = thought
        if text:
            delta["content"] = text
        if calls:
            delta["tool_calls"] = calls
        if self.logprobs is not None and upd.logprobs:
            delta["logprobs"] = upd.logprobs
        return delta

    def message(self) -> dict:
        text = "".join(self.content)
        calls = self.tools.calls if self.tools is not None else []
        message = {"role": "assistant", "content": None if calls and not text.strip() else text}
        if "".join(self.thought):
            message["reasoning_content"] = "".join(self.thought)
        if calls:
            message["tool_calls"] = calls
        return message


class Exchange:
    """One request's answer, rendered step by step in the format its route asks for, and
    the engine requests it answers (one per choice: `handles`, to cancel them)."""

    def __init__(self, handles: list[RequestHandle], request, route, model_name, messages_dropped, n_ctx,
                 opens_reasoning: bool = False, model_version: str | None = None):
        self.handles = handles
        self.started_at = time.monotonic()
        self.is_chat = isinstance(request, ChatCompletionRequest)
        parse_tools = self.is_chat and request.tool_mode != "none"
        max_calls = 1 if parse_tools and request.parallel_tool_calls is False else None
        logprobs = request.top_logprobs_wanted() is not None
        self.choices = [Choice(i, h, parse_tools, max_calls, logprobs,
                               ReasoningSplitter(opens_reasoning) if self.is_chat else None)
                        for i, h in enumerate(handles)]
        self.sse = route in ("chat", "completion")
        self.stream = request.stream
        self.model_name = model_name
        self.id = new_id("chatcmpl" if self.is_chat else "cmpl")
        self.extra = {"context": {"messages_dropped": messages_dropped, "context_length": n_ctx}}
        if model_version is not None:
            self.extra["model_version"] = model_version   # the TorchServe version that answered
        self.failed = False
        self.status = 200   # HTTP status: an error after the request started sets its own

    @property
    def content_type(self):
        if self.stream and self.sse:
            return "text/event-stream"
        return "application/x-ndjson" if self.stream else "application/json"

    @property
    def finished(self) -> bool:
        return self.failed or all(c.finished for c in self.choices)

    def cancel(self) -> None:
        """Cancel the engine requests of the choices still generating."""
        for choice in self.choices:
            if not choice.finished:
                choice.handle.cancel()

    def render(self, updates: dict[str, Update]) -> str:
        mine = [(c, updates[c.handle.id]) for c in self.choices if c.handle.id in updates]
        if not mine:
            return ""
        failed = next((u.error for _, u in mine if u.error), None)
        if failed:
            self.cancel()
            return self.render_error(api_error(GenerationFailed(failed)))
        deltas = [(choice, choice.take(upd)) for choice, upd in mine]
        if not self.stream:
            return json.dumps(self._whole(), ensure_ascii=False) if self.finished else ""
        frames = []
        for choice, delta in deltas:
            if delta or (not choice.started and self.is_chat):
                frames.append(self._chunk(choice, delta))
            if choice.finished:
                frames.append(self._chunk(choice, {}, choice.finish_reason))
        if self.finished:
            frames[-1]["usage"] = self._usage()
            frames[-1].update(self._final_fields())
        out = "".join(self._frame(f) for f in frames)
        return out + (sse("[DONE]") if self.finished and self.sse else "")

    def render_error(self, error: ApiError) -> str:
        """The last output of a request that failed after it started: a JSON
        error object, or, mid-stream, an error frame the client can show."""
        self.status = error.status
        self.failed = True
        if not self.stream:
            return error.to_json()
        return self._frame(error.to_dict()) + (sse("[DONE]") if self.sse else "")

    def timings(self) -> AnswerTimings | None:
        """The server's figures for the answer, once every choice finished (None before, or after an error)."""
        if self.failed or not self.finished or any(c.last is None for c in self.choices):
            return None
        return answer_timings([c.last for c in self.choices])

    def _final_fields(self) -> dict:
        """What the answer's last chunk, or the whole answer, carries beside choices and usage."""
        timings = self.timings()
        return {**self.extra, **({"timings": timings.to_json()} if timings else {})}

    def _usage(self) -> dict:
        first = self.choices[0].last
        return usage(first.prompt_tokens, sum(c.last.completion_tokens for c in self.choices if c.last),
                     first.cached_tokens)

    def _whole(self) -> dict:
        if self.is_chat:
            choices = [{"index": c.index, "message": c.message(), "finish_reason": c.finish_reason,
                        "logprobs": chat_logprobs(c.logprobs)} for c in self.choices]
            return chat_completion(self.id, self.model_name, choices, self._usage(), self._final_fields())
        choices = [{"index": c.index, "text": "".join(c.content), "finish_reason": c.finish_reason,
                    "logprobs": completion_logprobs(c.logprobs)} for c in self.choices]
        return text_completion(self.id, self.model_name, choices, self._usage(), self._final_fields())

    def _chunk(self, choice: Choice, delta: dict, finish_reason: str | None = None) -> dict:
        entries = delta.pop("logprobs", None)
        if self.is_chat:
            if not choice.started:   # a choice's first chunk says its role; content null beside tool calls
                delta = {"role": "assistant", "content": delta.get("content", None if "tool_calls" in delta else ""),
                         **{k: v for k, v in delta.items() if k != "content"}}
            part = {"index": choice.index, "delta": delta, "finish_reason": finish_reason,
                    "logprobs": chat_logprobs(entries) if entries else None}
            chunk = chat_chunk(self.id, self.model_name, [part])
        else:
            part = {"index": choice.index, "text": delta.get("content", ""), "finish_reason": finish_reason,
                    "logprobs": completion_logprobs(entries) if entries else None}
            chunk = text_completion(self.id, self.model_name, [part], None, None)
        choice.started = True
        return chunk

    def _frame(self, obj) -> str:
        return sse(obj) if self.sse else json.dumps(obj, ensure_ascii=False) + "\n"


# ---- response objects -------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def chat_completion(rid, model, choices: list[dict], usage_, extra) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": choices, "usage": usage_, **extra,
    }


def chat_chunk(rid, model, choices: list[dict]) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices}


def text_completion(rid, model, choices: list[dict], usage_, extra) -> dict:
    out = {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": choices,
    }
    if usage_ is not None:
        out["usage"] = usage_
    if extra:
        out.update(extra)
    return out


def chat_logprobs(entries: list[TokenLogprob] | None) -> dict | None:
    """OpenAI's chat `logprobs`: each token with its logprob, bytes and top alternatives."""
    if entries is None:
        return None
    return {"content": [{**_token(e.token, e.logprob),
                         "top_logprobs": [_token(token, logprob) for token, logprob in e.top]} for e in entries],
            "refusal": None}


def completion_logprobs(entries: list[TokenLogprob] | None) -> dict | None:
    """The legacy completions' `logprobs`: parallel lists of tokens, logprobs, alternatives, offsets."""
    if entries is None:
        return None
    texts = [e.token.decode("utf-8", errors="replace") for e in entries]
    offsets = [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    return {"tokens": texts, "token_logprobs": [_finite(e.logprob) for e in entries],
            "top_logprobs": [{t.decode("utf-8", errors="replace"): _finite(lp) for t, lp in e.top} for e in entries],
            "text_offset": offsets}


def _token(token: bytes, logprob: float) -> dict:
    return {"token": token.decode("utf-8", errors="replace"), "logprob": _finite(logprob), "bytes": list(token)}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None   # JSON has no NaN (a token without logits)


def sse(obj: dict | str) -> str:
    """One server-sent event."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"
