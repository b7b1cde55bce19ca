"""Tool calls: how tools reach the prompt, the grammar that forces a call, and the parser
that finds calls in the model's answer.

The call format is `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes,
Qwen) or a list of such objects inside one pair of tags (SmolLM2's
`<tool_call>[{...}, {...}]</tool_call>`); `"parameters"` is read as `"arguments"`.

- Prompt: a chat template that knows tools (it mentions `tools`) gets them, and the
  conversation's calls and results, as Hugging Face templates expect them. Any other
  template gets `GENERIC_TOOL_PROMPT` in the system message, earlier calls written in the
  call format and tool results as user messages in `<tool_response>` tags.
- Grammar: with tool_choice `required` or a named function, the answer is held to the
  call format with each function's parameter schema (structured_output's converter).
- Parser: `ToolCallParser` takes the answer as it streams, passes text through, holds back
  what may be the start of `<tool_call>`, and turns each call into OpenAI `tool_calls`
  deltas: a call's id and name first, then its arguments as they come.
"""

from __future__ import annotations

import json
import re
import uuid

from structured_output import schema_converter
from tagged_text import partial_tail

OPEN, CLOSE = "<tool_call>", "</tool_call>"

GENERIC_TOOL_PROMPT = """You can call these tools (each with a JSON Schema of its parameters):
<tools>
{tools}
</tools>
To call a tool, answer with only
<tool_call>{{"name": "<tool name>", "arguments": {{<the arguments as JSON>}}}}</tool_call>
(one such line per call). Tool results come back in <tool_response></tool_response> tags."""


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ---- prompt -------------------------------------------------------------------------------------

def template_messages(messages: list[dict], tools: list[dict] | None, native: bool) -> list[dict]:
    """Messages (OpenAI dicts: role, content, tool_calls, tool_call_id) as the chat template
    takes them. native: the template renders tools itself; else the generic prompt."""
    if native:
        return [_native(m) for m in messages]
    out: list[dict] = []
    for m in messages:
        if m["role"] == "tool":
            result = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("tool_results"):     # results of one turn's calls in one message
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "tool_results": True})
        elif m.get("tool_calls"):
            calls = "\n".join(OPEN + json.dumps({"name": c["function"]["name"],
                                                 "arguments": _arguments(c["function"]["arguments"])},
                                                ensure_ascii=False) + CLOSE for c in m["tool_calls"])
            out.append({"role": "assistant", "content": "\n".join(filter(None, [m.get("content"), calls]))})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    for m in out:
        m.pop("tool_results", None)
    if tools:
        listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        prompt = GENERIC_TOOL_PROMPT.format(tools=listed)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _native(m: dict) -> dict:
    out = {"role": m["role"], "content": m.get("content") or ""}
    if m.get("tool_calls"):
        # Hugging Face templates take arguments as a mapping (they write it with tojson).
        out["tool_calls"] = [{"id": c["id"], "type": "function",
                              "function": {"name": c["function"]["name"],
                                           "arguments": _arguments(c["function"]["arguments"])}}
                             for c in m["tool_calls"]]
    for key in ("tool_call_id", "name"):
        if m.get(key):
            out[key] = m[key]
    return out


