"""Two models, or two versions of one, answering the same conversation side by side;
and "replay": a saved conversation's questions asked again of another model, with
where the answers differ.

Plain Python (no Streamlit): `client_pages/compare.py` draws what this returns.
Each side streams in a thread of its own that only reads the HTTP stream and puts
what arrives (with the time it arrived) on a queue; the page's script thread takes
the queue's items and keeps all the state, so nothing is shared between threads.
"""

from __future__ import annotations

import difflib
import html
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from chatstack.chat_settings import request_messages
from chatstack.model_registry import registered_models
from chatstack.server_settings import ServerSettings
from chatstack.torchserve_client import TorchServeClient, TorchServeError

SERVER, MEASURED = "server", "measured here"


@dataclass(frozen=True)
class Target:
    """A model to ask: a registered model, and one of its versions (None: its default version)."""

    model: str
    version: str | None = None

    def label(self) -> str:
        return f"{self.model} {self.version}" if self.version else self.model


def list_targets(server: ServerSettings) -> list[Target]:
    """Every registered model version (the management API, as the console reads it), default
    versions first; without the management key, only the configured model's default version."""
    if server.management_key:
        try:
            versions = registered_models(server.client(timeout=5))
        except TorchServeError:
            versions = []
        if versions:
            ordered = sorted(versions, key=lambda v: (v.name != server.default_model, v.name, not v.is_default,
                                                      v.version))
            return [Target(v.name, v.version) for v in ordered]
    return [Target(server.default_model)]


def compare_messages(system_prompt: str, history: Sequence, prompt: str) -> list[dict]:
    """What both sides are sent: a saved conversation (its shown path; may be empty) followed by
    the new message. Without a new message the conversation must end with a question."""
    messages = request_messages(system_prompt, list(history))
    if prompt.strip():
        messages.append({"role": "user", "content": prompt})
    elif not messages or messages[-1]["role"] != "user":
        raise ValueError("Write a message to send (the conversation does not end with a question).")
    return messages


# ---- one side: a stream read in a thread ---------------------------------------------

@dataclass(frozen=True)
class Figures:
    """How fast one answer came. Each figure is the server's own (the handler's `timings`)
    where it sent one, else measured here from when the chunks arrived."""

    tokens: int | None
    tokens_per_second: float | None
    ttft_ms: float | None
    source: str  # SERVER, MEASURED, or "server; tokens/s measured here" when mixed

    def caption(self) -> str:
        parts = []
        if self.tokens is not None:
            parts.append(f"{self.tokens} tokens")
        if self.tokens_per_second is not None:
            parts.append(f"{self.tokens_per_second:.1f} tokens/s")
        if self.ttft_ms is not None:
            parts.append(f"first token after {self.ttft_ms:,.0f} ms")
        return " · ".join(parts) + (f" ({self.source})" if parts else "")


@dataclass
class SideAnswer:
    """One side's answer as it arrives (filled in the script thread, from the queue)."""

    target: Target
    text: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    error: str | None = None
    timings: dict = field(default_factory=dict)
    model_version: str | None = None
    completion_tokens: int | None = None
    pieces: int = 0
    started_at: float = 0.0
    first_token_at: float | None = None
    last_token_at: float | None = None
    ended: bool = False

    def take(self, chunk: dict, arrived_at: float) -> None:
        choice = (chunk.get("choices") or [{}])[0]
        delta = choice.get("delta") or {}
        piece = delta.get("content") or ""
        thought = delta.get("reasoning_content") or ""
        if piece or thought or delta.get("tool_calls"):
            if self.first_token_at is None:
                self.first_token_at = arrived_at
            self.last_token_at = arrived_at
            self.pieces += 1
        self.text += piece
        self.reasoning += thought
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        if isinstance(chunk.get("timings"), dict):
            self.timings = chunk["timings"]
        if chunk.get("model_version") is not None:
            self.model_version = str(chunk["model_version"])
        usage = chunk.get("usage") or {}
        if isinstance(usage.get("completion_tokens"), int):
            self.completion_tokens = usage["completion_tokens"]

    def ending(self) -> str | None:
        """How the answer ended, when that is worth saying."""
        if self.error or not self.ended:
            return None
        if self.finish_reason is None:
            return "stopped"
        return {"stop": None, "length": "cut at the token limit"}.get(self.finish_reason, self.finish_reason)

    def details(self) -> dict:
        """The server's account of the answer, in the shape a saved answer keeps it
        (chatstack/message_details.py draws both)."""
        details = {**self.timings, "model_version": self.model_version, "finish_reason": self.finish_reason}
        return {name: value for name, value in details.items() if value is not None}

    def figures(self) -> Figures:
        def server(name: str) -> float | None:
            value = self.timings.get(name)
            return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

        tokens_measured = self.completion_tokens if self.completion_tokens is not None else (self.pieces or None)
        ttft_measured = ((self.first_token_at - self.started_at) * 1000 if self.first_token_at is not None
                         else None)
        span = (self.last_token_at or 0) - (self.first_token_at or 0)
        # After the first token: its wait is the prompt's processing, not generation.
        rate_measured = (tokens_measured - 1) / span if tokens_measured and tokens_measured > 1 and span > 0 else None
        chosen = {"tokens": (server("predicted_n"), tokens_measured),
                  "tokens_per_second": (server("predicted_per_second"), rate_measured),
                  "ttft_ms": (server("ttft_ms"), ttft_measured)}
        values = {name: own if own is not None else here for name, (own, here) in chosen.items()}
        from_server = [name for name, (own, _) in chosen.items() if own is not None]
        measured = [name for name, (own, here) in chosen.items() if own is None and here is not None]
        if not measured:
            source = SERVER
        elif not from_server:
            source = MEASURED
        else:
            source = SERVER + "; " + ", ".join(n.replace("_per_second", "/s").replace("_ms", "")
                                               for n in measured) + " " + MEASURED
        return Figures(int(values["tokens"]) if values["tokens"] is not None else None,
                       values["tokens_per_second"], values["ttft_ms"], source)


