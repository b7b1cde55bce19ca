"""Start, stop and describe the console's TorchServe and the OpenAI gateway beside it: the one
start path that both the console's Start button and `python -m chatstack start` take."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from chatstack.gateway_process import GatewayProcess
from chatstack.model_archive import DEFAULT_ARCHIVE, ensure_default_archive, list_archives
from chatstack.serving_snapshot import snapshot_to_restore, wait_for_restored
from chatstack.torchserve_client import TorchServeError
from chatstack.torchserve_process import StartError, TorchServeProcess

Step = Callable[[str], None]


@dataclass
class ServerStatus:
    running: bool
    pid: int | None = None
    health: str = "not running"       # what /ping said, or why it could not be asked
    version: str | None = None
    uptime_s: float | None = None
    addresses: dict[str, str] = field(default_factory=dict)
    gateway: str = "not running"      # the OpenAI gateway: "running (pid N)" or "not running"


def server_status(process: TorchServeProcess) -> ServerStatus:
    """What the server says about itself now (nothing is remembered between calls)."""
    addresses = {kind: process.address(kind) for kind in ("inference", "management", "metrics")}
    gateway = GatewayProcess(process)
    addresses["OpenAI (gateway)"] = gateway.base_url
    pid = process.pid()
    if pid is None:
        return ServerStatus(running=False, addresses=addresses)
    gateway_pid = gateway.pid()
    if gateway_pid is None:   # the console's address table says so, next to the address
        addresses["OpenAI (gateway)"] += f" (not running; log: {gateway.log_file})"
    status = ServerStatus(running=True, pid=pid, uptime_s=process.uptime_s(), addresses=addresses,
                          gateway=f"running (pid {gateway_pid})" if gateway_pid else "not running")
    client = process.client(timeout=3)
    try:
        status.health = client.ping()
        status.version = client.server_version()
    except TorchServeError as e:
        status.health = f"not answering: {e.message}"
    return status


def start_server(process: TorchServeProcess, register_default: bool = True, on_step: Step = lambda _: None) -> None:
    """Start TorchServe and the OpenAI gateway; with an empty model store, build the default
    archive first, and register the default model when nothing else would be served. Raises
    StartError, ArchiveError or TorchServeError with a plain message. A gateway that cannot start
    (its port taken) is reported as a step and leaves TorchServe running: the gateway is a
    convenience in front of it, and the server page shows it as not running."""
    if process.is_running():
        raise StartError(f"TorchServe is already running (pid {process.pid()})")
    if not list_archives(process.model_store):
        on_step(f"The model store {process.model_store} holds no archive: building {DEFAULT_ARCHIVE} "
                "with package_llama.sh (the first time this downloads the default model)")
        ensure_default_archive(process.model_store)
    on_step("Starting TorchServe")
    # What it served before the stop (TorchServe's snapshot in the run folder) comes back as it was.
    restored = snapshot_to_restore(process.log_dir, process.model_store, on_step)
    process.start(model_snapshot=restored)
    on_step(f"TorchServe is up (pid {process.pid()})")
    wait_for_restored(process.client(timeout=600), restored)
    gateway = GatewayProcess(process)
    try:
        gateway.start()
        on_step(f"OpenAI gateway on {gateway.base_url} (pid {gateway.pid()})")
    except StartError as e:
        on_step(f"The OpenAI gateway did not start: {e.message}")
    if register_default and (process.model_store / DEFAULT_ARCHIVE).exists():
        client = process.client(timeout=600)
        if not client.list_models():
            on_step(f"Registering {DEFAULT_ARCHIVE} with 1 worker(s)")
            on_step(client.register(DEFAULT_ARCHIVE, initial_workers=1, timeout=600))


def stop_server(process: TorchServeProcess) -> str:
    """Stop the OpenAI gateway, then TorchServe (a gateway left behind would stop by itself
    within a second of TorchServe, but not before answering a request with a 502)."""
    GatewayProcess(process).stop()
    return "TorchServe stopped" if process.stop() else "TorchServe was not running"
