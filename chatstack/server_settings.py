"""Where the chat client's TorchServe is, and which keys it takes.

Each setting comes from an environment variable, else a Streamlit secret of the
same name, else the TorchServe this install started (the admin console or
`python -m chatstack start`): its run folder (.run/ unless CHATSTACK_RUN_DIR says
otherwise) holds the config.properties it was started with and its key_file.json.
So the two apps of one install find each other without any configuration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit, urlunsplit

from chatstack.console_config import ConsoleConfig
from chatstack.torchserve_client import (DEFAULT_INFERENCE_URL, DEFAULT_MANAGEMENT_URL, Keys, TorchServeClient,
                                         TorchServeError)
from chatstack.torchserve_process import ROOT, TorchServeProcess, read_properties

DEFAULT_MODEL = "llama"
# How long an answer waits for a model whose workers are still loading.
DEFAULT_WAIT_FOR_MODEL_S = 120.0


@dataclass(frozen=True)
class LocalServer:
    """The TorchServe of this install, as its run folder describes it (running or not)."""

    run_dir: Path
    key_file: Path     # where TorchServeProcess keeps them in that folder
    log_dir: Path
    inference_url: str
    management_url: str

    @classmethod
    def find(cls, env: Mapping[str, str] | None = None) -> "LocalServer":
        """The console's run folder, and the addresses of the config TorchServe was started with
        there (else of the config the console would start it with)."""
        env = os.environ if env is None else env
        try:
            console = ConsoleConfig.from_env(dict(env))
        except ValueError:  # a malformed CHATSTACK_PORTS is the console's to report
            console = ConsoleConfig.from_env({k: v for k, v in env.items() if k != "CHATSTACK_PORTS"})
        process: TorchServeProcess = console.process()
        try:
            started = read_properties(process.config_path)
        except OSError:  # never started there
            started = {}

        def address(kind: str) -> str:
            return _local_address(started.get(f"{kind}_address") or process.address(kind))

        return cls(process.run_dir, process.key_file, process.log_dir, address("inference"), address("management"))


def _local_address(url: str) -> str:
    """An address to connect to: a server listening on every interface is reached on loopback."""
    parts = urlsplit(url)
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(parts.hostname or "", None)
    if host is None:
        return url.rstrip("/")
    return urlunsplit(parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host)).rstrip("/")


def shown_path(path: Path) -> str:
    """A path as the user knows it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class ServerSettings:
    """How to reach TorchServe, and where that came from (for the page to say)."""

    inference_url: str = DEFAULT_INFERENCE_URL
    management_url: str = DEFAULT_MANAGEMENT_URL
    inference_key: str | None = None
    management_key: str | None = None
    default_model: str = DEFAULT_MODEL
    wait_for_model_s: float = DEFAULT_WAIT_FOR_MODEL_S
    key_source: str = "no key"
    local: LocalServer | None = None  # when the server is this install's TorchServe: its run folder

    @classmethod
    def from_sources(cls, env: Mapping[str, str] | None = None,
                     secrets: Mapping[str, object] | None = None) -> "ServerSettings":
        env = os.environ if env is None else env
        secrets = secrets or {}

        def setting(name: str) -> tuple[str | None, str]:
            """The value of a setting and where it came from."""
            if env.get(name):
                return env[name], name
            if secrets.get(name) not in (None, ""):
                return str(secrets[name]), f"{name} in secrets"
            return None, ""

        local = LocalServer.find(env)
        inference_url = setting("TORCHSERVE_URL")[0] or local.inference_url
        management_url = setting("TORCHSERVE_MANAGEMENT_URL")[0] or local.management_url
        is_local = inference_url.rstrip("/") == local.inference_url

        # Keys: explicit ones win over a key file; this install's key file only goes to its own server.
        key_file, key_file_source = setting("TORCHSERVE_KEY_FILE")
        if key_file:
            key_file = Path(key_file).expanduser()
            key_file_source = f"{shown_path(key_file)} ({key_file_source})"
        elif is_local:
            key_file, key_file_source = local.key_file, shown_path(local.key_file)
        file_keys = Keys()
        if key_file:
            try:
                file_keys = Keys.from_key_file(key_file)
            except (OSError, ValueError):
                pass  # missing or half-written: the health check will say the key is refused
        inference_key, key_source = setting("TORCHSERVE_INFERENCE_KEY")
        if not inference_key and file_keys.inference:
            inference_key, key_source = file_keys.inference, key_file_source
        wait_s = setting("CHAT_WAIT_FOR_MODEL_S")[0]
        return cls(
            inference_url=inference_url,
            management_url=management_url,
            inference_key=inference_key,
            management_key=setting("TORCHSERVE_MANAGEMENT_KEY")[0] or file_keys.management,
            default_model=setting("TORCHSERVE_MODEL")[0] or DEFAULT_MODEL,
            wait_for_model_s=float(wait_s) if wait_s else DEFAULT_WAIT_FOR_MODEL_S,
            key_source=f"key from {key_source}" if inference_key else "no key",
            local=local if is_local else None,
        )

    def describe(self) -> str:
        """Which server and which key, in one line: 'Server http://127.0.0.1:8080 · key from .run/key_file.json'."""
        return f"Server {self.inference_url} · {self.key_source}"

    def client(self, timeout: float = 10.0) -> TorchServeClient:
        return TorchServeClient(self.inference_url, self.management_url,
                                keys=Keys(inference=self.inference_key, management=self.management_key),
                                timeout=timeout)


def available_models(server: ServerSettings) -> list[str]:
    """The server's registered models (needs the management API and its key),
    else just the configured model."""
    if server.management_key:
        try:
            names = sorted(m["modelName"] for m in server.client(timeout=3).list_models())
        except (TorchServeError, KeyError):
            names = []
        if names:
            # Keep the configured model first: it is the default choice.
            return sorted(names, key=lambda name: name != server.default_model)
    return [server.default_model]
