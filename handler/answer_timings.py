"""The server's own figures for one answer: returned with it as `timings` (llama-server's
names, plus queue_ms and ttft_ms) and observed by the metrics' per-request histograms.

Every time is measured in the worker from the request's arrival at the handler
(GenerationRequest.arrived_at): what came before, TorchServe's own queue and the
frontend's hand-over to the worker, is not in any of them (TorchServe reports its queue
as ts_queue_latency_microseconds)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from llama_engine import Update


@dataclass(frozen=True)
class AnswerTimings:
    prompt_n: int                          # prompt tokens read (the first choice's; the others copy its KV)
    cache_n: int                           # prompt tokens reused from the slot's cache
    prompt_ms: float | None                # its slot starting to its first token: reading the prompt
    prompt_per_second: float | None
    predicted_n: int                       # tokens generated, all choices together
    predicted_ms: float | None             # first token to the last choice's end
    predicted_per_second: float | None
    # Arrival at the handler to the slot starting to read the prompt: templating, tokenizing
    # and waiting for a free slot. Not TorchServe's queue before the handler saw the request.
    queue_ms: float | None
    ttft_ms: float | None                  # arrival at the handler to the first token
    latency_ms: float                      # arrival at the handler to the end (metrics only, not in `timings`)

    def to_json(self) -> dict:
        """The answer's `timings` object."""
        out = asdict(self)
        del out["latency_ms"]
        return out


def answer_timings(finals: list[Update]) -> AnswerTimings | None:
    """The figures of an answer from the finishing update of each of its choices, the first
    choice first; None when the engine gave no times (the request never ran)."""
    first = finals[0]
    times = first.times
    if times is None:
        return None
    ended = max(u.times.finished_at for u in finals if u.times is not None)
    prompt_n = first.prompt_tokens - first.cached_tokens
    predicted_n = sum(u.completion_tokens for u in finals)
    prompt_ms = _ms(times.started_at, times.first_token_at)
    predicted_ms = _ms(times.first_token_at, ended)
    return AnswerTimings(
        prompt_n=prompt_n, cache_n=first.cached_tokens,
        prompt_ms=prompt_ms, prompt_per_second=_per_second(prompt_n, prompt_ms),
        predicted_n=predicted_n, predicted_ms=predicted_ms,
        predicted_per_second=_per_second(predicted_n, predicted_ms),
        queue_ms=_ms(times.arrived_at, times.started_at), ttft_ms=_ms(times.arrived_at, times.first_token_at),
        latency_ms=_ms(times.arrived_at, ended))


def _ms(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round((end - start) * 1000.0, 3)


def _per_second(n: int, ms: float | None) -> float | None:
    # None rather than infinity for a span too short to measure: JSON has no infinity
    return round(n * 1000.0 / ms, 2) if ms else None
