"""Keep an Engine decoding between handler calls.

With continuous batching TorchServe calls the handler, waits for its answers, sends them on and
calls again; each call runs the engine for a step budget. Between two calls the engine used to
stand still for the whole round trip: frontend to worker and back, a few milliseconds in every
budget (5-8% of the worker's wall time on a 2-core CPU, up to a fifth of a GPU step at 32 chats,
docs/gpu.md). Here a thread of its own steps the engine whenever it has work, and a handler call
only takes the updates gathered since the last one: the decode goes on while TorchServe carries
the answers.

The engine is not thread-safe, so its steps and the calls that change it (submit, clear_cache,
close) never overlap: a caller waits for the step in progress and holds the next one back until it
is done. Cancelling is safe from any thread already (Engine.cancel).
"""

from __future__ import annotations

import contextlib
import threading
import time

from llama_engine import Engine, GenerationRequest, RequestHandle, Update


class DecodingThread:
    """An Engine stepped by a thread of its own; `run` returns the updates since the last call.

    Everything else (tokenize, stats, n_ctx_seq, ...) is the engine's own."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._cond = threading.Condition()
        self._pending: dict[str, Update] = {}   # updates no caller has taken yet
        self._steps = 0                          # steps done: a call waits for at least one
        self._stepping = False
        self._callers = 0                        # callers waiting to change the engine
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="decoding", daemon=True)
        self._thread.start()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    # ---- what the handler calls ----------------------------------------------------------

    def submit(self, request_id: str, request: GenerationRequest) -> RequestHandle:
        with self._exclusive():
            return self.engine.submit(request_id, request)

    def clear_cache(self) -> None:
        with self._exclusive():
            self.engine.clear_cache()

    def is_busy(self) -> bool:
        """Requests in the engine, or updates of finished ones not yet taken."""
        with self._cond:
            return self.engine.is_busy() or bool(self._pending)

    def run(self, budget_s: float = 0.0) -> dict[str, Update]:
        """As Engine.run: after at least one step, the updates once the budget is spent, a
        request finished or got its first token, or the engine ran out of work; but the steps
        include those made since the last call."""
        deadline = time.monotonic() + budget_s
        with self._cond:
            first_step = self._steps + 1
            while True:
                if self._error is not None:
                    error, self._error = self._error, None
                    self._cond.notify_all()   # the thread waits for the error to be seen
                    raise error
                stepped = self._steps >= first_step
                idle = not self.engine.is_busy()
                news = any(u.finished or u.first_token for u in self._pending.values())
                if (stepped or self._pending) and (news or idle or time.monotonic() >= deadline) \
                        or (idle and not self._stepping):
                    updates, self._pending = self._pending, {}
                    return updates
                left = deadline - time.monotonic()
                self._cond.wait(left if left > 0 else None)   # past the deadline: for the first step

    def stop(self) -> None:
        """Stop the thread after its step in progress; the engine stays open (and idle)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def close(self) -> None:
        self.stop()
        self.engine.close()

    # ---- the thread ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self):
        with self._cond:
            self._callers += 1
            while self._stepping:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._callers -= 1
                self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                # after an error, wait until a caller has seen it: a broken engine must not spin
                while not self._closed and (self._callers or self._error is not None or not self.engine.is_busy()):
                    self._cond.wait()
                if self._closed:
                    return
                self._stepping = True
            try:
                updates, error = self.engine.step(), None
            except Exception as e:   # handed to the next run(), as Engine.run would have raised it
                updates, error = {}, e
            with self._cond:
                self._stepping = False
                self._steps += 1
                self._error = error
                for rid, upd in updates.items():
                    self._pending[rid] = self._pending[rid].merge(upd) if rid in self._pending else upd
                self._cond.notify_all()
