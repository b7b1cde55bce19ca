"""The chat client's logic, without Streamlit: where the server is, what to ask
it, how to stream and record an answer, and what is wrong when it fails.

client_app.py draws; this module decides.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

from chatstack.conversations import COMPLETE, FAILED, STOPPED, ConversationStore, Message
from chatstack.torchserve_client import (
    DEFAULT_INFERENCE_URL, DEFAULT_MANAGEMENT_URL, Keys, ModelNotFound, ServerUnreachable, TorchServeClient,
    TorchServeError, Unauthorized,
)

DEFAULT_MODEL = "llama"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer clearly and concisely."
# How long an answer waits for a model whose workers are still loading.
DEFAULT_WAIT_FOR_MODEL_S = 120.0

# TorchServe 0.12 answers a refused token with HTTP 400 and this text, not 401.
TOKEN_REFUSED = "Token Authorization failed"


# ---- where the server is ---------------------------------------------------------

@dataclass
class ServerSettings:
    """How to reach TorchServe. Read from environment variables, else Streamlit
    secrets of the same names, else local defaults; never written in code."""

    inference_url: str = DEFAULT_INFERENCE_URL
    management_url: str = DEFAULT_MANAGEMENT_URL
    inference_key: str | None = None
    management_key: str | None = None
    default_model: str = DEFAULT_MODEL
    wait_for_model_s: float = DEFAULT_WAIT_FOR_MODEL_S

    @classmethod
    def from_sources(cls, env: Mapping[str, str] | None = None,
                     secrets: Mapping[str, object] | None = None) -> "ServerSettings":
        env = os.environ if env is None else env
        secrets = secrets or {}

        def setting(name: str, default=None):
            value = env.get(name) or secrets.get(name)
            return str(value) if value not in (None, "") else default

        # A key file (TorchServe's key_file.json) gives both keys; explicit keys win over it.
        file_keys = Keys()
        key_file = setting("TORCHSERVE_KEY_FILE")
        if key_file:
            try:
                file_keys = Keys.from_key_file(Path(key_file).expanduser())
            except (OSError, ValueError):
                file_keys = Keys()  # missing or half-written: the health check will say the key is refused
        return cls(
            inference_url=setting("TORCHSERVE_URL", DEFAULT_INFERENCE_URL),
            management_url=setting("TORCHSERVE_MANAGEMENT_URL", DEFAULT_MANAGEMENT_URL),
            inference_key=setting("TORCHSERVE_INFERENCE_KEY", file_keys.inference),
            management_key=setting("TORCHSERVE_MANAGEMENT_KEY", file_keys.management),
            default_model=setting("TORCHSERVE_MODEL", DEFAULT_MODEL),
            wait_for_model_s=float(setting("CHAT_WAIT_FOR_MODEL_S", DEFAULT_WAIT_FOR_MODEL_S)),
        )

    def client(self, timeout: float = 10.0) -> TorchServeClient:
        return TorchServeClient(self.inference_url, self.management_url,
                                keys=Keys(inference=self.inference_key, management=self.management_key),
                                timeout=timeout)


def available_models(server: ServerSettings) -> list[str]:
    """The server's registered models (needs the management API and its key),
    else just the configured model."""
    if server.management_key:
        try:
            names = sorted(m["modelName"] for m in server.client(timeout=3).list_models())
        except (TorchServeError, KeyError):
            names = []
        if names:
            # Keep the configured model first: it is the default choice.
            return sorted(names, key=lambda name: name != server.default_model)
    return [server.default_model]


# ---- what to ask -------------------------------------------------------------------

# What the settings may be: the 2048-token context must keep room for the prompt.
LIMITS = {"temperature": (0.0, 2.0), "top_p": (0.05, 1.0), "max_tokens": (1, 1536)}


@dataclass
class ChatSettings:
    model: str = DEFAULT_MODEL
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 512

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
        if saved.get("model") in models:
            settings.model = saved["model"]
        return settings

    def as_dict(self) -> dict:
        return asdict(self)

    def sampling(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}


def request_messages(system_prompt: str, history: list[Message]) -> list[dict]:
    """The conversation as the model sees it. Failed answers are left out (they
    are about to be retried); stopped ones stay, they are what the user kept."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    messages += [{"role": m.role, "content": m.content} for m in history
                 if not (m.role == "assistant" and m.status == FAILED)]
    return messages