_END = object()


class SideStream:
    """One side's request, streamed in a thread that puts (arrival time, chunk) on a queue."""

    def __init__(self, client: TorchServeClient, target: Target, messages: list[dict], sampling: dict):
        self.answer = SideAnswer(target)
        self._client, self._messages, self._sampling = client, messages, sampling
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name=f"compare-{target.label()}", daemon=True)

    def start(self) -> None:
        self.answer.started_at = time.monotonic()
        self._thread.start()

    def _read(self) -> None:
        try:
            chunks = self._client.chat_stream(self.answer.target.model, self._messages,
                                              version=self.answer.target.version, **self._sampling)
            try:
                for chunk in chunks:
                    self._queue.put((time.monotonic(), chunk))
                    if self._stop.is_set():
                        break
            finally:
                chunks.close()  # closes the connection: TorchServe cancels the generation
        except TorchServeError as error:
            self._queue.put((time.monotonic(), error))
        except Exception as error:  # noqa: BLE001 - a thread's failure must reach the page, not vanish
            self._queue.put((time.monotonic(), TorchServeError(f"{type(error).__name__}: {error}")))
        finally:
            self._queue.put((time.monotonic(), _END))

    def poll(self) -> bool:
        """Take what has arrived; True when something did."""
        changed = False
        while True:
            try:
                arrived_at, item = self._queue.get_nowait()
            except queue.Empty:
                return changed
            changed = True
            if item is _END:
                self.answer.ended = True
            elif isinstance(item, TorchServeError):
                self.answer.error = item.message
            else:
                self.answer.take(item, arrived_at)

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class Comparison:
    """The same messages sent to several targets at once.

        comparison = Comparison.start(server, [left, right], messages, sampling)
        try:
            while not comparison.done:
                if comparison.poll(): draw(comparison.answers)
                time.sleep(0.05)
        finally:
            comparison.stop()
    """

    def __init__(self, sides: list[SideStream]):
        self.sides = sides

    @classmethod
    def start(cls, server: ServerSettings, targets: Sequence[Target], messages: list[dict], sampling: dict,
              client: Callable[[], TorchServeClient] | None = None) -> "Comparison":
        # A client per side: a requests.Session is not to be shared between threads.
        make_client = client or (lambda: server.client(timeout=300))
        comparison = cls([SideStream(make_client(), target, messages, sampling) for target in targets])
        for side in comparison.sides:
            side.start()
        return comparison

    @property
    def answers(self) -> list[SideAnswer]:
        return [side.answer for side in self.sides]

    @property
    def done(self) -> bool:
        return all(side.answer.ended for side in self.sides)

    def poll(self) -> bool:
        return any([side.poll() for side in self.sides])  # a list: poll every side

    def stop(self) -> None:
        """Close both streams (each at its next chunk); what has arrived is kept, and a side
        that had not finished counts as stopped."""
        for side in self.sides:
            side.stop()
        self.poll()
        for answer in self.answers:
            answer.ended = True


# ---- replay: a saved conversation's questions, asked again ------------------------------

