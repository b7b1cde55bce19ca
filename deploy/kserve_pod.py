"""TorchServe started from a KServe storage layout exactly as the ServingRuntime's container
starts it: the command line, environment and working directory come from
deploy/kserve/servingruntime.yaml, and the pod's paths are mapped to local folders as the
container's mounts would be (/mnt/models -> a folder holding the layout, /tmp and the
working directory -> scratch folders, /opt/llama-chat -> this repo). Each server gets its
own copy of config/ with free ports (two pods have two IP addresses; two servers here need
two sets of ports); the model store is the layout's, shared.

Used by tests/test_kserve_layout.py and bench/bench_pod.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import requests
import yaml

from chatstack.torchserve_client import TorchServeClient
from chatstack.torchserve_process import ROOT, free_port, read_properties

RUNTIME = ROOT / "deploy" / "kserve" / "servingruntime.yaml"
MOUNT = "/mnt/models"


def runtime_container() -> dict:
    runtime = yaml.safe_load(RUNTIME.read_text())
    return runtime["spec"]["containers"][0]


class PodServer:
    """TorchServe started exactly as the ServingRuntime's container starts it."""

    def __init__(self, layout: Path, run_dir: Path):
        self.run_dir = run_dir
        c = runtime_container()
        mnt = run_dir / "mnt-models"
        (mnt / "config").mkdir(parents=True)
        (mnt / "model-store").symlink_to(layout / "model-store")
        shutil.copy(layout / "config" / "metrics.yaml", mnt / "config" / "metrics.yaml")
        home, tmp = run_dir / "home", run_dir / "tmp"
        home.mkdir()
        tmp.mkdir()
        # /opt/llama-chat holds the repo's handler and configs in the image (deploy/Containerfile)
        self.paths = {MOUNT: str(mnt), c["workingDir"]: str(home), "/tmp": str(tmp), "/opt/llama-chat": str(ROOT)}
        # the layout's config, its /mnt/models paths as mounted, its ports made free
        text = (layout / "config" / "config.properties").read_text().replace(MOUNT + "/", str(mnt) + "/")
        for key in ("inference_address", "management_address", "metrics_address"):
            text = re.sub(rf"^({key}=https?://[^:\s]+:)\d+$", rf"\g<1>{free_port()}", text, flags=re.M)
        text = re.sub(r"^grpc_(inference|management)_port=.*\n", "", text, flags=re.M)
        text += f"grpc_inference_port={free_port()}\ngrpc_management_port={free_port()}\n"
        (mnt / "config" / "config.properties").write_text(text)
        self.props = read_properties(mnt / "config" / "config.properties")
        argv = c["command"] + c["args"]
        if argv[0] == "/usr/bin/tini" and not Path("/usr/bin/tini").exists():
            argv = argv[argv.index("--") + 1:]  # the image's PID 1; not TorchServe's behaviour
        self.argv = [self.map(a) for a in argv]
        self.cwd = self.map(c["workingDir"])
        # the image's environment (its virtual environment first on PATH), then the runtime's
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TS_", "LOG_LOCATION", "METRICS_LOCATION"))}
        env["PATH"] = f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '')}"
        env.update({e["name"]: self.map(e["value"]) for e in c.get("env", [])})
        self.env = env
        self.proc: subprocess.Popen | None = None

    def map(self, value: str) -> str:
        """A pod path as this server mounts it (one pass: mapped paths are not mapped again)."""
        pods = "|".join(re.escape(p) for p in sorted(self.paths, key=len, reverse=True))
        return re.sub(rf"(?<![\w/])({pods})(?=/|$)", lambda m: self.paths[m.group(1)], value)

    def url(self, kind: str, host: str | None = None) -> str:
        address = self.props[f"{kind}_address"]
        return re.sub(r"//[^:]+:", f"//{host or '127.0.0.1'}:", address)

    def client(self, timeout: float = 120) -> TorchServeClient:
        return TorchServeClient(self.url("inference"), self.url("management"), self.url("metrics"), timeout=timeout)

    def start(self, wait_s: float = 240) -> "PodServer":
        out = open(self.run_dir / "torchserve.out", "wb")
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"TorchServe exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if requests.get(self.url("inference") + "/ping", timeout=2).json().get("status") == "Healthy":
                    return self
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"TorchServe was not healthy within {wait_s} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        path = self.run_dir / "torchserve.out"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # workers left behind, if any
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self.proc = None
