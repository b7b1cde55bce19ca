"""What the admin console does, without Streamlit: server start/stop, the model
table, the version swap that changes batch settings under load, worker rows,
metrics history and key masking. server_app.py only lays these out.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from chatstack.model_archive import (DEFAULT_ARCHIVE, ArchiveError, ModelSettings, ensure_default_archive,
                                     list_archives, next_version, package_variant)
from chatstack.torchserve_client import ModelNotFound, TorchServeClient, TorchServeError
from chatstack.torchserve_process import ROOT, StartError, TorchServeProcess

Step = Callable[[str], None]


# ---- configuration -----------------------------------------------------------------

@dataclass(frozen=True)
class ConsoleConfig:
    """Where the console's TorchServe lives. Environment variables override the
    defaults so tests (and a second console) can use their own folders and ports:
    CHATSTACK_CONFIG, CHATSTACK_MODEL_STORE, CHATSTACK_RUN_DIR, and
    CHATSTACK_PORTS=INFERENCE,MANAGEMENT,METRICS[,GRPC_INFERENCE,GRPC_MANAGEMENT]
    (ports on 127.0.0.1; TorchServe always opens its two gRPC ports too)."""
    config: Path = ROOT / "config.properties"
    model_store: Path = ROOT / "model_store"
    run_dir: Path = ROOT / ".run"
    overrides: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "ConsoleConfig":
        env = os.environ if env is None else env
        overrides = ()
        ports = env.get("CHATSTACK_PORTS", "").strip()
        if ports:
            numbers = [p.strip() for p in ports.split(",")]
            if len(numbers) not in (3, 5) or not all(p.isdigit() for p in numbers):
                raise ValueError("CHATSTACK_PORTS must be INFERENCE,MANAGEMENT,METRICS[,GRPC_INFERENCE,"
                                 f"GRPC_MANAGEMENT] ports, got {ports!r}")
            overrides = tuple((f"{kind}_address", f"http://127.0.0.1:{port}")
                              for kind, port in zip(("inference", "management", "metrics"), numbers))
            overrides += tuple((f"grpc_{kind}_port", port) for kind, port in zip(("inference", "management"),
                                                                                  numbers[3:]))
        return cls(config=Path(env.get("CHATSTACK_CONFIG", cls.config)),
                   model_store=Path(env.get("CHATSTACK_MODEL_STORE", cls.model_store)),
                   run_dir=Path(env.get("CHATSTACK_RUN_DIR", cls.run_dir)), overrides=overrides)

    def process(self) -> TorchServeProcess:
        return TorchServeProcess(self.config, self.model_store, self.run_dir, overrides=dict(self.overrides))


# ---- server -------------------------------------------------------------------------

@dataclass
class ServerStatus:
    running: bool
    pid: int | None = None
    health: str = "not running"       # what /ping said, or why it could not be asked
    version: str | None = None
    uptime_s: float | None = None
    addresses: dict[str, str] = field(default_factory=dict)


def server_status(process: TorchServeProcess) -> ServerStatus:
    """What the server says about itself now (nothing is remembered between calls)."""
    addresses = {kind: process.address(kind) for kind in ("inference", "management", "metrics")}
    pid = process.pid()
    if pid is None:
        return ServerStatus(running=False, addresses=addresses)
    status = ServerStatus(running=True, pid=pid, uptime_s=process.uptime_s(), addresses=addresses)
    client = process.client(timeout=3)
    try:
        status.health = client.ping()
        status.version = client.server_version()
    except TorchServeError as e:
        status.health = f"not answering: {e.message}"
    return status


def start_server(process: TorchServeProcess, register_default: bool = True, workers: int = 1,
                 on_step: Step = lambda _: None) -> None:
    """Start TorchServe; with an empty model store, build the default archive first, and
    register the default model when nothing else would be served. Raises StartError,
    ArchiveError or TorchServeError with a plain message."""
    if process.is_running():
        raise StartError(f"TorchServe is already running (pid {process.pid()})")
    if not list_archives(process.model_store):
        on_step(f"The model store {process.model_store} holds no archive: building {DEFAULT_ARCHIVE} "
                "with package_llama.sh (the first time this downloads the default model)")
        ensure_default_archive(process.model_store)
    on_step("Starting TorchServe")
    process.start()
    on_step(f"TorchServe is up (pid {process.pid()})")
    if register_default and (process.model_store / DEFAULT_ARCHIVE).exists():
        client = process.client(timeout=600)
        if not client.list_models():
            on_step(f"Registering {DEFAULT_ARCHIVE} with {workers} worker(s)")
            on_step(client.register(DEFAULT_ARCHIVE, initial_workers=workers, timeout=600))


def stop_server(process: TorchServeProcess) -> str:
    return "TorchServe stopped" if process.stop() else "TorchServe was not running"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


# ---- models ------------------------------------------------------------------------

@dataclass
class ModelVersion:
    name: str
    version: str
    is_default: bool
    archive: str
    settings: ModelSettings
    workers: list[dict]
    pending_requests: int
    queue_capacity: int


def registered_models(client: TorchServeClient) -> list[ModelVersion]:
    """Every registered model version, as the server describes it now."""
    result = []
    for model in client.list_models():
        name = model["modelName"]
        try:
            default = client.describe_model(name)[0].get("modelVersion")
            entries = client.describe_model(name, "all")
        except ModelNotFound:  # unregistered between the two calls
            continue
        for entry in entries:
            queue = entry.get("jobQueueStatus", {})
            result.append(ModelVersion(
                name=name, version=str(entry.get("modelVersion")), is_default=entry.get("modelVersion") == default,
                archive=entry.get("modelUrl", ""), settings=ModelSettings.from_description(entry),
                workers=entry.get("workers", []), pending_requests=int(queue.get("pendingRequests", 0)),
                queue_capacity=int(queue.get("remainingCapacity", 0))))
    return result


def register_archive(client: TorchServeClient, store: Path, archive: str, settings: ModelSettings,
                     on_step: Step = lambda _: None) -> str:
    """Register an archive from the store with the chosen settings.

    Workers, batch size and batch delay are registration parameters. Continuous
    batching and the response timeout are read from the archive's own
    model-config.yaml, so when those differ a copy with the chosen values is
    written first (as the same model, version + '-cb' or '-db' and the timeout)."""
    if "://" in archive or "/" in archive:
        raise TorchServeError(f"only archives in the model store can be registered, not {archive!r}")
    info = next((a for a in list_archives(store) if a.file == archive), None)
    if info is None:
        raise ArchiveError(f"{archive} is not in the model store {store}")
    if (info.settings.continuous_batching, info.settings.response_timeout) != \
            (settings.continuous_batching, settings.response_timeout):
        mode = "cb" if settings.continuous_batching else "db"
        version = f"{info.version}-{mode}{settings.response_timeout}"
        target = f"{info.model_name}-v{version}.mar"
        if not (store / target).exists():
            on_step(f"Writing {target}: {archive} with continuousBatching={str(settings.continuous_batching).lower()}"
                    f", responseTimeout={settings.response_timeout}")
            package_variant(store, archive, version, settings, target)
        archive = target
    on_step(f"Registering {archive} with {settings.min_workers} worker(s), batch size {settings.batch_size}, "
            f"batch delay {settings.max_batch_delay} ms")
    status = client.register(archive, initial_workers=settings.min_workers, batch_size=settings.batch_size,
                             max_batch_delay=settings.max_batch_delay, timeout=600)
    on_step(status)
    # minWorkers/maxWorkers in the archive's model-config.yaml win over initial_workers,
    # so the chosen numbers are set afterwards where they differ.
    version = _version_of(client, info.model_name, archive)
    entry = client.describe_model(info.model_name, version)[0]
    if (entry.get("minWorkers"), entry.get("maxWorkers")) != (settings.min_workers, settings.max_workers):
        on_step(f"Scaling to {settings.min_workers}–{settings.max_workers} workers")
        on_step(client.scale(info.model_name, settings.min_workers, settings.max_workers, version=version))
    return status


def _version_of(client: TorchServeClient, name: str, archive: str) -> str | None:
    for entry in client.describe_model(name, "all"):
        if entry.get("modelUrl") == archive:
            return entry.get("modelVersion")
    return None


# ---- tuning while serving --------------------------------------------------------------

def swap_settings(client: TorchServeClient, store: Path, name: str, settings: ModelSettings,
                  on_step: Step = lambda _: None, drain_timeout_s: float = 300) -> str:
    """Change batch size / batch delay / batching mode without dropping chats in flight.

    TorchServe cannot change these on a live model, and unregistering a version
    cuts off its requests ("Worker scaled down"). So: register the settings as a
    new version, wait for its workers, make it the default (new chats go there),
    wait until the old version's workers have finished their chats, then
    unregister the old version. Returns the new version."""
    entries = client.describe_model(name, "all")
    old = client.describe_model(name)[0]
    old_version, source = old["modelVersion"], old.get("modelUrl", "")
    if not (store / source).is_file():
        raise ArchiveError(f"the archive of {name} {old_version} ({source}) is not in the model store {store}")
    version = next_version([e["modelVersion"] for e in entries] + [a.version for a in list_archives(store)
                                                                    if a.model_name == name])
    on_step(f"1/5 Writing {name}-v{version}.mar: {source} with batch size {settings.batch_size}, batch delay "
            f"{settings.max_batch_delay} ms, continuous batching {'on' if settings.continuous_batching else 'off'}")
    archive = package_variant(store, source, version, settings).file
    on_step(f"2/5 Registering {name} {version} with {settings.min_workers} worker(s)")
    try:
        client.register(archive, initial_workers=settings.min_workers, batch_size=settings.batch_size,
                        max_batch_delay=settings.max_batch_delay, timeout=600)
        if settings.max_workers > settings.min_workers:
            client.scale(name, settings.min_workers, settings.max_workers, version=version)
        client.wait_for_workers(name, version, count=settings.min_workers, timeout=600)
    except TorchServeError:
        _forget_version(client, name, version)
        raise
    on_step(f"3/5 {name} {version}: {settings.min_workers} worker(s) READY")
    on_step(client.set_default_version(name, version) or f"4/5 {version} is the default version")
    on_step(f"4/5 New chats go to {name} {version}; waiting for chats in flight on {old_version} to finish")
    old_pids = [w.get("pid") for w in old.get("workers", []) if w.get("pid")]
    drained = wait_until_idle(client, name, old_version, old_pids, timeout_s=drain_timeout_s)
    if not drained:
        on_step(f"{old_version} was still busy after {drain_timeout_s:.0f} s; unregistering it anyway")
    on_step(f"5/5 {client.unregister(name, old_version)}")
    return version


def _forget_version(client: TorchServeClient, name: str, version: str) -> None:
    """Undo a half-done registration, so the server is left as it was."""
    try:
        client.unregister(name, version)
    except TorchServeError:  # never registered: nothing to undo
        pass


def cpu_ticks(pid: int) -> int | None:
    """CPU time a local process has used (user + system, clock ticks)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


