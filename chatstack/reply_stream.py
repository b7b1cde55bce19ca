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


# The server's own figures for one answer, kept in a message's `details` (with the model
# version that answered and how the answer ended); absent ones are left out.
TIMINGS = ("prompt_n", "cache_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms",
           "predicted_per_second", "queue_ms", "ttft_ms")


@dataclass
class Reply:
    """An answer as it streams in, and what the server said about it at the end."""

    model: str
    text: str = ""
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)  # the server's figures, once the answer has finished
    timings: dict = field(default_factory=dict)   # the server's timings, once the answer has finished
    model_version: str | None = None
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
        """Record one chat.completion.chunk; return its answer text (reasoning and tool calls
        are kept apart)."""
        choice = (chunk.get("choices") or [{}])[0]
        delta = choice.get("delta") or {}
        piece = delta.get("content") or ""
        thought = delta.get("reasoning_content") or ""
        if piece or thought or delta.get("tool_calls"):
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            self.pieces += 1
        self.text += piece
        self.reasoning += thought
        for fragment in delta.get("tool_calls") or []:
            self._take_tool_call(fragment)
        if chunk.get("model_version"):
            self.model_version = str(chunk["model_version"])
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
            self.finished_at = time.monotonic()
            self.usage = Usage.from_chunk(chunk)
            self.timings = {name: value for name, value in (chunk.get("timings") or {}).items()
                            if name in TIMINGS and value is not None}
        return piece

    def _take_tool_call(self, fragment: dict) -> None:
        """Streamed tool calls come in fragments: the first of a call (by index) has its id and
        name, the others add to its arguments."""
        index = fragment.get("index", len(self.tool_calls))
        while len(self.tool_calls) <= index:
            self.tool_calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        call = self.tool_calls[index]
        call["id"] = fragment.get("id") or call["id"]
        function = fragment.get("function") or {}
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""

    def measured(self) -> Usage:
        """The usage to keep with the answer: the server's figures (or, for an answer that did
        not finish, the pieces counted here) and the speed measured here."""
        return replace(self.usage, completion_tokens=self.usage.completion_tokens or self.pieces,
                       tokens_per_second=self.tokens_per_second)

    def details(self) -> dict | None:
        """What a saved answer keeps of the server's account of it (contract: timings,
        model_version, finish_reason), or None when there is nothing."""
        details = {**self.timings, "model_version": self.model_version, "finish_reason": self.finish_reason}
        details = {name: value for name, value in details.items() if value is not None}
        return details or None


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

        with Answer(store, user, conversation_id, server, settings, messages, parent_id) as answer:
            st.write_stream(answer.stream)

    It is saved as an answer to `parent_id` (the question it answers), or, given
    `continues`, as more text of that answer (Continue after an answer was cut short).
    """

    def __init__(self, store: ConversationStore, user: str, conversation_id: int, server: ServerSettings,
                 settings: ChatSettings, messages: list[dict], parent_id: int | None = None,
                 on_wait: Callable[[Health, float], None] | None = None, continues: Message | None = None):
        self.store = store
        self.user = user
        self.conversation_id = conversation_id
        self.parent_id = parent_id
        self.continues = continues
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
        if self.continues is not None:
            if reply.text or status != FAILED:
                self.saved = self.store.extend_answer(self.user, self.continues.id, reply.text, status=status,
                                                      usage=reply.measured(), details=reply.details())
            return
        # A failure before any text leaves only the user's message: it shows a Retry.
        if reply.text or reply.reasoning or reply.tool_calls or status != FAILED:
            self.saved = self.store.add_answer(
                self.user, self.conversation_id, reply.text, status=status, model=reply.model,
                usage=reply.measured(), error=reply.error, reasoning=reply.reasoning or None,
                tool_calls=reply.tool_calls or None, details=reply.details(), parent_id=self.parent_id)


def _is_script_control(exc_type: type) -> bool:
    # Streamlit's StopException and RerunException, matched by base name so this
    # module does not import Streamlit.
    return any(base.__name__ == "ScriptControlException" for base in exc_type.__mro__)
