"""One request's answer, rendered step by step in the format its route asks for:
OpenAI server-sent events on /v1/..., newline-delimited JSON chunks on the bare
/predictions route, or one JSON object when not streaming."""

from __future__ import annotations

import json
import time
import uuid

from api_errors import ApiError, GenerationFailed, api_error
from chat_protocol import ChatCompletionRequest
from llama_engine import RequestHandle, Update


class Exchange:
    """One request's answer, rendered step by step in the format its route asks for, and
    the engine's request it answers (`handle`, to cancel it)."""

    def __init__(self, handle: RequestHandle, request, route, model_name, messages_dropped, n_ctx):
        self.handle = handle
        self.started_at = time.monotonic()
        self.is_chat = isinstance(request, ChatCompletionRequest)
        self.sse = route in ("chat", "completion")
        self.stream = request.stream
        self.model_name = model_name
        self.id = new_id("chatcmpl" if self.is_chat else "cmpl")
        self.extra = {"context": {"messages_dropped": messages_dropped, "context_length": n_ctx}}
        self.text: list[str] = []
        self.first = True
        self.status = 200   # HTTP status: an error after the request started sets its own

    @property
    def content_type(self):
        if self.stream and self.sse:
            return "text/event-stream"
        return "application/x-ndjson" if self.stream else "application/json"

    def render(self, upd: Update | None) -> str:
        if upd is None:
            return ""
        self.text.append(upd.text)
        if upd.error:
            return self.render_error(api_error(GenerationFailed(upd.error)))
        reason = upd.finish_reason
        use = usage(upd.prompt_tokens, upd.completion_tokens, upd.cached_tokens)
        if not self.stream:
            if not upd.finished:
                return ""
            text = "".join(self.text)
            build = chat_completion if self.is_chat else text_completion
            return json.dumps(build(self.id, self.model_name, text, reason, use, self.extra), ensure_ascii=False)
        frames = []
        if upd.text or (self.first and self.is_chat):
            frames.append(self._chunk(upd.text))
        if upd.finished:
            frames.append(self._chunk("", reason, use))
            if self.sse:
                frames.append(sse("[DONE]"))
        return "".join(f if isinstance(f, str) and f.startswith("data: ") else self._frame(f) for f in frames)

    def render_error(self, error: ApiError) -> str:
        """The last output of a request that failed after it started: a JSON
        error object, or, mid-stream, an error frame the client can show."""
        self.status = error.status
        if not self.stream:
            return error.to_json()
        return self._frame(error.to_dict()) + (sse("[DONE]") if self.sse else "")

    def _chunk(self, text, reason=None, use=None):
        extra = self.extra if reason is not None else None
        if self.is_chat:
            chunk = chat_chunk(self.id, self.model_name, text, reason, use, extra, first=self.first)
        else:
            chunk = text_completion(self.id, self.model_name, text, reason, use, extra)
        self.first = False
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


def chat_completion(rid, model, text, finish_reason, usage_, extra) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish_reason}],
        "usage": usage_, **extra,
    }


def chat_chunk(rid, model, text, finish_reason=None, usage_=None, extra=None, first=False) -> dict:
    delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
    chunk = {
        "id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    if usage_ is not None:
        chunk["usage"] = usage_
    if extra:
        chunk.update(extra)
    return chunk


def text_completion(rid, model, text, finish_reason, usage_, extra) -> dict:
    out = {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
    }
    if usage_ is not None:
        out["usage"] = usage_
    if extra:
        out.update(extra)
    return out


def sse(obj: dict | str) -> str:
    """One server-sent event."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"
