"""Whether a chat can start now, and what is wrong when it cannot, in plain words:
server down, key refused, model not registered, workers still loading, or a
worker that died (with its cause and last log lines, read from the logs of this
install's TorchServe)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from chatstack.server_settings import ServerSettings, shown_path
from chatstack.torchserve_client import ModelNotFound, ServerUnreachable, TorchServeClient, TorchServeError, Unauthorized
from chatstack.worker_failures import WorkerFailure, last_worker_failure

READY, DOWN, BAD_KEY, MISSING, LOADING, ERROR = "ready", "down", "bad_key", "missing", "loading", "error"

# TorchServe 0.12 answers a refused token with HTTP 400 and this text, not 401.
TOKEN_REFUSED = "Token Authorization failed"
# A worker death this recent may be why a model has no ready worker now.
RECENT_FAILURE_S = 300


@dataclass
class Health:
    state: str
    message: str
    failure: WorkerFailure | None = None  # the last worker death, when that is why the model cannot answer

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
        where = (f"the current key of this install's TorchServe is in {shown_path(server.local.key_file)}"
                 if server.local else "`python -m chatstack key` prints the current key")
        return Health(BAD_KEY, f"TorchServe refused the inference key ({server.key_source}). Set "
                               "TORCHSERVE_INFERENCE_KEY or TORCHSERVE_KEY_FILE to the current key (keys change "
                               f"when TorchServe restarts; {where}).")
    if isinstance(error, ModelNotFound):
        return Health(MISSING, f"The model \"{model}\" is not registered on TorchServe. "
                               "Register it (admin console or management API) or pick another model.")
    if error.status == 503:
        return Health(LOADING, f"The model \"{model}\" has no worker ready yet: it is still loading "
                               "(or was scaled to zero workers).", worker_failure(server, model, error))
    return Health(ERROR, f"TorchServe could not answer: {error.message}", worker_failure(server, model, error))


def check_health(server: ServerSettings, model: str) -> Health:
    """Ask TorchServe whether a chat with `model` can start now."""
    client = server.client(timeout=5)
    try:
        status = client.ping()
        if status != "Healthy":
            return Health(LOADING, f"TorchServe says it is {status}: workers are still starting.",
                          worker_failure(server, model))
        # Not a chat: a refused one would count as a failed request (Requests4XX) on the
        # server's metrics at every check. The predictions endpoint's description proves key
        # and model; the management API (when its key is here) says whether a worker is ready.
        client.describe_predictions(model)
        if _ready_workers(client, model) == 0:
            return Health(LOADING, f"The model \"{model}\" has no worker ready yet: it is still loading "
                                   "(or was scaled to zero workers)." + _worker_summary(client, model),
                          worker_failure(server, model))
    except TorchServeError as error:
        health = explain(error, server, model)
        if health.state == LOADING:
            health.message += _worker_summary(client, model)
        return health
    return Health(READY, f"The model \"{model}\" is ready.")


def _ready_workers(client: TorchServeClient, model: str) -> int | None:
    """READY workers of the model's default version; None when the management API is out of reach."""
    if not client.keys.management:
        return None
    try:
        entries = client.describe_model(model)
    except TorchServeError:
        return None
    return sum(w.get("status") == "READY" for entry in entries for w in entry.get("workers", []))


def _worker_summary(client: TorchServeClient, model: str) -> str:
    if not client.keys.management:
        return ""
    try:
        workers = [w for entry in client.describe_model(model) for w in entry.get("workers", [])]
    except TorchServeError:
        return ""  # the management API is optional here
    ready = sum(w.get("status") == "READY" for w in workers)
    return f" {ready} of {len(workers)} workers ready."


def worker_failure(server: ServerSettings, model: str, error: TorchServeError | None = None,
                   since: datetime | None = None, wait_s: float = 0.0) -> WorkerFailure | None:
    """Why the model's worker died, when that may be why a call failed: a 5xx ("Worker died."),
    no ready worker (503), or a stream that broke off. Read from the logs of this install's
    TorchServe (other servers' logs are out of reach). Only a death since `since` counts (by
    default the last RECENT_FAILURE_S); `wait_s` gives the dying worker's last words time
    to reach the log."""
    if server.local is None or (error is not None and not _may_be_worker_death(error)):
        return None
    since = since or datetime.now() - timedelta(seconds=RECENT_FAILURE_S)
    deadline = time.monotonic() + wait_s
    while True:
        failure = last_worker_failure(server.local.log_dir, model)
        if failure is not None and failure.when >= since - timedelta(seconds=1):
            return failure
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.5)


def _may_be_worker_death(error: TorchServeError) -> bool:
    if error.status is None:  # no HTTP answer: a broken stream may be a dead worker, nobody listening is not
        return not isinstance(error, ServerUnreachable)
    return error.status >= 500
