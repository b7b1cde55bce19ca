"""What the chat client asks the model: the user's settings, and the
conversation as the model sees it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from chatstack.conversations import FAILED, Message
from chatstack.server_settings import DEFAULT_MODEL

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer clearly and concisely."

# What the settings may be: the 2048-token context must keep room for the prompt.
LIMITS = {"temperature": (0.0, 2.0), "top_p": (0.05, 1.0), "max_tokens": (1, 1536)}


@dataclass
class ChatSettings:
    model: str = DEFAULT_MODEL
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 512
    json_answer: bool = False  # ask for a JSON object (response_format json_object)

    @classmethod
    def from_saved(cls, saved: dict, models: list[str]) -> "ChatSettings":
        """Settings saved earlier, each checked; anything missing or no longer valid takes its default."""
        settings = cls(model=models[0] if models else DEFAULT_MODEL)
        for name, kind in (("system_prompt", str), ("temperature", float), ("top_p", float), ("max_tokens", int)):
            value = saved.get(name)
            if isinstance(value, (int, float, str)) and not isinstance(value, bool):
                try:
                    value = kind(value)
                except ValueError:
                    continue  # keep the default
                low, high = LIMITS.get(name, (value, value))
                setattr(settings, name, min(max(value, low), high))
        if isinstance(saved.get("json_answer"), bool):
            settings.json_answer = saved["json_answer"]
        if saved.get("model") in models:
            settings.model = saved["model"]
        return settings

    def as_dict(self) -> dict:
        return asdict(self)

    def sampling(self) -> dict:
        """The request's fields besides the messages."""
        fields = {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}
        if self.json_answer:
            fields["response_format"] = {"type": "json_object"}
        return fields


SETTING_NAMES = tuple(ChatSettings().as_dict())


def request_messages(system_prompt: str, history: list[Message]) -> list[dict]:
    """The conversation as the model sees it. Failed answers are left out (they
    are about to be retried); stopped ones stay, they are what the user kept."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    messages += [{"role": m.role, "content": m.content} for m in history
                 if not (m.role == "assistant" and m.status == FAILED)]
    return messages


# Continue: the server has no "continue the last assistant message" mode, so the model is
# asked in a user turn that is sent but never saved; its answer is added to the cut one.
CONTINUE_PROMPT = "Continue your last answer exactly where it stopped, without repeating any of it."


def continue_messages(system_prompt: str, history: list[Message]) -> list[dict]:
    """What to send to continue the last answer of `history` (which ran into max_tokens)."""
    return request_messages(system_prompt, history) + [{"role": "user", "content": CONTINUE_PROMPT}]


def needs_answer(history: list[Message]) -> bool:
    """The last user message has no answer yet (the server failed, or the page closed before it came)."""
    return bool(history) and (history[-1].role == "user" or history[-1].status == FAILED)