def needs_answer(history: list[Message]) -> bool:
    """The last user message has no answer yet (the server failed, or the page closed before it came)."""
    return bool(history) and (history[-1].role == "user" or history[-1].status == FAILED)


# ---- health -------------------------------------------------------------------------

READY, DOWN, BAD_KEY, MISSING, LOADING, ERROR = "ready", "down", "bad_key", "missing", "loading", "error"


@dataclass
class Health:
    state: str
    message: str

    @property
    def ok(self) -> bool:
        return self.state == READY


def is_token_refused(error: TorchServeError) -> bool:
    return isinstance(error, Unauthorized) or (error.status == 400 and TOKEN_REFUSED in error.message)


def explain(error: TorchServeError, server: ServerSettings, model: str) -> Health:
    """What a failed call means, in plain words."""
    if isinstance(error, ServerUnreachable):
        return Health(DOWN, f"TorchServe is not running at {server.inference_url}, or nothing answers there. "
                            "Start it (`python -m chatstack start`) or check TORCHSERVE_URL.")
    if is_token_refused(error):
        return Health(BAD_KEY, "TorchServe refused the inference key. Set TORCHSERVE_INFERENCE_KEY or "
                               "TORCHSERVE_KEY_FILE to the current key (keys change when TorchServe restarts; "
                               "`python -m chatstack key` prints it).")
    if isinstance(error, ModelNotFound):
        return Health(MISSING, f"The model \"{model}\" is not registered on TorchServe. "
                               "Register it (admin console or management API) or pick another model.")
    if error.status == 503:
        return Health(LOADING, f"The model \"{model}\" has no worker ready yet: it is still loading "
                               "(or was scaled to zero workers).")
    return Health(ERROR, f"TorchServe could not answer: {error.message}")


def check_health(server: ServerSettings, model: str) -> Health:
    """Ask TorchServe whether a chat with `model` can start now."""
    client = server.client(timeout=5)
    try:
        status = client.ping()
        if status != "Healthy":
            return Health(LOADING, f"TorchServe says it is {status}: workers are still starting.")
        # A chat without messages is refused by the model's handler (400) before
        # anything is generated; reaching the handler proves key, model and a ready worker.
        client.chat(model, [], timeout=client.timeout)
    except TorchServeError as error:
        if error.status == 400 and not is_token_refused(error):
            return Health(READY, f"The model \"{model}\" is ready.")
        health = explain(error, server, model)
        if health.state == LOADING:
            health.message += _worker_summary(client, model)
        return health
    return Health(READY, f"The model \"{model}\" is ready.")


def _worker_summary(client: TorchServeClient, model: str) -> str:
    if not client.keys.management:
        return ""
    try:
        workers = [w for entry in client.describe_model(model) for w in entry.get("workers", [])]
    except TorchServeError:
        return ""  # the management API is optional here
    ready = sum(w.get("status") == "READY" for w in workers)
    return f" {ready} of {len(workers)} workers ready."


# ---- one answer -----------------------------------------------------------------------

@dataclass
class Reply:
    """An answer as it streams in, and what the server said about it at the end."""

    model: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    context_length: int | None = None
    messages_dropped: int | None = None
    error: str | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    pieces: int = field(default=0, repr=False)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def tokens_per_second(self) -> float | None:
        """Generation speed after the first token (the prompt's processing time left out)."""
        end = self.finished_at or time.monotonic()
        tokens = self.completion_tokens or self.pieces
        if self.first_token_at is None or tokens < 2 or end <= self.first_token_at:
            return None
        return (tokens - 1) / (end - self.first_token_at)

    def take(self, chunk: dict) -> str:
        """Record one chat.completion.chunk; return its text."""
        choice = (chunk.get("choices") or [{}])[0]
        piece = (choice.get("delta") or {}).get("content") or ""
        if piece:
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            self.pieces += 1
            self.text += piece
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
            self.finished_at = time.monotonic()
            usage = chunk.get("usage") or {}
            context = chunk.get("context") or {}
            self.prompt_tokens = usage.get("prompt_tokens")
            self.completion_tokens = usage.get("completion_tokens")
            self.total_tokens = usage.get("total_tokens")
            self.context_length = context.get("context_length")
            self.messages_dropped = context.get("messages_dropped")
        return piece


