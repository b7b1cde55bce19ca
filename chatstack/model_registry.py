"""The models TorchServe serves: what is registered, registering an archive with chosen
settings, scaling, and the version swap that changes batch settings without dropping chats."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from chatstack.model_archive import ArchiveError, ModelSettings, list_archives, next_version, package_variant
from chatstack.process_stats import cpu_seconds
from chatstack.torchserve_client import ModelNotFound, TorchServeClient, TorchServeError

Step = Callable[[str], None]

DRAIN_TIMEOUT_S = 300   # how long a swap waits for the old version's chats before unregistering it anyway
IDLE_WINDOW_S = 1.0     # a worker using less CPU than IDLE_CPU_S in a window of this length is idle
IDLE_CPU_S = 0.05


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


def scale_workers(client: TorchServeClient, name: str, min_workers: int, max_workers: int,
                  version: str | None = None) -> str:
    if min_workers < 0 or max_workers < min_workers:
        raise ValueError(f"workers: need 0 <= min ({min_workers}) <= max ({max_workers})")
    return client.scale(name, min_workers, max_workers, version=version)


def swap_settings(client: TorchServeClient, store: Path, name: str, settings: ModelSettings,
                  on_step: Step = lambda _: None) -> str:
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
    if not wait_until_idle(client, name, old_version, old_pids, timeout_s=DRAIN_TIMEOUT_S):
        on_step(f"{old_version} was still busy after {DRAIN_TIMEOUT_S} s; unregistering it anyway")
    on_step(f"5/5 {client.unregister(name, old_version)}")
    for removed in remove_unused_copies(client, store):
        on_step(f"Deleted {removed}: a copy no registered version uses")
    return version


def remove_unused_copies(client: TorchServeClient, store: Path) -> list[str]:
    """Delete the archive copies package_variant made (for a swap or other batch settings) that
    no registered version uses any more; original archives stay. Returns the files deleted."""
    in_use = {m.archive for m in registered_models(client)}
    removed = []
    for info in list_archives(store):
        if info.is_copy and info.file not in in_use:
            (Path(store) / info.file).unlink(missing_ok=True)
            removed.append(info.file)
    return removed


def _forget_version(client: TorchServeClient, name: str, version: str) -> None:
    """Undo a half-done registration, so the server is left as it was."""
    try:
        client.unregister(name, version)
    except TorchServeError:  # never registered: nothing to undo
        pass


def wait_until_idle(client: TorchServeClient, name: str, version: str, worker_pids: list[int],
                    timeout_s: float) -> bool:
    """Wait until a model version has no queued requests and its workers stop computing.

    TorchServe does not report requests a worker is running, but a llama worker with
    a chat in flight computes without pause, so a worker whose CPU time stays still
    for two windows has none. Returns False on timeout."""
    deadline = time.monotonic() + timeout_s
    quiet_windows = 0
    before = {pid: cpu_seconds(pid) for pid in worker_pids}
    while time.monotonic() < deadline:
        time.sleep(IDLE_WINDOW_S)
        try:
            pending = client.describe_model(name, version)[0].get("jobQueueStatus", {}).get("pendingRequests", 0)
        except ModelNotFound:
            return True
        after = {pid: cpu_seconds(pid) for pid in worker_pids}
        busy = pending > 0 or any(after[p] is not None and before[p] is not None and after[p] - before[p] > IDLE_CPU_S
                                  for p in worker_pids)
        quiet_windows = 0 if busy else quiet_windows + 1
        if quiet_windows >= 2:
            return True
        before = after
    return False
