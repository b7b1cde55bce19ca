"""Reasoning: a model's thinking, returned apart from its answer.

Reasoning models write their thinking first, between `<think>` and `</think>` (DeepSeek-R1,
Qwen3, ...), or their chat template opens `<think>` at the end of the prompt and the model
only closes it. `ReasoningSplitter` takes the answer as it streams and splits it into
reasoning (OpenAI-compatible servers' `reasoning_content`) and content, holding back what
may be the start of a tag. Thinking is only looked for at the start of an answer: a
`<think>` later on is ordinary text.
"""

from __future__ import annotations

from tagged_text import partial_tail

OPEN, CLOSE = "<think>", "</think>"


def opens_reasoning(prompt: str) -> bool:
    """Whether the rendered prompt ends inside `<think>` (the template started the thinking)."""
    return prompt.rstrip().endswith(OPEN)


class ReasoningSplitter:
    def __init__(self, thinking: bool = False):
        self.state = "thinking" if thinking else "start"   # start -> thinking -> answer, or start -> answer
        self.pending = ""

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) of this piece of the answer, as far as they are certain."""
        self.pending += text
        reasoning = content = ""
        if self.state == "start":
            head = self.pending.lstrip()
            if head.startswith(OPEN):
                self.state, self.pending = "thinking", head[len(OPEN):]
            elif OPEN.startswith(head):
                return "", ""                      # may still become <think>
            else:
                self.state = "answer"
        if self.state == "thinking":
            end = self.pending.find(CLOSE)
            if end < 0:
                keep = partial_tail(self.pending, CLOSE)
                reasoning, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep:]
                return reasoning, ""
            reasoning, self.pending = self.pending[:end], self.pending[end + len(CLOSE):].lstrip()
            self.state = "answer" if self.pending else "after"
        if self.state == "after":                  # the whitespace between </think> and the answer is dropped
            self.pending = self.pending.lstrip()
            if not self.pending:
                return reasoning, ""
            self.state = "answer"
        content, self.pending = self.pending, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        rest, self.pending = self.pending, ""
        if self.state == "thinking":
            return rest, ""
        return "", rest if self.state != "after" else rest.lstrip()
