"""What the chat page shows besides the text itself: the caption under an answer,
Markdown that keeps the model's line breaks, and how full the context is."""

from __future__ import annotations

import re
from dataclasses import dataclass

from chatstack.conversations import FAILED, STOPPED, Message


def answer_caption(message: Message) -> str:
    """The discreet line under an answer: tokens, speed, and how it ended."""
    parts = []
    if message.usage.completion_tokens:
        parts.append(f"{message.usage.completion_tokens} tokens")
    if message.usage.tokens_per_second:
        parts.append(f"{message.usage.tokens_per_second:.1f} tokens/s")
    if message.model:
        parts.append(message.model)
    if message.status == STOPPED:
        parts.append("stopped")
    elif message.status == FAILED:
        parts.append("broke off")
    return " · ".join(parts)


def as_markdown(text: str) -> str:
    """Keep the model's single line breaks (poems, lists, addresses): Markdown
    would join such lines. Code blocks are left as they are."""
    parts = re.split(r"(```.*?(?:```|$))", text, flags=re.S)
    return "".join(part if part.startswith("```") else re.sub(r"(?<!\n)\n(?!\n)", "  \n", part)
                   for part in parts)


@dataclass
class ContextUse:
    used: int
    length: int
    messages_dropped: int

    @property
    def fraction(self) -> float:
        return min(self.used / self.length, 1.0) if self.length else 0.0

    def label(self) -> str:
        return f"Context: {self.used:,} of {self.length:,} tokens ({self.fraction:.0%})"

    def dropped_note(self) -> str | None:
        if not self.messages_dropped:
            return None
        n = self.messages_dropped
        return (f"The conversation no longer fits the model's context: the {n} oldest message"
                f"{'s were' if n > 1 else ' was'} left out of the last answer.")


def context_use(history: list[Message]) -> ContextUse | None:
    """How full the context was at the last answer the server measured."""
    for message in reversed(history):
        usage = message.usage
        if message.role == "assistant" and usage.total_tokens and usage.context_length:
            return ContextUse(usage.total_tokens, usage.context_length, usage.messages_dropped or 0)
    return None