def wait_until_idle(client: TorchServeClient, name: str, version: str, worker_pids: list[int],
                    timeout_s: float = 300, window_s: float = 1.0, idle_ticks: int = 5) -> bool:
    """Wait until a model version has no queued requests and its workers stop computing.

    TorchServe does not report requests a worker is running, but a llama worker with
    a chat in flight computes without pause, so a worker whose CPU time stays still
    for two windows has none. Returns False on timeout."""
    deadline = time.monotonic() + timeout_s
    quiet_windows = 0
    before = {pid: cpu_ticks(pid) for pid in worker_pids}
    while time.monotonic() < deadline:
        time.sleep(window_s)
        try:
            pending = client.describe_model(name, version)[0].get("jobQueueStatus", {}).get("pendingRequests", 0)
        except ModelNotFound:
            return True
        after = {pid: cpu_ticks(pid) for pid in worker_pids}
        busy = pending > 0 or any(after[p] is not None and before[p] is not None and after[p] - before[p] > idle_ticks
                                  for p in worker_pids)
        quiet_windows = 0 if busy else quiet_windows + 1
        if quiet_windows >= 2:
            return True
        before = after
    return False


def scale_workers(client: TorchServeClient, name: str, min_workers: int, max_workers: int,
                  version: str | None = None) -> str:
    if min_workers < 0 or max_workers < min_workers:
        raise ValueError(f"workers: need 0 <= min ({min_workers}) <= max ({max_workers})")
    return client.scale(name, min_workers, max_workers, version=version)


