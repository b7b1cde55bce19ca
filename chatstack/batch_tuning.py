"""Find the batch size (and worker count) that serves a model best: the console's "tune" action.

For each candidate setting the tuner registers the model's serving archive once more as a
candidate version (package_variant, as the version swap does), waits for its workers, drives
it with the load generator (chatstack.loadgen) at several concurrency levels, and unregisters
it again (deleting its archive copy) before the next, so only one candidate holds memory at a
time. Each level is one row: tokens/s over the level and TTFT p95. The recommendation is the
setting with the most tokens/s at any level whose TTFT p95 stays within the operator's limit;
"apply" is the version swap (model_registry.swap_settings), so chats in flight finish.

Time is bounded: a candidate's loading and each level have a limit (a level's open requests
are closed when it passes), so a run takes at most TunePlan.limit_s; TunePlan.estimate_s is
the expected time with the server's own worker load time.
"""

from __future__ import annotations

import csv
import json
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import psutil

from chatstack.loadgen import LoadSpec, endpoint, run_load, summarize
from chatstack.metric_names import REQUESTS_WAITING, SLOTS_ACTIVE
from chatstack.model_archive import ArchiveError, ModelSettings, package_variant
from chatstack.torchserve_client import TorchServeClient, TorchServeError

BATCH_SIZES = (1, 4, 8, 16, 32)
CONCURRENCY_LEVELS = (1, 2, 4, 8, 16, 32)
MAX_WORKERS = 4             # more workers than this split a machine's cores too thinly to be worth a try
LOAD_ESTIMATE_S = 20.0      # a candidate's loading when the server reports no worker load time
REGISTER_S = 5.0            # registering and unregistering a candidate, beyond its workers' loading
WORKER_LOAD_TIME = "WorkerLoadTime"   # TorchServe's gauge of a worker's model loading, ms
TUNING_FOLDER = "tuning"    # in the console's run folder: one JSON and one CSV per run
VERSION_PREFIX = "tune-"    # candidate versions are named tune-b{batch}-w{workers}

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class Candidate:
    batch_size: int
    workers: int

    @property
    def version(self) -> str:
        return f"{VERSION_PREFIX}b{self.batch_size}-w{self.workers}"

    @property
    def label(self) -> str:
        return f"batch {self.batch_size} × {self.workers} worker{'s' if self.workers > 1 else ''}"


