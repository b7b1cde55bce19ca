"""One answer: streamed from TorchServe as it is generated, and saved however
its stream ends (complete, stopped by the user, or failed)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

from chatstack.chat_settings import ChatSettings
from chatstack.conversations import COMPLETE, FAILED, STOPPED, ConversationStore, Message
from chatstack.server_health import Health, explain
from chatstack.server_settings import ServerSettings
from chatstack.torchserve_client import TorchServeError
from chatstack.usage import Usage


@dataclass
class Reply:
    """An answer as it streams in, and what the server said about it at the end."""

    model: str
    text: str = ""
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)  # the server's figures, once the answer has finished
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
        tokens = self.usage.completion_tokens or self.pieces
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
            self.usage = Usage.from_chunk(chunk)
        return piece

    def measured(self) -> Usage:
        """The usage to keep with the answer: the server's figures (or, for an answer that did
        not finish, the pieces counted here) and the speed measured here."""
        return replace(self.usage, completion_tokens=self.usage.completion_tokens or self.pieces,
                       tokens_per_second=self.tokens_per_second)


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
            self.saved = self.store.add_answer(self.conversation_id, reply.text, status=status, model=reply.model,
                                               usage=reply.measured(), error=reply.error)


def _is_script_control(exc_type: type) -> bool:
    # Streamlit's StopException and RerunException, matched by base name so this
    # module does not import Streamlit.
    return any(base.__name__ == "ScriptControlException" for base in exc_type.__mro__)