# ---- status ---------------------------------------------------------------------------

def rss_mb(pid: int | None) -> float | None:
    """Resident memory of a local process in MB (TorchServe's own memoryUsage is often 0)."""
    if not pid:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def worker_rows(models: list[ModelVersion]) -> list[dict]:
    rows = []
    for m in models:
        for w in m.workers:
            reported = (w.get("memoryUsage") or 0) / 1e6
            memory = rss_mb(w.get("pid")) or (reported or None)
            rows.append({"model": m.name, "version": m.version + (" (default)" if m.is_default else ""),
                         "worker": w.get("id"), "status": w.get("status"), "pid": w.get("pid"),
                         "memory MB": round(memory, 1) if memory else None, "started": w.get("startTime")})
    return rows


def queue_rows(models: list[ModelVersion]) -> list[dict]:
    return [{"model": m.name, "version": m.version, "pending requests": m.pending_requests,
             "free queue places": m.queue_capacity} for m in models]


# ---- metrics ---------------------------------------------------------------------------

LLAMA_COUNTERS = ["llama_tokens_generated", "llama_prompt_tokens_evaluated", "llama_prompt_tokens_reused",
                  "llama_decode_steps", "llama_sequences_decoded", "llama_requests_finished"]
LLAMA_GAUGES = ["llama_slots_active", "llama_slots_free", "llama_time_to_first_token_ms", "llama_tokens_per_second"]
TS_METRICS = ["ts_inference_requests_total", "Requests2XX", "Requests4XX", "Requests5XX", "QueueTime",
              "CPUUtilization", "MemoryUsed", "MemoryUtilization"]


