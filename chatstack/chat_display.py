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
    parts += [ending] if (ending := answer_ending(message)) else []
    return " · ".join(parts)


def answer_ending(message: Message) -> str | None:
    """How an answer ended, when it did not simply finish: said plainly under it."""
    if message.status == STOPPED:
        return "stopped"
    if message.status == FAILED:
        return "broke off"
    if message.cut_short:
        return "cut short at the answer token limit"
    return None


def branch_label(message: Message) -> str | None:
    """"2/3" for the second of three alternatives; None when there is only the one."""
    position, count = message.branch
    return f"{position}/{count}" if count > 1 else None


def as_markdown(text: str) -> str:
    """Keep the model's single line breaks (poems, lists, addresses): Markdown
    would join such lines. Code blocks are left as they are."""
    parts = re.split(r"(```.*?(?:```|$))", text, flags=re.S)
    return "".join(part if part.startswith("```") else re.sub(r"(?<!\n)\n(?!\n)", "  \n", part)
                   for part in parts)


SUMMARISE_AT = 0.8  # share of the context in use from which "Summarise and continue" is offered


@dataclass
class ContextUse:
    used: int
    length: int
    messages_dropped: int

    @property
    def fraction(self) -> float:
        return min(self.used / self.length, 1.0) if self.length else 0.0

    @property
    def nearly_full(self) -> bool:
        """Past SUMMARISE_AT: the page offers to summarise the older turns."""
        return self.fraction >= SUMMARISE_AT

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

