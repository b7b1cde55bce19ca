"""Conversations out of the chat client and back in: JSON that keeps everything, Markdown to read.

Our JSON (FORMAT, FORMAT_VERSION) holds, per conversation, every message of every
branch in OpenAI's message shape (`role`, `content`, `reasoning_content`,
`tool_calls`) plus what the store keeps with it (`id`, `parent_id`, `status`,
`model`, `usage`, `details`: the server's timings, model version and finish reason,
`error`, `created_at`), and `leaf_id`, the end of the path that was shown. A
conversation without branches therefore reads as a plain OpenAI `messages` list.

Import takes that JSON, or a plain OpenAI `messages` array (or a request body holding
one). Everything is checked before anything is written, and then written in one
transaction (ConversationStore.insert_conversations): a file is taken whole or not at
all, and a refusal says what is wrong and where (`conversations[0].messages[3].role`).

Plain Python (no Streamlit): `client_pages/transfer.py` is the page.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from chatstack.conversations import (COMPLETE, FAILED, STOPPED, Conversation, ConversationStore, Message,
                                     title_from)
from chatstack.usage import USAGE_FIELDS, Usage

FORMAT = "chatstack-conversations"
FORMAT_VERSION = 1

MAX_IMPORT_BYTES = 20 * 1024 * 1024  # a file larger than this is refused before it is read
MAX_MESSAGES = 50_000                # in one file, over all its conversations
MAX_TEXT_CHARS = 1_000_000           # one message's content or reasoning
MAX_NUMBER = 2 ** 53                 # ids, counts, times: what SQLite and JSON readers keep exactly
MAX_NESTING = 32                     # JSON nesting anywhere in the file; ours needs 8

ROLES = ("user", "assistant")
STATUSES = (COMPLETE, STOPPED, FAILED)
MESSAGE_KEYS = {"id", "parent_id", "role", "content", "reasoning_content", "tool_calls", "status", "model",
                "usage", "details", "error", "created_at"}
CONVERSATION_KEYS = {"title", "created_at", "updated_at", "pinned", "leaf_id", "messages"}


class TransferError(ValueError):
    """A file that cannot be imported; the message says what is wrong and where."""


@dataclass
class ImportPlan:
    """What a file would add, checked and not yet written: conversations with their messages
    (ids and parent ids in the file's own numbering), and notes for the user."""

    conversations: list[tuple[Conversation, list[Message]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    source: str = ""  # "chatstack JSON" or "OpenAI messages"

    @property
    def message_count(self) -> int:
        return sum(len(messages) for _, messages in self.conversations)

    def summary(self) -> str:
        n = len(self.conversations)
        return (f"{n} conversation{'s' if n != 1 else ''} with {self.message_count} "
                f"message{'s' if self.message_count != 1 else ''} ({self.source})")


# ---- export -------------------------------------------------------------------------------

def message_record(message: Message) -> dict:
    """One stored message as an OpenAI-shaped dict with our metadata beside it."""
    record = {"id": message.id, "parent_id": message.parent_id, "role": message.role, "content": message.content}
    if message.reasoning:
        record["reasoning_content"] = message.reasoning
    if message.tool_calls:
        record["tool_calls"] = message.tool_calls
    if message.role == "assistant":
        record.update(status=message.status, model=message.model,
                      usage={name: value for name, value in asdict(message.usage).items() if value is not None})
        if message.details:
            record["details"] = message.details
        if message.error:
            record["error"] = message.error
    record["created_at"] = message.created_at
    return record


def conversation_record(conversation: Conversation, messages: list[Message]) -> dict:
    return {"title": conversation.title, "created_at": conversation.created_at,
            "updated_at": conversation.updated_at, "pinned": conversation.pinned,
            "leaf_id": conversation.leaf_id, "messages": [message_record(m) for m in messages]}


def chosen(store: ConversationStore, user: str, conversation_ids: list[int] | None) -> list[Conversation]:
    """The user's conversations to export: the given ones, else all (listed order)."""
    if conversation_ids is None:
        return store.list(user)
    found = [store.get(user, cid) for cid in conversation_ids]
    return [c for c in found if c is not None]


def export_json(store: ConversationStore, user: str, conversation_ids: list[int] | None = None,
                now: float | None = None) -> str:
    """The user's conversations (the given ones, else all) as our JSON, every branch included."""
    conversations = chosen(store, user, conversation_ids)
    document = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "exported_at": datetime.fromtimestamp(time.time() if now is None else now, timezone.utc).isoformat(),
        "settings": store.load_settings(user),  # for the reader; import leaves the user's settings as they are
        "conversations": [conversation_record(c, store.all_messages(user, c.id)) for c in conversations],
    }
    return json.dumps(document, ensure_ascii=False, indent=1)


def export_markdown(store: ConversationStore, user: str, conversation_ids: list[int] | None = None) -> str:
    """The conversations as they are shown (each one's selected path), to read or share."""
    parts = []
    for conversation in chosen(store, user, conversation_ids):
        path = store.messages(user, conversation.id)
        every = store.all_messages(user, conversation.id)
        parts.append(f"# {conversation.title}\n")
        if len(every) > len(path):
            hidden = len(every) - len(path)
            parts.append(f"*{hidden} message{'s' if hidden != 1 else ''} on other branches are not shown here; "
                         f"the JSON export keeps them.*\n")
        for message in path:
            parts.append(markdown_message(message))
    return "\n".join(parts)


def markdown_message(message: Message) -> str:
    if message.role == "user":
        heading = "## User"
    else:
        version = (message.details or {}).get("model_version")
        who = " ".join(str(part) for part in (message.model, version) if part)
        heading = "## Assistant" + (f" ({who})" if who else "")
        if message.status != COMPLETE:
            heading += f" — {message.status}"
    lines = [heading, ""]
    if message.reasoning:
        lines += ["<details><summary>Reasoning</summary>", "", message.reasoning, "", "</details>", ""]
    if message.content:
        lines += [message.content, ""]
    for call in message.tool_calls or []:
        function = call.get("function", {}) if isinstance(call, dict) else {}
        lines += [f"Tool call `{function.get('name', '')}`:", "", "```json", str(function.get("arguments", "")),
                  "```", ""]
    return "\n".join(lines)


# ---- import: check everything, then write it in one go -----------------------------------

def read_import(data: bytes | str) -> ImportPlan:
    """Check a file and say what it would add; raises TransferError, writes nothing."""
    size = len(data.encode() if isinstance(data, str) else data)
    if size > MAX_IMPORT_BYTES:
        raise TransferError(f"the file is {size / 2**20:.1f} MB; at most {MAX_IMPORT_BYTES / 2**20:.0f} MB "
                            f"can be imported")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise TransferError(f"the file is not UTF-8 text (byte {e.start})") from None
    try:
        document = json.loads(data, parse_constant=_refuse_constant)
    except RecursionError:
        raise TransferError(f"the file nests too deep; a conversation file needs at most {MAX_NESTING} levels") \
            from None
    except ValueError as e:
        raise TransferError(f"the file is not valid JSON: {e}") from None
    depth = nesting(document)
    if depth > MAX_NESTING:
        raise TransferError(f"the file nests more than {MAX_NESTING} levels deep; a conversation file needs at "
                            f"most {MAX_NESTING}")
    if isinstance(document, dict) and "format" in document:
        plan = _read_ours(document)
    elif isinstance(document, list) or (isinstance(document, dict) and "messages" in document):
        plan = _read_openai(document)
    else:
        raise TransferError("the file is neither a chatstack export (with \"format\": \"chatstack-conversations\") "
                            "nor an OpenAI messages array")
    if plan.message_count > MAX_MESSAGES:
        raise TransferError(f"the file holds {plan.message_count} messages; at most {MAX_MESSAGES} can be "
                            f"imported at once")
    return plan


def import_plan(store: ConversationStore, user: str, plan: ImportPlan) -> list[Conversation]:
    """Write a checked plan for the user, all of it in one transaction. Returns the new conversations."""
    return store.insert_conversations(user, plan.conversations)


def nesting(value) -> int:
    """How deep a parsed JSON value nests (a scalar is 0, [] is 1), without recursion."""
    deepest = 0
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_NESTING:  # deeper is refused anyway: no need to walk it all
            pending.extend((child, depth + 1) for child in children)
    return deepest


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


class _Checker:
    """Field checks that name where a value is wrong."""

    @staticmethod
    def fail(where: str, problem: str):
        raise TransferError(f"{where}: {problem}")

    def dict(self, value, where: str, allowed: set[str] | None = None) -> dict:
        if not isinstance(value, dict):
            self.fail(where, f"expected an object, found {_kind(value)}")
        if allowed is not None:
            unknown = sorted(set(value) - allowed)
            if unknown:
                self.fail(where, f"unknown field {unknown[0]!r} (known: {', '.join(sorted(allowed))})")
        return value

    def list(self, value, where: str) -> list:
        if not isinstance(value, list):
            self.fail(where, f"expected a list, found {_kind(value)}")
        return value

    def text(self, value, where: str, *, optional: bool = False, limit: int = MAX_TEXT_CHARS) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            self.fail(where, f"expected text, found {_kind(value)}")
        if len(value) > limit:
            self.fail(where, f"{len(value):,} characters; at most {limit:,}")
        return value

    def number(self, value, where: str, *, optional: bool = True, integer: bool = False) -> float | int | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (integer and not isinstance(value, int)):
            self.fail(where, f"expected {'a whole number' if integer else 'a number'}, found {_kind(value)}")
        if not 0 <= value <= MAX_NUMBER:
            self.fail(where, f"expected a number from 0 to {MAX_NUMBER}, found {value}")
        return value

    def content(self, value, where: str, *, optional: bool) -> str:
        """OpenAI content: text, a list of text parts, or null (an assistant's tool-call message)."""
        if value is None and optional:
            return ""
        if isinstance(value, list):
            texts = []
            for i, part in enumerate(value):
                part = self.dict(part, f"{where}[{i}]")
                if part.get("type") != "text":
                    self.fail(f"{where}[{i}].type", f"only text parts can be imported, not {part.get('type')!r}")
                texts.append(self.text(part.get("text"), f"{where}[{i}].text"))
            value = "".join(texts)
        return self.text(value, where)

    def role(self, value, where: str) -> str:
        if value not in ROLES:
            self.fail(where, f"{value!r} is not a role the chat client keeps ({', '.join(ROLES)})")
        return value

    def tool_calls(self, value, where: str) -> list | None:
        if value is None:
            return None
        calls = []
        for i, call in enumerate(self.list(value, where)):
            at = f"{where}[{i}]"
            call = self.dict(call, at, {"id", "type", "function", "index"})
            function = self.dict(call.get("function"), f"{at}.function", {"name", "arguments"})
            calls.append({"id": self.text(call.get("id", ""), f"{at}.id", limit=200),
                          "type": "function" if call.get("type", "function") == "function"
                          else self.fail(f"{at}.type", "only \"function\" calls exist"),
                          "function": {"name": self.text(function.get("name"), f"{at}.function.name", limit=200),
                                       "arguments": self.text(function.get("arguments", ""),
                                                              f"{at}.function.arguments")}})
        return calls or None

    def usage(self, value, where: str) -> Usage:
        if value is None:
            return Usage()
        value = self.dict(value, where, set(USAGE_FIELDS))
        return Usage(**{name: self.number(value.get(name), f"{where}.{name}", integer=name != "tokens_per_second")
                        for name in USAGE_FIELDS})

    def details(self, value, where: str) -> dict | None:
        """A flat object of figures and names (the server's timings, model_version, finish_reason)."""
        if value is None:
            return None
        value = self.dict(value, where)
        for key, item in value.items():
            if isinstance(item, str):
                self.text(item, f"{where}.{key}", limit=1000)
            elif item is not None and not isinstance(item, (int, float, bool)):
                self.fail(f"{where}.{key}", f"expected a number or text, found {_kind(item)}")
            elif isinstance(item, float) and not math.isfinite(item):
                self.fail(f"{where}.{key}", "expected a finite number")
        return value or None


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "true/false", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _read_ours(document: dict) -> ImportPlan:
    check = _Checker()
    if document.get("format") != FORMAT:
        check.fail("format", f"{document.get('format')!r} is not {FORMAT!r}")
    version = document.get("version")
    if version != FORMAT_VERSION:
        check.fail("version", f"this file is format version {version!r}; this app reads version {FORMAT_VERSION}"
                   + (" (it was written by a newer app)" if isinstance(version, int) and version > FORMAT_VERSION
                      else ""))
    check.dict(document, "file", {"format", "version", "exported_at", "settings", "conversations"})
    plan = ImportPlan(source="chatstack JSON")
    for c, record in enumerate(check.list(document.get("conversations"), "conversations")):
        at = f"conversations[{c}]"
        record = check.dict(record, at, CONVERSATION_KEYS)
        messages = []
        seen: dict[int, Message] = {}
        for m, item in enumerate(check.list(record.get("messages"), f"{at}.messages")):
            where = f"{at}.messages[{m}]"
            item = check.dict(item, where, MESSAGE_KEYS)
            message_id = check.number(item.get("id"), f"{where}.id", optional=False, integer=True)
            if message_id in seen:
                check.fail(f"{where}.id", f"{message_id} is used twice")
            parent_id = check.number(item.get("parent_id"), f"{where}.parent_id", integer=True)
            if parent_id is not None and parent_id not in seen:
                check.fail(f"{where}.parent_id", f"{parent_id} is not a message before this one")
            role = check.role(item.get("role"), f"{where}.role")
            status = item.get("status", COMPLETE)
            if status not in STATUSES:
                check.fail(f"{where}.status", f"{status!r} is not one of {', '.join(STATUSES)}")
            if role == "user" and any(item.get(k) is not None for k in ("tool_calls", "reasoning_content")):
                check.fail(where, "a user message carries no tool calls or reasoning")
            message = Message(
                id=message_id, conversation_id=0, role=role,
                content=check.content(item.get("content"), f"{where}.content", optional=role == "assistant"),
                status=status, model=check.text(item.get("model"), f"{where}.model", optional=True, limit=200),
                usage=check.usage(item.get("usage"), f"{where}.usage"),
                error=check.text(item.get("error"), f"{where}.error", optional=True, limit=10_000),
                created_at=check.number(item.get("created_at"), f"{where}.created_at") or 0.0,
                parent_id=parent_id,
                reasoning=check.text(item.get("reasoning_content"), f"{where}.reasoning_content", optional=True),
                tool_calls=check.tool_calls(item.get("tool_calls"), f"{where}.tool_calls"),
                details=check.details(item.get("details"), f"{where}.details"))
            seen[message_id] = message
            messages.append(message)
        leaf_id = check.number(record.get("leaf_id"), f"{at}.leaf_id", integer=True)
        if leaf_id is not None and leaf_id not in seen:
            check.fail(f"{at}.leaf_id", f"{leaf_id} is not one of the conversation's messages")
        pinned = record.get("pinned", False)
        if not isinstance(pinned, bool):
            check.fail(f"{at}.pinned", f"expected true/false, found {_kind(pinned)}")
        created = check.number(record.get("created_at"), f"{at}.created_at") or time.time()
        conversation = Conversation(
            id=0, title=check.text(record.get("title"), f"{at}.title", limit=500) or "Imported chat",
            created_at=created, updated_at=check.number(record.get("updated_at"), f"{at}.updated_at") or created,
            pinned=pinned, leaf_id=leaf_id)
        plan.conversations.append((conversation, messages))
    return plan


def _read_openai(document) -> ImportPlan:
    """A plain OpenAI messages array (or a request body with `messages`): one conversation, one path."""
    check = _Checker()
    where = "messages"
    if isinstance(document, dict):
        items = check.list(document["messages"], where)
    else:
        items = document
    plan = ImportPlan(source="OpenAI messages")
    messages: list[Message] = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        item = check.dict(item, at)
        if item.get("role") in ("system", "developer"):
            check.text(item.get("content"), f"{at}.content") if not isinstance(item.get("content"), list) \
                else check.content(item.get("content"), f"{at}.content", optional=False)
            plan.notes.append(f"{at}: the {item['role']} message was left out (the chat client's system prompt "
                              f"is a setting, not part of a conversation)")
            continue
        role = check.role(item.get("role"), f"{at}.role")
        messages.append(Message(
            id=len(messages) + 1, conversation_id=0, role=role,
            content=check.content(item.get("content"), f"{at}.content",
                                  optional=role == "assistant" and bool(item.get("tool_calls"))),
            parent_id=len(messages) or None,
            reasoning=check.text(item.get("reasoning_content"), f"{at}.reasoning_content", optional=True),
            tool_calls=check.tool_calls(item.get("tool_calls"), f"{at}.tool_calls") if role == "assistant" else None,
            created_at=time.time()))
    if not messages:
        check.fail(where, "no user or assistant message to import")
    first_question = next((m.content for m in messages if m.role == "user"), "")
    now = time.time()
    plan.conversations.append((Conversation(0, title_from(first_question) if first_question else "Imported chat",
                                            now, now, leaf_id=messages[-1].id), messages))
    return plan