def _arguments(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


# ---- grammar ------------------------------------------------------------------------------------

def call_grammar(functions: list[dict], parallel: bool, param: str = "tools") -> str:
    """GBNF for an answer that is only tool calls, each to one of `functions` (OpenAI function
    objects: name, parameters) with arguments that follow its parameter schema; several calls
    when parallel, else one."""
    schemas = [{"type": "object",
                "properties": {"name": {"const": f["name"]},
                               "arguments": f.get("parameters") or {"type": "object", "properties": {},
                                                                    "additionalProperties": False}},
                "required": ["name", "arguments"], "additionalProperties": False}
               for f in functions]
    converter = schema_converter(schemas[0] if len(schemas) == 1 else {"anyOf": schemas}, param, "call")
    rules = converter.format_grammar()
    more = ' ("\\n" tagged)*' if parallel else ""
    return (f'root ::= tagged{more}\n'
            f'tagged ::= "{OPEN}" "\\n"? call "{CLOSE}"\n' + rules)


# ---- parser -------------------------------------------------------------------------------------

_CALL_HEAD = re.compile(r'\s*(?:\[\s*)?(?:,\s*)?\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_HEAD_LIMIT = 400    # characters after <tool_call> that may hold a call's head before the rest is read whole


class ToolCallParser:
    """Finds tool calls in an answer fed piece by piece. `feed` returns the text that is
    surely not part of a call and the `tool_calls` deltas completed so far; `finish` ends
    the answer. `calls` holds every call as OpenAI's message.tool_calls has it; calls past
    `max_calls` (1 when parallel_tool_calls is false) are dropped."""

    def __init__(self, max_calls: int | None = None):
        self.max_calls = max_calls
        self.pending = ""        # text that may be the start of <tool_call>
        self.inside: str | None = None   # text after <tool_call>, while inside one
        self.read = 0            # how much of `inside` is parsed
        self.streaming = False   # a call's arguments are being passed on as they come
        self.closing = False     # its arguments are read; the call object's `}` is next
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.calls: list[dict] = []

    def feed(self, text: str) -> tuple[str, list[dict]]:
        content, deltas = [], []
        self.pending += text
        while self.pending:
            if self.inside is None:
                at = self.pending.find(OPEN)
                if at < 0:
                    keep = partial_tail(self.pending, OPEN)
                    content.append(self.pending[: len(self.pending) - keep])
                    self.pending = self.pending[len(self.pending) - keep:]
                    break
                content.append(self.pending[:at])
                self.pending, self.inside, self.read = self.pending[at + len(OPEN):], "", 0
            else:
                end = self.pending.find(CLOSE)
                if end < 0:
                    keep = partial_tail(self.pending, CLOSE)
                    self.inside += self.pending[: len(self.pending) - keep]
                    self.pending = self.pending[len(self.pending) - keep:]
                    deltas += self._parse_inside()
                    break
                self.inside += self.pending[:end]
                self.pending = self.pending[end + len(CLOSE):]
                deltas += self._parse_inside()
                text_back, closed = self._close()
                content.append(text_back)
                deltas += closed
        return "".join(content), deltas

    def finish(self) -> tuple[str, list[dict]]:
        """The end of the answer: held-back text, and a call left open (the model stopped
        before `</tool_call>`, or ran out of tokens): parsed whole if it can be, else kept as a
        call if its name was read, else dropped; never passed on as text."""
        if self.inside is None:
            text, self.pending = self.pending, ""
            return text, []
        self.inside += self.pending
        self.pending = ""
        deltas = self._parse_inside()
        if self.streaming or self.read:   # calls whose name is known: their arguments stay as they came
            self.inside, self.read, self.streaming, self.closing = None, 0, False, False
            return "", deltas
        whole = self._whole(self.inside)
        self.inside = None
        return "", deltas + (whole or [])

    # -- inside <tool_call> --

    def _parse_inside(self) -> list[dict]:
        """Deltas for what arrived inside the tags: each call's head (id, name) once it is
        complete, then its arguments as they come."""
        deltas = []
        while True:
            if self.closing:     # after a call's arguments: the call object's own closing brace
                rest = self.inside[self.read:]
                if not rest.strip():
                    return deltas
                tail = re.match(r"\s*\}", rest)
                self.read += tail.end() if tail else 0
                self.closing = False
            if not self.streaming:
                if self._full():
                    self.read = len(self.inside)     # further calls are read and dropped
                    return deltas
                rest = self.inside[self.read:]
                head = _CALL_HEAD.match(rest)
                if head is None or not rest[head.end():].lstrip().startswith("{"):
                    return deltas     # not (yet) a call head this parser streams; read whole at the close
                self.read += head.end()
                call = {"id": new_call_id(), "type": "function",
                        "function": {"name": json.loads(f'"{head.group(1)}"'), "arguments": ""}}
                self.calls.append(call)
                deltas.append({"index": len(self.calls) - 1, **call, "function": dict(call["function"])})
                self.streaming, self.depth, self.in_string, self.escaped = True, 0, False, False
            fragment, done = self._scan_arguments()
            if fragment:
                self.calls[-1]["function"]["arguments"] += fragment
                deltas.append({"index": len(self.calls) - 1, "function": {"arguments": fragment}})
            if not done:
                return deltas
            self.streaming, self.closing = False, True

    def _scan_arguments(self) -> tuple[str, bool]:
        """The arguments' JSON read so far (from self.read), and whether it is complete."""
        text, i = self.inside, self.read
        start = i
        while i < len(text):
            ch = text[i]
            i += 1
            if self.depth == 0 and ch.isspace() and i - 1 == start:
                start = i
                continue
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.read = i
                    return text[start:i], True
        self.read = i
        return text[start:i], False

    def _close(self) -> tuple[str, list[dict]]:
        """At </tool_call>: calls read whole if none streamed; a block that holds no call
        goes back into the text as the model wrote it."""
        inside, streamed = self.inside, self.read > 0
        self.inside, self.read, self.streaming, self.closing = None, 0, False, False
        if streamed:
            return "", []
        whole = self._whole(inside)
        return ("", whole) if whole is not None else (OPEN + inside + CLOSE, [])

    def _whole(self, inside: str) -> list[dict] | None:
        try:
            value = json.loads(inside)
        except ValueError:
            return None
        items = value if isinstance(value, list) else [value]
        deltas = []
        for item in items:
            if self._full():
                break
            if not (isinstance(item, dict) and isinstance(item.get("name"), str)):
                return None
            args = item.get("arguments", item.get("parameters", {}))
            call = {"id": new_call_id(), "type": "function",
                    "function": {"name": item["name"],
                                 "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}}
            self.calls.append(call)
            deltas.append({"index": len(self.calls) - 1, **call, "function": dict(call["function"])})
        return deltas

    def _full(self) -> bool:
        return self.max_calls is not None and len(self.calls) >= self.max_calls
