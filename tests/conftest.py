"""Shared fixtures: the default model, a model store, and a real TorchServe on free ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "handler"))  # the handler's modules sit flat in a .mar

from chatstack.torchserve_process import TorchServeProcess  # noqa: E402

DEFAULT_GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_overrides() -> dict[str, str]:
    return {f"{kind}_address": f"http://127.0.0.1:{free_port()}" for kind in ("inference", "management", "metrics")}


def package(*args, store: Path, check=True, **kw) -> subprocess.CompletedProcess:
    """Run package_llama.sh with a model store of the test's own."""
    return subprocess.run([str(ROOT / "package_llama.sh"), "--model-store", str(store), *map(str, args)],
                          capture_output=True, text=True, check=check, **kw)


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    if not DEFAULT_GGUF.exists():
        subprocess.run([str(ROOT / "package_llama.sh"), "--model-store", "/tmp/unused-store"], check=True)
    return DEFAULT_GGUF


@pytest.fixture(scope="session")
def model_store(tmp_path_factory, default_gguf) -> Path:
    """A model store holding llama.mar (the default model, the repo's model-config.yaml)."""
    store = tmp_path_factory.mktemp("model_store")
    package(store=store)
    return store


def start_server(store: Path, run_dir: Path, register: str | None = "llama.mar", **register_kw) -> TorchServeProcess:
    server = TorchServeProcess(ROOT / "config.properties", store, run_dir, overrides=free_port_overrides())
    server.start()
    if register:
        server.client().register(register, **register_kw)
    return server


@pytest.fixture(scope="session")
def torchserve(tmp_path_factory, model_store):
    """A real TorchServe (Java frontend) serving the default model as `llama`."""
    server = start_server(model_store, tmp_path_factory.mktemp("ts_run"))
    yield server
    server.stop()


@pytest.fixture
def client(torchserve):
    return torchserve.client(timeout=120)
