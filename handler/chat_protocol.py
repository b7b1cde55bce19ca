"""OpenAI-shaped requests, and the 400s for bad input.

Fields follow the order of the OpenAI API reference; llama.cpp extras (top_k, min_p,
repeat_penalty, ignore_eos) come after. A field this server does not serve is refused
by name (`UNSUPPORTED` says why), never ignored: every model forbids unknown fields.
Every validation failure becomes an `ApiError` whose JSON names the offending
parameter. `to_generation_request` turns a request into the engine's.

Message text is taken as sent, control characters included; only what cannot reach
the tokenizer is changed (`clean_text`).
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING, Annotated, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import structured_output
import tool_calls
from api_errors import ApiError
from llama_engine import GenerationRequest, SamplingParams
from structured_output import Constraint

if TYPE_CHECKING:
    from llama_settings import HandlerSettings

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_MESSAGES = 4096
MAX_CHOICES = 8
# What the chat template gets from the server: chat_template_kwargs may not set these.
TEMPLATE_VARIABLES = {"messages", "tools", "tool_choice", "functions", "function_call", "add_generation_prompt",
                      "bos_token", "eos_token", "raise_exception", "strftime_now"}
_SAMPLING_NAMES = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty",
                   "presence_penalty", "frequency_penalty", "seed")

# OpenAI parameters this server does not serve, and why: a request with one is a 400 naming it.
UNSUPPORTED = {
    "audio": "is not supported: this server answers in text",
    "prediction": "is not supported (predicted outputs)",
    "web_search_options": "is not supported: there is no web search",
    "functions": "is not supported (deprecated by OpenAI)",
    "function_call": "is not supported (deprecated by OpenAI)",
    "service_tier": "is not supported: there is one tier",
    "reasoning_effort": "is not supported",
    "verbosity": "is not supported",
    "best_of": "is not supported",
    "echo": "is not supported",
    "suffix": "is not supported (fill-in-the-middle)",
}
# Content parts other than text, and why they are refused.
UNSUPPORTED_PARTS = {
    "image_url": "image input is not supported: this model reads text only",
    "input_audio": "audio input is not supported: this model reads text only",
    "file": "file input is not supported: send the file's text as a text part",
}

# UTF-16 surrogates (from JSON "\ud800" escapes) cannot be encoded as UTF-8; NUL is dropped.
_SURROGATES = re.compile(r"[\ud800-\udfff]")


def clean_text(value: str) -> str:
    """Text as the tokenizer can take it: every character is kept, control characters
    included, except NUL (dropped: GGUF tokenizers differ on it, and no grammar can produce
    it) and lone UTF-16 surrogates (not encodable as UTF-8; each becomes U+FFFD)."""
    if "\x00" in value:
        value = value.replace("\x00", "")
    return _SURROGATES.sub("\ufffd", value)


def _first_set(*values):
    return next((v for v in values if v is not None), None)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data):
        kind = data.get("type") if isinstance(data, dict) else None
        if isinstance(kind, str) and kind != "text":
            raise ValueError(UNSUPPORTED_PARTS.get(kind, f"content parts of type {kind!r} are not supported"))
        return data

    @field_validator("text")
    @classmethod
    def _clean(cls, v):
        return clean_text(v)


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class CalledFunction(_Strict):
    name: str
    arguments: str          # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None          # OpenAI's participant name: accepted, not shown to the model
    tool_calls: list[ToolCall] | None = None     # assistant: the calls it made
    tool_call_id: str | None = None              # tool: the call this is the result of
    reasoning_content: str | None = None         # assistant: its thinking, not shown to the model again

    @model_validator(mode="before")
    @classmethod
    def _drop_empty_reply_fields(cls, data):
        # An SDK's assistant message sent back as it came carries these empty.
        if isinstance(data, dict) and data.get("role") == "assistant":
            data = {k: v for k, v in data.items()
                    if not (k in ("refusal", "audio", "function_call", "annotations") and not v)}
        return data

    @field_validator("content")
    @classmethod
    def _clean(cls, v):
        return clean_text(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _fields_of_the_role(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry `tool_calls`")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("only tool messages carry `tool_call_id`")
        if self.content is None and not self.tool_calls:
            raise ValueError("`content` is required (it may be null only in an assistant message with `tool_calls`)")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def as_template_dict(self) -> dict:
        # Chat templates concatenate content as a string; "developer" is OpenAI's new name for system.
        out = {"role": "system" if self.role == "developer" else self.role, "content": self.text}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDefinition(_Strict):
    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    description: str | None = None
    parameters: dict[str, Any] | None = None     # a JSON Schema; none: the function takes no arguments
    strict: bool | None = None                   # forced calls always follow the schema


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(_Strict):
    include_usage: bool | None = None    # usage always comes in a stream's last chunk


class JsonSchemaFormat(_Strict):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: Any = Field(None, alias="schema")   # None: any JSON object
    strict: bool | None = None                   # the answer always follows the schema

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("`json_schema` goes with type json_schema, and only with it")
        return self


class SamplingFields(_Strict):
    """Options shared by chat and plain completions. None means: the server default."""

    model: str | None = None             # the URL picks the model; any name is accepted
    frequency_penalty: Annotated[float | None, Field(ge=-2.0, le=2.0)] = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None   # token id -> bias
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    max_completion_tokens: Annotated[int | None, Field(ge=1)] = None
    metadata: dict[str, str] | None = None   # accepted, not used
    n: Annotated[int | None, Field(ge=1, le=MAX_CHOICES)] = None   # choices from one prompt
    presence_penalty: Annotated[float | None, Field(ge=-2.0, le=2.0)] = None
    prompt_cache_key: str | None = None   # accepted, not used: slots share prefixes by themselves
    safety_identifier: str | None = None  # accepted, not used
    seed: Annotated[int | None, Field(ge=-(2**63), le=2**64 - 1)] = None
    stop: str | list[str] | None = None
    store: bool | None = None             # nothing is stored: only false is accepted
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float | None, Field(ge=0.0, le=2.0)] = None
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    user: str | None = None               # accepted, not used
    # llama.cpp extras
    top_k: Annotated[int | None, Field(ge=0, le=100_000)] = None
    min_p: Annotated[float | None, Field(ge=0.0, le=1.0)] = None
    repeat_penalty: Annotated[float | None, Field(gt=0.0, le=10.0)] = None
    ignore_eos: bool = False  # keep generating past end-of-generation tokens (benchmarks, tests)
    grammar: str | None = None            # GBNF the answer follows
    json_schema: Any = None               # a JSON Schema the answer follows

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v):
        for key in v or {}:
            if not key.isdigit():
                raise ValueError(f"keys are token ids (integers, as JSON strings), got {key!r}")
        return v

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
        return [clean_text(s) for s in stops]

    @field_validator("store")
    @classmethod
    def _nothing_stored(cls, v):
        if v:
            raise ValueError("stored completions are not supported: nothing is stored")
        return v

    @model_validator(mode="after")
    def _one_max_tokens(self):
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    def constraint(self) -> Constraint | None:
        """The grammar the answer must follow, if the request asks for one (at most one way)."""
        asked = self._constraints()
        if len(asked) > 1:
            (first, _), (second, _) = asked[:2]
            raise ApiError(f"{second}: cannot be combined with {first} (one constraint per request)", param=second)
        return asked[0][1]() if asked else None

    def _constraints(self) -> list[tuple[str, Callable[[], Constraint]]]:
        """(field, its grammar) for each field of the request that constrains the answer."""
        asked = []
        if self.grammar is not None:
            asked.append(("grammar", lambda: structured_output.gbnf(self.grammar)))
        if self.json_schema is not None:
            asked.append(("json_schema", lambda: structured_output.json_schema(self.json_schema, "json_schema")))
        return asked

    def top_logprobs_wanted(self) -> int | None:
        """How many alternatives to report beside each token's logprob; None: no logprobs."""
        return None

    def to_generation_request(self, server: "HandlerSettings") -> GenerationRequest:
        """The one place that decides each value of the engine's request: the request's,
        else the server's (model-config.yaml `handler:`), else the built-in default
        (SamplingParams). The prompt is left empty: it is fitted into the room that
        max_tokens leaves in the context."""
        built_in, configured = SamplingParams(), server.sampling
        values = {name: _first_set(getattr(self, name), getattr(configured, name), getattr(built_in, name))
                  for name in _SAMPLING_NAMES}
        values["penalty_last_n"] = _first_set(configured.penalty_last_n, built_in.penalty_last_n)
        constraint = self.constraint()
        values["grammar"] = constraint.gbnf if constraint else None
        values["logit_bias"] = {int(token): bias for token, bias in (self.logit_bias or {}).items()}
        return GenerationRequest(prompt_tokens=[], max_tokens=self.max_tokens or server.max_tokens,
                                 sampling=SamplingParams(**values), stop=list(self.stop or []),
                                 ignore_eos=self.ignore_eos, logprobs=self.top_logprobs_wanted())


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    logprobs: bool | None = None                 # each answer token's logprob
    top_logprobs: Annotated[int | None, Field(ge=0, le=20)] = None   # and this many alternatives (needs logprobs)
    parallel_tool_calls: bool | None = None      # several calls in one answer: auto yes; required only when true
    response_format: ResponseFormat | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None   # default auto with tools
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    # llama.cpp extra: more variables for the chat template (e.g. enable_thinking)
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _not_the_templates_own(cls, v):
        taken = sorted(set(v or {}) & TEMPLATE_VARIABLES)
        if taken:
            raise ValueError(f"{taken[0]!r} is set by the server (from the request's own fields), not here")
        return v

    @model_validator(mode="after")
    def _tool_choice_with_tools(self):
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise ApiError("tools: two tools have the same name", param="tools")
        if self.tool_choice is not None and self.tool_choice != "none" and not names:
            raise ApiError("tool_choice: needs `tools`", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ApiError(f"tool_choice: there is no tool named {self.tool_choice.function.name!r}",
                           param="tool_choice")
        return self

    @property
    def tool_mode(self) -> str:
        """none (no tools, or tool_choice none), auto, required or named."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    def tools_for_prompt(self) -> list[dict] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tool_mode != "none" else None

    def template_messages(self, native_tools: bool) -> list[dict]:
        """The messages as the chat template takes them; native_tools: the template renders
        tools itself, else tool_calls' generic prompt describes them."""
        return tool_calls.template_messages([m.as_template_dict() for m in self.messages],
                                            self.tools_for_prompt(), native_tools)

    def _constraints(self):
        fmt, asked = self.response_format, super()._constraints()
        if fmt is not None and fmt.type != "text":
            schema = fmt.json_schema.schema_ if fmt.json_schema else None   # none: any JSON object
            asked.insert(0, ("response_format", structured_output.json_object if schema is None
                             else lambda: structured_output.json_schema(schema, "response_format")))
        if self.tool_mode == "auto" and asked:
            raise ApiError(f"{asked[0][0]}: cannot be combined with tools the model may call "
                           "(send tool_choice none, required or a function)", param=asked[0][0])
        if self.tool_mode in ("required", "named"):
            functions = [t.function.model_dump(exclude_none=True) for t in self.tools
                         if self.tool_mode == "required" or t.function.name == self.tool_choice.function.name]
            # One forced call unless the request asks for several: small models repeat calls to the token limit.
            parallel = self.tool_mode == "required" and self.parallel_tool_calls is True
            asked.insert(0, ("tool_choice", lambda: Constraint(
                tool_calls.call_grammar(functions, parallel, "tools"), "tool_choice")))
        return asked

    @model_validator(mode="after")
    def _top_logprobs_with_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ApiError("top_logprobs: needs logprobs true", param="top_logprobs")
        return self

    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str
    logprobs: Annotated[int | None, Field(ge=0, le=5)] = None    # each token's logprob and this many alternatives

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, v):
        if not v:
            raise ValueError("prompt is empty")
        return clean_text(v)

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs


def _is_type_tag(part) -> bool:
    """Union members show up in an error's `loc` as type tags ('str', 'list[TextPart]',
    'NamedToolChoice'); they are not parameter names (those are snake_case)."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or part[:1].isupper()
                                      or "[" in part or part.startswith("function-"))


def _first_error(exc: ValidationError) -> ApiError:
    # The most specific error: where content may be a string or a list of parts, the one about the part.
    err = max(exc.errors(), key=lambda e: len(e["loc"]))
    loc = [str(p) for p in err["loc"] if not _is_type_tag(p)]
    param = ".".join(loc) or None
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        msg = "is required"
    elif err["type"] == "extra_forbidden":
        name = loc[-1] if loc else ""
        msg = UNSUPPORTED.get(name, "is not a parameter this server knows (see the README's list of supported fields)")
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