@dataclass
class TurnReplay:
    """One question of a saved conversation: its saved answer and the one given now."""

    index: int          # 1 for the first question
    question: str
    saved: str
    saved_model: str | None
    replayed: str = ""
    error: str | None = None
    saved_figures: Figures | None = None     # from the saved answer's details, where it has them
    replayed_figures: Figures | None = None  # from the replayed completion's timings

    @property
    def identical(self) -> bool:
        return self.error is None and self.saved.strip() == self.replayed.strip()

    @property
    def similarity(self) -> float:
        return difflib.SequenceMatcher(None, words(self.saved), words(self.replayed), autojunk=False).ratio()

    def first_difference(self) -> int | None:
        """The position (1-based, in words) of the first word that differs; None when identical."""
        a, b = words(self.saved), words(self.replayed)
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return i + 1
        return None if len(a) == len(b) else min(len(a), len(b)) + 1

    def diff(self) -> list[tuple[str, str]]:
        return diff_ops(self.saved, self.replayed)

    def summary(self) -> str:
        if self.error:
            return f"Turn {self.index}: failed: {self.error}"
        if self.identical:
            return f"Turn {self.index}: identical"
        return (f"Turn {self.index}: differs from word {self.first_difference()} "
                f"({self.similarity:.0%} of the words alike)")


def saved_turns(history: Sequence) -> list[TurnReplay]:
    """The questions of a conversation (its shown path) with the answer saved after each."""
    turns = []
    for i, message in enumerate(history):
        if message.role != "user":
            continue
        answer = history[i + 1] if i + 1 < len(history) and history[i + 1].role == "assistant" else None
        turns.append(TurnReplay(len(turns) + 1, message.content, answer.content if answer else "",
                                getattr(answer, "model", None) if answer else None,
                                saved_figures=server_figures(getattr(answer, "details", None))))
    return turns


def replay(client: TorchServeClient, target: Target, system_prompt: str, history: Sequence,
           sampling: dict) -> Iterator[TurnReplay]:
    """Ask `target` each question of a saved conversation again, yielding each turn as it is answered.

    Each question is asked with the saved conversation before it (the saved answers,
    not the replayed ones), so a difference in one turn does not carry into the next:
    each turn compares like with like."""
    history = list(history)
    user_positions = [i for i, m in enumerate(history) if m.role == "user"]
    for turn, position in zip(saved_turns(history), user_positions):
        messages = request_messages(system_prompt, history[:position + 1])
        try:
            answer = client.chat(target.model, messages, version=target.version, **sampling)
            message = (answer.get("choices") or [{}])[0].get("message") or {}
            turn.replayed = message.get("content") or ""
            turn.replayed_figures = server_figures(answer.get("timings"))
        except TorchServeError as error:
            turn.error = error.message
        yield turn


def server_figures(timings) -> Figures | None:
    """An answer's speed from the server's timings (a completion's `timings`, or a saved
    answer's details); None without them. A non-streamed answer has nothing measured here."""
    if not isinstance(timings, dict) or not isinstance(timings.get("predicted_per_second"), (int, float)):
        return None
    tokens, ttft = timings.get("predicted_n"), timings.get("ttft_ms")
    return Figures(tokens if isinstance(tokens, int) else None, timings["predicted_per_second"],
                   ttft if isinstance(ttft, (int, float)) else None, SERVER)


def words(text: str) -> list[str]:
    return text.split()


def diff_ops(saved: str, replayed: str) -> list[tuple[str, str]]:
    """A word diff: ("same" | "removed" | "added", text) pieces, in reading order."""
    # Words keep the whitespace after them, so the pieces join back into the texts.
    a, b = re.findall(r"\S+\s*", saved), re.findall(r"\S+\s*", replayed)
    ops = []
    matcher = difflib.SequenceMatcher(None, [w.strip() for w in a], [w.strip() for w in b], autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            ops.append(("same", "".join(b[j1:j2])))
            continue
        if i2 > i1:
            ops.append(("removed", "".join(a[i1:i2])))
        if j2 > j1:
            ops.append(("added", "".join(b[j1:j2])))
    return ops


def diff_html(ops: list[tuple[str, str]]) -> str:
    """The word diff as HTML (every text escaped): removed words struck through in red,
    added ones in green."""
    style = {"removed": "<del style='background:#fdd;color:#900'>{}</del>",
             "added": "<ins style='background:#dfd;color:#060;text-decoration:none'>{}</ins>",
             "same": "{}"}
    body = "".join(style[kind].format(html.escape(text)) for kind, text in ops)
    return f"<div style='white-space:pre-wrap;line-height:1.5'>{body}</div>"
