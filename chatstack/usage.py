"""What one answer cost and how fast it came: tokens, context use, speed.

A reply being streamed fills one (`reply_stream.Reply.usage`) and a saved answer
keeps it (`conversations.Message.usage`): one type, so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    context_length: int | None = None    # the model's context window
    messages_dropped: int | None = None  # old messages the server's rolling window left out
    tokens_per_second: float | None = None  # measured by the client, after the first token

    @classmethod
    def from_chunk(cls, chunk: dict) -> "Usage":
        """The server's figures, from the `usage` and `context` objects of a stream's last chunk."""
        usage, context = chunk.get("usage") or {}, chunk.get("context") or {}
        return cls(prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"),
                   total_tokens=usage.get("total_tokens"), context_length=context.get("context_length"),
                   messages_dropped=context.get("messages_dropped"))


USAGE_FIELDS = tuple(f.name for f in fields(Usage))
