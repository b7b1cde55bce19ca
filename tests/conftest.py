"""Shared fixtures: the default model, a model store, and a real TorchServe on free ports."""

from __future__ import annotations

import shutil
import tempfile
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "handler"))  # the handler's modules sit flat in a .mar

from chatstack.torchserve_process import TorchServeProcess, free_port, free_port_overrides  # noqa: E402,F401

DEFAULT_GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def package(*args, store: Path, check=True, **kw) -> subprocess.CompletedProcess:
    """Run package_llama.sh with a model store of the test's own."""
    done = subprocess.run([str(ROOT / "package_llama.sh"), "--model-store", str(store), *map(str, args)],
                          capture_output=True, text=True, **kw)
    if check and done.returncode != 0:
        raise AssertionError(f"package_llama.sh {' '.join(map(str, args))} failed ({done.returncode}):\n"
                             f"{done.stdout}\n{done.stderr}")
    return done


def start_streamlit(script: str, env: dict, log_path: Path) -> tuple[subprocess.Popen, str]:
    """`streamlit run script` headless on 127.0.0.1 and a free port, with `env` as its whole
    environment; returns the process and its URL (ending in /) once it answers its health check."""
    port = free_port()
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "streamlit"), "run", str(ROOT / script), "--server.headless=true",
         f"--server.port={port}", "--server.address=127.0.0.1", "--browser.gatherUsageStats=false",
         "--server.fileWatcherType=none"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()   # the child holds its own copy
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(url + "_stcore/health", timeout=2).ok:
                return process, url
        except requests.ConnectionError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"streamlit run {script} did not start:\n{log_path.read_text()}")
        time.sleep(0.3)


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    if not DEFAULT_GGUF.exists():
        subprocess.run([str(ROOT / "package_llama.sh"), "--model-store", "/tmp/unused-store"], check=True)
    return DEFAULT_GGUF


@pytest.fixture(scope="session")
def session_dir():
    """A private folder for the session's servers. Not pytest's tmp_path_factory:
    pytest deletes all but its last three base folders, and a concurrent pytest
    run would delete a live server's folder from under it."""
    path = Path(tempfile.mkdtemp(prefix="chatstack-tests-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def model_store(session_dir, default_gguf) -> Path:
    """A model store holding llama.mar (the default model, the repo's model-config.yaml)."""
    store = session_dir / "model_store"
    store.mkdir()
    package(store=store)
    return store


def start_server(store: Path, run_dir: Path, register: str | None = "llama.mar", **register_kw) -> TorchServeProcess:
    server = TorchServeProcess(ROOT / "config.properties", store, run_dir, overrides=free_port_overrides())
    server.start()
    if register:
        server.client().register(register, **register_kw)
    return server


@pytest.fixture(scope="session")
def torchserve(session_dir, model_store):
    """A real TorchServe (Java frontend) serving the default model as `llama`."""
    server = start_server(model_store, session_dir / "ts_run")
    yield server
    server.stop()


@pytest.fixture
def client(torchserve):
    return torchserve.client(timeout=120)


@pytest.fixture(scope="module")
def prompter(engine):
    """The chat template of the test module's `engine` (each engine-level module defines its own)."""
    from chat_prompt import ChatPrompter
    return ChatPrompter(engine.metadata.get("tokenizer.chat_template"), engine.bos_text, engine.eos_text,
                        lambda text: engine.tokenize(text, add_special=False, parse_special=True))
