"""Start and stop the OpenAI gateway (chatstack/openai_gateway.py) beside a TorchServe.

The gateway's address is `openai_gateway_address` in the server's config.properties (default
DEFAULT_ADDRESS, loopback only). It runs as its own process, with its pid file beside
TorchServe's in the run folder and its log in the run folder's logs/, and it watches
TorchServe's pid: however TorchServe stops, the gateway stops too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from urllib.parse import urlparse

import psutil

from chatstack.torchserve_process import ROOT, StartError, TorchServeProcess, port_in_use

ADDRESS_PROPERTY = "openai_gateway_address"
DEFAULT_ADDRESS = "http://127.0.0.1:8000"
MODULE = "chatstack.openai_gateway"


class GatewayProcess:
    def __init__(self, server: TorchServeProcess, address: str | None = None):
        self.server = server
        self._address = address   # None: the server config's openai_gateway_address
        self._popen: subprocess.Popen | None = None   # kept so that its exit status is collected

    @property
    def address(self) -> str:
        return (self._address or self.server.props.get(ADDRESS_PROPERTY, DEFAULT_ADDRESS)).rstrip("/")

    @property
    def base_url(self) -> str:
        """What an OpenAI SDK takes as base_url."""
        return f"{self.address}/v1"

    @property
    def pid_file(self):
        return self.server.run_dir / "openai_gateway.pid"

    @property
    def log_file(self):
        return self.server.log_dir / "openai_gateway.log"

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        return pid if _is_gateway(pid) else None

    def is_running(self) -> bool:
        return self.pid() is not None

    def start(self, wait_s: float = 30) -> None:
        """Start the gateway for the running TorchServe and wait until it accepts connections.
        Raises StartError with a plain reason."""
        ts_pid = self.server.pid()
        if ts_pid is None:
            raise StartError("the OpenAI gateway needs a running TorchServe")
        if self.is_running():
            raise StartError(f"the OpenAI gateway is already running (pid {self.pid()})")
        url = urlparse(self.address)
        host, port = url.hostname or "127.0.0.1", url.port or 80
        if port_in_use(host, port):
            raise StartError(f"port {port} (OpenAI gateway) is already in use on {host}: set {ADDRESS_PROPERTY} "
                             "in config.properties to another address")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", MODULE, "--listen", self.address,
               "--inference", self.server.address("inference"), "--management", self.server.address("management"),
               "--key-file", str(self.server.key_file), "--torchserve-pid", str(ts_pid)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        with open(self.log_file, "ab") as log:
            popen = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid_file.write_text(str(popen.pid))
        self._popen = popen
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if popen.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise StartError(f"the OpenAI gateway exited during start-up (code {popen.returncode}): "
                                 + " | ".join(self.log_tail(5)))
            if _accepts(host, port):
                return
            time.sleep(0.1)
        self.stop()
        raise StartError(f"the OpenAI gateway did not listen on {self.address} within {wait_s:.0f} s; "
                         f"see {self.log_file}")

    def stop(self, wait_s: float = 10) -> bool:
        """Stop the gateway. Returns False when it was not running."""
        pid = self.pid()
        self.pid_file.unlink(missing_ok=True)
        if pid is None:
            return False
        try:
            proc = psutil.Process(pid)
            proc.send_signal(signal.SIGTERM)
            proc.wait(wait_s)
        except psutil.TimeoutExpired:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
        if self._popen is not None:
            self._popen.wait(timeout=10)
            self._popen = None
        return True

    def log_tail(self, lines: int = 20) -> list[str]:
        try:
            return self.log_file.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return []


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _is_gateway(pid: int) -> bool:
    """The pid file may outlive the gateway, and the pid be someone else's by now."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            try:
                os.waitpid(pid, os.WNOHANG)   # our own child: collect it
            except ChildProcessError:
                pass
            return False
        return MODULE in proc.cmdline()
    except psutil.Error:
        return False