def stream_reply(server: ServerSettings, settings: ChatSettings, messages: list[dict], reply: Reply,
                 on_wait: Callable[[Health, float], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> Iterator[str]:
    """Yield the answer's text as TorchServe generates it, filling `reply`.

    While the model has no ready worker (HTTP 503) the request is repeated with
    growing pauses, up to server.wait_for_model_s; `on_wait` hears about each
    pause. Closing this generator closes the HTTP connection, which makes
    TorchServe cancel the generation."""
    client = server.client()
    deadline = time.monotonic() + server.wait_for_model_s
    pause = 1.0
    while True:
        chunks = client.chat_stream(settings.model, messages, **settings.sampling())
        try:
            for chunk in chunks:
                piece = reply.take(chunk)
                if piece:
                    yield piece
            return
        except TorchServeError as error:
            # Only a request that got nothing yet can be repeated without repeating text.
            if error.status != 503 or reply.pieces or time.monotonic() + pause > deadline:
                raise
            if on_wait:
                on_wait(explain(error, server, settings.model), pause)
            sleep(pause)
            pause = min(pause * 2, 10.0)
        finally:
            chunks.close()


class Answer:
    """One answer streamed from TorchServe and saved however its stream ends:
    complete, stopped by the user (Streamlit interrupts the script to stop or
    rerun it), or failed.

        with Answer(store, conversation_id, server, settings, messages) as answer:
            st.write_stream(answer.stream)
    """

    def __init__(self, store: ConversationStore, conversation_id: int, server: ServerSettings,
                 settings: ChatSettings, messages: list[dict],
                 on_wait: Callable[[Health, float], None] | None = None):
        self.store = store
        self.conversation_id = conversation_id
        self.reply = Reply(model=settings.model)
        self.stream = stream_reply(server, settings, messages, self.reply, on_wait=on_wait)
        self.saved: Message | None = None
        self._done = threading.Event()

    def wait_until_saved(self, timeout: float) -> bool:
        """Wait for the answer to end and be saved (True), at most `timeout` seconds.

        Streamlit starts a new script run at once when the user clicks during an
        answer; the interrupted run stops streaming at its next chunk and saves
        what it has. The new run waits for that so it shows the saved answer."""
        return self._done.wait(timeout)

    def __enter__(self) -> "Answer":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self._save(exc_type, exc)
        finally:
            self._done.set()
        return False

    def _save(self, exc_type, exc) -> None:
        # Closing the stream now (not when garbage is collected) closes the HTTP
        # connection at once, so TorchServe frees the slot for other chats.
        self.stream.close()
        reply = self.reply
        if exc_type is None:
            status = COMPLETE if reply.finished else STOPPED
        elif issubclass(exc_type, TorchServeError):
            status, reply.error = FAILED, exc.message
        elif issubclass(exc_type, Exception) and not _is_script_control(exc_type):
            status, reply.error = FAILED, f"{exc_type.__name__}: {exc}"
        else:
            status = STOPPED  # Stop button, a rerun, or the app shutting down
        # A failure before any text leaves only the user's message: it shows a Retry.
        if reply.text or status != FAILED:
            self.saved = self.store.add_answer(
                self.conversation_id, reply.text, status=status, model=reply.model,
                prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens or reply.pieces,
                total_tokens=reply.total_tokens, context_length=reply.context_length,
                messages_dropped=reply.messages_dropped, tokens_per_second=reply.tokens_per_second,
                error=reply.error)


def _is_script_control(exc_type: type) -> bool:
    # Streamlit's StopException and RerunException, matched by base name so this
    # module does not import Streamlit.
    return any(base.__name__ == "ScriptControlException" for base in exc_type.__mro__)


# ---- what to show -------------------------------------------------------------------

def answer_caption(message: Message) -> str:
    """The discreet line under an answer: tokens, speed, and how it ended."""
    parts = []
    if message.completion_tokens:
        parts.append(f"{message.completion_tokens} tokens")
    if message.tokens_per_second:
        parts.append(f"{message.tokens_per_second:.1f} tokens/s")
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
        if message.role == "assistant" and message.total_tokens and message.context_length:
            return ContextUse(message.total_tokens, message.context_length, message.messages_dropped or 0)
    return None