@dataclass
class MetricsSnapshot:
    at: float                              # time.time() when read
    totals: dict[str, float]               # sample values summed over labels
    finished_by_reason: dict[str, float]   # llama_requests_finished by Reason


def snapshot(client: TorchServeClient, at: float | None = None) -> MetricsSnapshot:
    totals: dict[str, float] = {}
    finished: dict[str, float] = {}
    for name, labels, value in client.metric_samples():
        totals[name] = totals.get(name, 0.0) + value
        if name == "llama_requests_finished":
            reason = labels.get("Reason", "?")
            finished[reason] = finished.get(reason, 0.0) + value
    return MetricsSnapshot(at=time.time() if at is None else at, totals=totals, finished_by_reason=finished)


class MetricsHistory:
    """Recent snapshots, and rates derived from counter deltas between them."""

    def __init__(self, keep: int = 180):
        self.keep = keep
        self.snapshots: list[MetricsSnapshot] = []

    def add(self, snap: MetricsSnapshot) -> None:
        # A counter going down means the server restarted: the old history no longer adds up.
        if self.snapshots and any(snap.totals.get(k, 0) < v for k, v in self.snapshots[-1].totals.items()
                                  if k in LLAMA_COUNTERS or k == "ts_inference_requests_total"):
            self.snapshots.clear()
        self.snapshots.append(snap)
        del self.snapshots[:-self.keep]

    def rate(self, name: str) -> float | None:
        """Per-second increase of a counter over the last two snapshots."""
        if len(self.snapshots) < 2:
            return None
        a, b = self.snapshots[-2], self.snapshots[-1]
        return (b.totals.get(name, 0.0) - a.totals.get(name, 0.0)) / (b.at - a.at) if b.at > a.at else None

    def rows(self) -> list[dict]:
        """One row per snapshot: time, generated tokens/s (from counter deltas), gauges."""
        rows = []
        for prev, cur in zip([None] + self.snapshots[:-1], self.snapshots):
            row = {"time": cur.at}
            for gauge in LLAMA_GAUGES:
                row[gauge] = cur.totals.get(gauge)
            if prev is not None and cur.at > prev.at:
                dt = cur.at - prev.at
                row["generated tokens/s"] = (cur.totals.get("llama_tokens_generated", 0.0)
                                             - prev.totals.get("llama_tokens_generated", 0.0)) / dt
                row["prompt tokens/s"] = (cur.totals.get("llama_prompt_tokens_evaluated", 0.0)
                                          - prev.totals.get("llama_prompt_tokens_evaluated", 0.0)) / dt
            else:
                row["generated tokens/s"] = row["prompt tokens/s"] = None
            rows.append(row)
        return rows


def prompt_cache_reuse(totals: dict[str, float]) -> float | None:
    """Share of prompt tokens that came from the cache instead of being evaluated."""
    reused = totals.get("llama_prompt_tokens_reused", 0.0)
    evaluated = totals.get("llama_prompt_tokens_evaluated", 0.0)
    return reused / (reused + evaluated) if reused + evaluated else None


# ---- keys --------------------------------------------------------------------------------

def mask_key(key: str | None) -> str:
    if not key:
        return "(no key yet)"
    return "•" * 8
