"""Turn chat messages into prompt tokens with the GGUF's own chat template,
trimming the oldest turns when a conversation outgrows the context.

The template also gets the request's `tools` (where it renders them: `supports_tools`)
and its `chat_template_kwargs` (e.g. `enable_thinking`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jinja2
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from reasoning import opens_reasoning

# Used only when a GGUF carries no `tokenizer.chat_template`.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ContextOverflow(ValueError):
    def __init__(self, n_prompt: int, n_fit: int, detail: str):
        super().__init__(f"{detail}: the prompt has {n_prompt} tokens but at most {n_fit} fit")
        self.n_prompt = n_prompt
        self.n_fit = n_fit


class TemplateRefused(ValueError):
    """The chat template could not render these messages (it raised, e.g. "roles must alternate")."""

    def __init__(self, detail: str):
        super().__init__(f"the model's chat template cannot render these messages: {detail}")


@dataclass
class FittedPrompt:
    tokens: list[int]
    messages_dropped: int
    opens_reasoning: bool = False    # the prompt ends inside <think>: the answer starts with thinking


class ChatPrompter:
    def __init__(self, template: str | None, bos_token: str, eos_token: str,
                 tokenize: Callable[[str], list[int]]):
        self.template = template or CHATML_TEMPLATE
        self.uses_fallback_template = template is None
        self._formatter = Jinja2ChatFormatter(template=self.template, bos_token=bos_token, eos_token=eos_token)
        # The template writes BOS itself where the model wants one.
        self._tokenize = tokenize

    @property
    def supports_tools(self) -> bool:
        """Whether the template renders the `tools` it is given (else they need a prompt of ours)."""
        return "tools" in self.template

    def render(self, messages: list[dict], tools: list[dict] | None = None, **template_kwargs) -> str:
        try:
            return self._formatter(messages=messages, tools=tools, **template_kwargs).prompt
        except (jinja2.TemplateError, ValueError, TypeError) as e:
            raise TemplateRefused(str(e)) from None

    def tokens(self, messages: list[dict], tools: list[dict] | None = None, **template_kwargs) -> list[int]:
        return self._tokenize(self.render(messages, tools, **template_kwargs))

    def fit(self, messages: list[dict], n_fit: int, tools: list[dict] | None = None,
            **template_kwargs) -> FittedPrompt:
        """Keep leading system messages and the newest turns whose prompt has
        at most n_fit tokens (a rolling window). Raises ContextOverflow when
        even the last message cannot fit."""
        def fitted(window: list[dict], dropped: int) -> FittedPrompt | None:
            text = self.render(window, tools, **template_kwargs)
            tokens = self._tokenize(text)
            return FittedPrompt(tokens, dropped, opens_reasoning(text)) if len(tokens) <= n_fit else None

        whole = fitted(messages, 0)
        if whole is not None:
            return whole
        n_system = 0
        while n_system < len(messages) and messages[n_system]["role"] == "system":
            n_system += 1
        system, turns = messages[:n_system], messages[n_system:]
        for drop in range(1, len(turns)):
            kept = turns[drop:]
            # Start the window on a user turn: templates expect user first.
            if kept[0]["role"] != "user":
                continue
            window = fitted(system + kept, drop)
            if window is not None:
                return window
        last = self.tokens(system + (turns[-1:] or messages), tools, **template_kwargs)
        raise ContextOverflow(len(last), n_fit, "the last message does not fit in the context even after dropping all earlier turns")