def worker_counts_that_fit(cores: int, free_memory_mb: float, worker_memory_mb: float,
                           most: int = MAX_WORKERS) -> list[int]:
    """1, 2, 4 … workers, as many as the machine holds: each worker needs a core of its own
    (they divide the cores) and its memory (a candidate's workers load next to the serving ones)."""
    fit = min(most, max(1, cores), int(free_memory_mb // worker_memory_mb) if worker_memory_mb > 0 else most)
    counts, n = [], 1
    while n <= max(1, fit):
        counts.append(n)
        n *= 2
    return counts


def worker_counts_here(worker_memory_mb: float) -> list[int]:
    """worker_counts_that_fit on this machine (the console runs beside its TorchServe)."""
    return worker_counts_that_fit(os.cpu_count() or 1, psutil.virtual_memory().available / 2**20, worker_memory_mb)


def load_estimate_s(samples: list[tuple[str, dict[str, str], float]], archive_mb: float) -> float:
    """How long a candidate takes to be ready and gone again: copying its archive (about 200 MB/s),
    the longest worker load TorchServe reported (its WorkerLoadTime gauge, ms; else LOAD_ESTIMATE_S)
    and REGISTER_S for registering and unregistering it."""
    loads = [value / 1000 for name, _, value in samples if name == WORKER_LOAD_TIME]
    return archive_mb / 200 + (max(loads) if loads else LOAD_ESTIMATE_S) + REGISTER_S


def expected_level_s(max_tokens: int, requests_per_stream: int, tokens_per_s: float | None,
                     concurrency: int = 1, slots: int = 1) -> float:
    """A load's expected duration: its chats take the slots in rounds (chats beyond the slots
    wait), each round the answers one after another at the speed one answer got lately (the
    handler's llama_tokens_per_second gauge; 20 tokens/s when unknown), plus a second to start."""
    speed = tokens_per_s if tokens_per_s and tokens_per_s > 0 else 20.0
    rounds = -(-concurrency // max(1, slots))
    return requests_per_stream * rounds * (max_tokens / speed + 1.0)


def candidates(batch_sizes: list[int], worker_counts: list[int]) -> list[Candidate]:
    """Every (batch size, workers) pair, smallest first."""
    if not batch_sizes or not worker_counts:
        raise ValueError("tuning needs at least one batch size and one worker count")
    if any(b < 1 for b in batch_sizes) or any(w < 1 for w in worker_counts):
        raise ValueError("batch sizes and worker counts must be at least 1")
    return [Candidate(b, w) for w in sorted(set(worker_counts)) for b in sorted(set(batch_sizes))]


@dataclass(frozen=True)
class TunePlan:
    model: str
    candidates: tuple[Candidate, ...]
    concurrency: tuple[int, ...]
    max_tokens: int = 64              # per answer: short answers keep a level short
    requests_per_stream: int = 1      # each of a level's streams sends this many requests, one after another
    level_limit_s: float = 30.0       # a level's open requests are closed after this
    load_limit_s: float = 180.0       # a candidate that has no READY workers after this is skipped
    load_estimate_s: float = LOAD_ESTIMATE_S

    def __post_init__(self):
        if not self.candidates or not self.concurrency:
            raise ValueError("tuning needs at least one setting and one concurrency level")
        if any(c < 1 for c in self.concurrency):
            raise ValueError("concurrency levels must be at least 1")
        if self.max_tokens < 1 or self.requests_per_stream < 1 or self.level_limit_s <= 0:
            raise ValueError("max_tokens, requests_per_stream and level_limit_s must be positive")

    @property
    def steps(self) -> int:
        """Progress steps: loading each candidate, then each of its levels."""
        return len(self.candidates) * (1 + len(self.concurrency))

    def estimate_s(self, tokens_per_s: float | None = None) -> float:
        """Expected duration at `tokens_per_s` per answer (expected_level_s): each candidate's
        load, its warm-up and its levels (each at most level_limit_s)."""
        total = 0.0
        for c in self.candidates:
            slots = c.batch_size * c.workers
            levels = [expected_level_s(self.max_tokens, self.requests_per_stream, tokens_per_s, n, slots)
                      for n in self.concurrency]
            warm_up = expected_level_s(WARM_UP_TOKENS, 1, tokens_per_s)
            total += self.load_estimate_s + sum(min(s, self.level_limit_s) for s in [warm_up, *levels])
        return total

    @property
    def limit_s(self) -> float:
        """The longest a run can take: every load, warm-up and level at its limit."""
        return len(self.candidates) * (self.load_limit_s + (1 + len(self.concurrency)) * self.level_limit_s)


@dataclass
class LevelResult:
    """One candidate at one concurrency level: a row of the table and a point of the chart."""
    batch_size: int
    workers: int
    concurrency: int
    requests: int = 0
    ok: int = 0
    errors: int = 0
    tokens_per_s: float | None = None
    ttft_p50_s: float | None = None
    ttft_p95_s: float | None = None
    wall_s: float | None = None
    error: str | None = None          # why the level (or the candidate) has no figures

    @property
    def candidate(self) -> Candidate:
        return Candidate(self.batch_size, self.workers)


@dataclass
class TuneRun:
    model: str
    started: str                      # ISO time (UTC)
    plan: dict
    rows: list[LevelResult] = field(default_factory=list)
    state: str = "running"            # running, done, cancelled, failed
    message: str = ""
    finished: str | None = None
    base_settings: dict = field(default_factory=dict)   # the serving version's settings when the run started

    def as_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "rows"}, "rows": [asdict(r) for r in self.rows]}

    @classmethod
    def from_dict(cls, data: dict) -> "TuneRun":
        rows = [LevelResult(**{f.name: r.get(f.name) for f in fields(LevelResult) if f.name in r})
                for r in data.get("rows", [])]
        return cls(model=data["model"], started=data["started"], plan=data.get("plan", {}), rows=rows,
                   state=data.get("state", "done"), message=data.get("message", ""), finished=data.get("finished"),
                   base_settings=data.get("base_settings", {}))


def recommend(rows: list[LevelResult], ttft_limit_s: float) -> LevelResult | None:
    """The row with the most tokens/s among those without errors whose TTFT p95 is within the
    limit; on a tie the smaller setting (fewer workers, then smaller batch). None when no row is."""
    within = [r for r in rows if r.errors == 0 and r.ok > 0 and r.tokens_per_s is not None
              and r.ttft_p95_s is not None and r.ttft_p95_s <= ttft_limit_s]
    if not within:
        return None
    return max(within, key=lambda r: (round(r.tokens_per_s, 6), -r.workers, -r.batch_size, r.concurrency))


def applied_settings(choice: Candidate, serving: ModelSettings) -> ModelSettings:
    """The serving settings with the chosen batch size and worker count (the rest kept)."""
    return ModelSettings(min_workers=choice.workers, max_workers=choice.workers, batch_size=choice.batch_size,
                         max_batch_delay=serving.max_batch_delay, response_timeout=serving.response_timeout,
                         continuous_batching=serving.continuous_batching)


def chats_in_flight(samples: list[tuple[str, dict[str, str], float]], worker_pids: list[int],
                    pending_requests: int = 0) -> int:
    """Chats the serving workers are answering or holding now, from the handler's gauges (slots
    in use, requests waiting for a slot) and the requests TorchServe still queues. Only the
    given workers count: a dead worker's last gauges linger on /metrics."""
    active, waiting = per_worker_gauge(samples, SLOTS_ACTIVE), per_worker_gauge(samples, REQUESTS_WAITING)
    return pending_requests + sum(active.get(pid, 0) + waiting.get(pid, 0) for pid in worker_pids)


def per_worker_gauge(samples: list[tuple[str, dict[str, str], float]], name: str) -> dict[int, int]:
    """A per-worker gauge (SLOTS_ACTIVE, REQUESTS_WAITING …) by worker pid."""
    return {int(labels["WorkerPid"]): int(value) for metric, labels, value in samples
            if metric == name and labels.get("WorkerPid", "").isdigit()}


# ---- result files ---------------------------------------------------------------------------

def results_folder(run_dir: str | Path) -> Path:
    return Path(run_dir) / TUNING_FOLDER


def _stem(run: TuneRun) -> str:
    stamp = re.sub(r"[^0-9]", "", run.started)[:14]
    return f"{run.model}-{stamp}"


def save_run(run_dir: str | Path, run: TuneRun) -> tuple[Path, Path]:
    """Write the run as JSON (everything) and CSV (the table); returns both paths."""
    folder = results_folder(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = folder / f"{_stem(run)}.json", folder / f"{_stem(run)}.csv"
    partial = json_path.with_suffix(".json.part")
    partial.write_text(json.dumps(run.as_dict(), indent=2))
    partial.rename(json_path)   # a reader never sees half a file
    with csv_path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=[f.name for f in fields(LevelResult)])
        writer.writeheader()
        writer.writerows(asdict(r) for r in run.rows)
    return json_path, csv_path


def latest_run(run_dir: str | Path, model: str) -> TuneRun | None:
    """The newest saved run for a model, or None."""
    folder = results_folder(run_dir)
    paths = sorted(folder.glob(f"{glob_escape(model)}-*.json")) if folder.is_dir() else []
    for path in reversed(paths):
        try:
            run = TuneRun.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            continue   # unreadable: an older one may still be
        if run.model == model:
            return run
    return None


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


# ---- the run --------------------------------------------------------------------------------

LoadRunner = Callable[..., tuple[list, float]]


def run_tuning(client: TorchServeClient, store: str | Path, plan: TunePlan, source_archive: str,
               serving: ModelSettings, *, cancel: threading.Event, on_progress: Progress = lambda f, t: None,
               load: LoadRunner = run_load, run: TuneRun | None = None) -> TuneRun:
    """Measure every candidate of the plan; returns the run (state done, or cancelled when
    `cancel` was set). Candidates are unregistered and their archives deleted as they finish,
    also when the run is cancelled or fails."""
    store = Path(store)
    run = run or new_run(plan, serving)
    step = 0

    def progress(text: str) -> None:
        on_progress(min(1.0, step / plan.steps), text)

    try:
        for candidate in plan.candidates:
            if cancel.is_set():
                break
            progress(f"Loading {plan.model} {candidate.version} ({candidate.label})")
            try:
                _register_candidate(client, store, plan, source_archive, serving, candidate)
            except (TorchServeError, ArchiveError) as e:
                _remove_candidate(client, store, plan.model, candidate)
                message = getattr(e, "message", None) or str(e)
                run.rows.extend(LevelResult(candidate.batch_size, candidate.workers, c, error=message)
                                for c in plan.concurrency)
                step += 1 + len(plan.concurrency)
                continue
            step += 1
            try:
                _warm_up(client, plan, candidate, cancel, load)
                for concurrency in plan.concurrency:
                    if cancel.is_set():
                        break
                    progress(f"{candidate.label}: {concurrency} chat(s) at once")
                    run.rows.append(_measure(client, plan, candidate, concurrency, cancel, load))
                    step += 1
            finally:
                progress(f"Unregistering {plan.model} {candidate.version}")
                _remove_candidate(client, store, plan.model, candidate)
    except Exception as e:  # noqa: BLE001 - the run is saved with its reason, whatever broke it
        run.state, run.message = "failed", f"{type(e).__name__}: {e}"
        raise
    finally:
        run.finished = _now()
        if run.state == "running":
            run.state = "cancelled" if cancel.is_set() else "done"
    on_progress(1.0, "Cancelled" if run.state == "cancelled" else "Done")
    return run


def tune_and_save(client: TorchServeClient, store: str | Path, run_dir: str | Path, plan: TunePlan,
                  source_archive: str, serving: ModelSettings, cancel: threading.Event,
                  on_progress: Progress = lambda f, t: None, load: LoadRunner = run_load) -> TuneRun:
    """run_tuning, with the run saved in the run folder however it ends (done, cancelled, failed)."""
    run = new_run(plan, serving)
    try:
        run_tuning(client, store, plan, source_archive, serving, cancel=cancel, on_progress=on_progress, load=load,
                   run=run)
    finally:
        save_run(run_dir, run)
    return run


def new_run(plan: TunePlan, serving: ModelSettings) -> TuneRun:
    plan_dict = {"candidates": [c.label for c in plan.candidates], "concurrency": list(plan.concurrency),
                 "max_tokens": plan.max_tokens, "requests_per_stream": plan.requests_per_stream,
                 "level_limit_s": plan.level_limit_s, "load_limit_s": plan.load_limit_s}
    return TuneRun(model=plan.model, started=_now(), plan=plan_dict, base_settings=asdict(serving))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _archive_file(model: str, candidate: Candidate) -> str:
    return f"{model}-{candidate.version}.mar"


def _register_candidate(client: TorchServeClient, store: Path, plan: TunePlan, source_archive: str,
                        serving: ModelSettings, candidate: Candidate) -> None:
    _remove_candidate(client, store, plan.model, candidate)   # left over from a run that was killed
    settings = applied_settings(candidate, serving)
    package_variant(store, source_archive, candidate.version, settings, _archive_file(plan.model, candidate))
    client.register(_archive_file(plan.model, candidate), model_name=plan.model, initial_workers=candidate.workers,
                    batch_size=candidate.batch_size, max_batch_delay=serving.max_batch_delay,
                    timeout=plan.load_limit_s)
    client.wait_for_workers(plan.model, candidate.version, count=candidate.workers, timeout=plan.load_limit_s)


def _remove_candidate(client: TorchServeClient, store: Path, model: str, candidate: Candidate) -> None:
    try:
        client.unregister(model, candidate.version)
    except TorchServeError:   # not registered (any more)
        pass
    (store / _archive_file(model, candidate)).unlink(missing_ok=True)


WARM_UP_TOKENS = 4   # the warm-up answer's length: enough to run a decode step


def _warm_up(client: TorchServeClient, plan: TunePlan, candidate: Candidate, cancel: threading.Event,
             load: LoadRunner) -> None:
    """One short answer per worker before measuring: a freshly loaded worker's first answer is
    slow (on this CPU 24 tokens took 16 s against half a second for the next), which would
    count against the candidate at the first load."""
    spec = LoadSpec(url=endpoint(client.inference_url, plan.model, version=candidate.version),
                    concurrency=candidate.workers, max_tokens=WARM_UP_TOKENS, key=client.keys.inference,
                    timeout=plan.level_limit_s)
    deadline = time.monotonic() + plan.level_limit_s
    load(spec, should_stop=lambda: cancel.is_set() or time.monotonic() > deadline)


def _measure(client: TorchServeClient, plan: TunePlan, candidate: Candidate, concurrency: int,
             cancel: threading.Event, load: LoadRunner) -> LevelResult:
    spec = LoadSpec(url=endpoint(client.inference_url, plan.model, version=candidate.version),
                    concurrency=concurrency, requests_per_stream=plan.requests_per_stream,
                    max_tokens=plan.max_tokens, key=client.keys.inference, timeout=plan.level_limit_s)
    deadline = time.monotonic() + plan.level_limit_s
    results, wall = load(spec, should_stop=lambda: cancel.is_set() or time.monotonic() > deadline)
    s = summarize(results, wall)
    row = LevelResult(candidate.batch_size, candidate.workers, concurrency, requests=s["requests"], ok=s["ok"],
                      errors=s["errors"], tokens_per_s=s["tokens_per_s"], ttft_p50_s=s["ttft_p50_s"],
                      ttft_p95_s=s["ttft_p95_s"], wall_s=wall)
    if s["errors"]:
        row.error = "; ".join(dict.fromkeys(e for e in s["first_errors"] if e))
    return row


class TuningJob:
    """A tuning run in a background thread, so a page can show its progress and cancel it."""

    def __init__(self, work: Callable[[threading.Event, Progress], TuneRun]):
        self._work = work
        self.cancel_flag = threading.Event()
        self.fraction, self.text = 0.0, "Starting"
        self.run: TuneRun | None = None
        self.error: str | None = None
        self.thread = threading.Thread(target=self._main, daemon=True, name="batch-tuning")

    def start(self) -> "TuningJob":
        self.thread.start()
        return self

    def _main(self) -> None:
        try:
            self.run = self._work(self.cancel_flag, self._progress)
        except Exception as e:  # noqa: BLE001 - shown on the page instead of lost in a thread
            self.error = getattr(e, "message", None) or f"{type(e).__name__}: {e}"

    def _progress(self, fraction: float, text: str) -> None:
        self.fraction, self.text = fraction, text

    def cancel(self) -> None:
        self.cancel_flag.set()

    @property
    def running(self) -> bool:
        return self.thread.is_alive()
