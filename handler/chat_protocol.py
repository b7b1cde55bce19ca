"""OpenAI-shaped request and response objects, and the 400s for bad input.

Fields follow the order of the OpenAI API reference; llama.cpp extras (top_k,
min_p, repeat_penalty) come after. Every validation failure becomes an
`ApiError` whose JSON names the offending parameter. `to_generation_request`
turns a request into the engine's.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from api_errors import ApiError
from llama_engine import GenerationRequest, SamplingParams

if TYPE_CHECKING:
    from llama_settings import HandlerSettings

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_MESSAGES = 4096
# C0 control characters other than tab, newline and carriage return.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_SAMPLING_NAMES = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty",
                   "presence_penalty", "frequency_penalty", "seed")


def _first_set(*values):
    return next((v for v in values if v is not None), None)


def _check_text(value: str, what: str) -> str:
    if _CONTROL_CHARS.search(value):
        raise ValueError(f"{what} contains control characters (only tab, newline and carriage return are allowed)")
    return value


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]

    @field_validator("content")
    @classmethod
    def _no_control_chars(cls, v):
        return _check_text(v if isinstance(v, str) else "".join(p.text for p in v), "message content")

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def as_template_dict(self) -> dict:
        # Chat templates concatenate content as a string; "developer" is OpenAI's new name for system.
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text}


class SamplingFields(BaseModel):
    """Options shared by chat and plain completions. None means: the server default."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    model: str | None = None
    frequency_penalty: Annotated[float | None, Field(ge=-2.0, le=2.0)] = None
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    max_completion_tokens: Annotated[int | None, Field(ge=1)] = None
    presence_penalty: Annotated[float | None, Field(ge=-2.0, le=2.0)] = None
    seed: Annotated[int | None, Field(ge=-(2**63), le=2**64 - 1)] = None
    stop: str | list[str] | None = None
    stream: bool = False
    temperature: Annotated[float | None, Field(ge=0.0, le=2.0)] = None
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    # llama.cpp extras
    top_k: Annotated[int | None, Field(ge=0, le=100_000)] = None
    min_p: Annotated[float | None, Field(ge=0.0, le=1.0)] = None
    repeat_penalty: Annotated[float | None, Field(gt=0.0, le=10.0)] = None
    ignore_eos: bool = False  # keep generating past end-of-generation tokens (benchmarks, tests)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return v
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}")
        for s in stops:
            if len(s) > MAX_STOP_LENGTH:
                raise ValueError(f"a stop string may have at most {MAX_STOP_LENGTH} characters")
            _check_text(s, "stop string")
        return stops

    @model_validator(mode="after")
    def _one_max_tokens(self):
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    def to_generation_request(self, server: "HandlerSettings") -> GenerationRequest:
        """The one place that decides each value of the engine's request: the request's,
        else the server's (model-config.yaml `handler:`), else the built-in default
        (SamplingParams). The prompt is left empty: it is fitted into the room that
        max_tokens leaves in the context."""
        built_in, configured = SamplingParams(), server.sampling
        values = {name: _first_set(getattr(self, name), getattr(configured, name), getattr(built_in, name))
                  for name in _SAMPLING_NAMES}
        values["penalty_last_n"] = _first_set(configured.penalty_last_n, built_in.penalty_last_n)
        return GenerationRequest(prompt_tokens=[], max_tokens=self.max_tokens or server.max_tokens,
                                 sampling=SamplingParams(**values), stop=list(self.stop or []),
                                 ignore_eos=self.ignore_eos)


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]


class CompletionRequest(SamplingFields):
    prompt: str

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, v):
        if not v:
            raise ValueError("prompt is empty")
        return _check_text(v, "prompt")


def _first_error(exc: ValidationError) -> ApiError:
    err = exc.errors()[0]
    # Union members show up in `loc` as type tags ('str', 'list[TextPart]'); they are not parameter names.
    loc = [str(p) for p in err["loc"]
           if str(p) not in ("str", "int", "float", "bool", "TextPart") and not str(p).startswith(("list[", "function-"))]
    param = ".".join(loc) or None
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        msg = "is required"
    return ApiError(f"{param}: {msg}" if param else msg, param=param)


def parse_body(body: Any) -> Any:
    """Accept what TorchServe hands over (decoded JSON, bytes or str) and return JSON data."""
    if isinstance(body, (bytes, bytearray)):
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ApiError(f"request body is not valid UTF-8 (byte {e.start})") from None
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except RecursionError:
            raise ApiError("request body is nested too deeply") from None
        except ValueError as e:
            raise ApiError(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError("request body must be a JSON object")
    _reject_non_finite(body)
    return body


def _reject_non_finite(value, path="", depth=0):
    # TorchServe's worker json-decodes bodies with NaN/Infinity allowed, so check here.
    if depth > 32:
        raise ApiError("request body is nested too deeply")
    if isinstance(value, float) and not math.isfinite(value):
        raise ApiError(f"{path or 'body'}: must be a finite number", param=path or None)
    if isinstance(value, dict):
        for k, v in value.items():
            _reject_non_finite(v, f"{path}.{k}" if path else str(k), depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _reject_non_finite(v, f"{path}.{i}", depth + 1)


def parse_request(body: Any, route: str) -> ChatCompletionRequest | CompletionRequest:
    """route is 'chat' or 'completion'; for the bare /predictions route, 'auto'
    picks chat when `messages` is present, else a plain completion."""
    data = parse_body(body)
    if route == "auto":
        if "messages" in data:
            route = "chat"
        elif "prompt" in data:
            route = "completion"
        else:
            raise ApiError("body needs `messages` (a chat) or `prompt` (a plain completion)", param="messages")
    cls = ChatCompletionRequest if route == "chat" else CompletionRequest
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise _first_error(e) from None


# ---- responses ---------------------------------------------------------------

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
