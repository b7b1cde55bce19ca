"""Start and stop a TorchServe with the project's config, and tell the truth about it.

Each server gets a run folder holding its working directory (TorchServe writes
key_file.json there), its logs, its own TMPDIR (TorchServe keeps a pid file in
the temp folder, so two servers need two) and the config actually used.

TorchServe runs with torchserve_fix's agent (issue #16: several workers on a
continuous-batching model stall each other in TorchServe 0.12.0); it refuses to
start when the fix is not built for the installed TorchServe.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import psutil

from chatstack.torchserve_client import ServerUnreachable, TorchServeClient, TorchServeError

ROOT = Path(__file__).resolve().parent.parent
TORCHSERVE_FIX = ROOT / "torchserve_fix" / "build" / "torchserve-fix.jar"


class StartError(TorchServeError):
    """TorchServe could not be started; the message says why in plain words."""


def model_server_jar() -> Path | None:
    """TorchServe's frontend (ts/frontend/model-server.jar) of this Python's torchserve."""
    spec = importlib.util.find_spec("ts")
    return Path(spec.submodule_search_locations[0]) / "frontend" / "model-server.jar" if spec else None


def torchserve_fix_agent(agent: Path | None = None) -> Path:
    """The agent jar of torchserve_fix (default TORCHSERVE_FIX), checked against the installed
    TorchServe's model-server.jar. Raises StartError when it is missing or built for another jar."""
    agent = Path(agent or TORCHSERVE_FIX)
    why = ("without it, chats on a continuous-batching model with more than one worker stall "
           "(TorchServe 0.12.0, issue #16)")
    if not agent.is_file():
        raise StartError(f"the TorchServe fix is not built ({agent} is missing): run torchserve_fix/build.sh "
                         f"(./setup.sh does); {why}")
    try:
        with zipfile.ZipFile(agent) as jar:
            manifest = jar.read("META-INF/MANIFEST.MF").decode().replace("\r\n", "\n").replace("\n ", "")
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise StartError(f"the TorchServe fix {agent} cannot be read ({e}): run torchserve_fix/build.sh") from None
    fields = dict(line.split(": ", 1) for line in manifest.splitlines() if ": " in line)
    expected = fields.get("Model-Server-Jar-SHA256")
    frontend = model_server_jar()
    if frontend is None or not frontend.is_file():
        raise StartError("TorchServe's model-server.jar was not found (pip install -r requirements.txt)")
    with open(frontend, "rb") as f:
        actual = hashlib.file_digest(f, "sha256").hexdigest()
    if actual != expected:
        raise StartError(f"the TorchServe fix {agent} was built for TorchServe {fields.get('TorchServe-Version')}'s "
                         f"model-server.jar, not for {frontend} (sha256 {actual}): install that TorchServe "
                         f"and run torchserve_fix/build.sh; {why}")
    if any(c.isspace() for c in str(agent)):
        raise StartError(f"the TorchServe fix's path {agent} contains a space, which TorchServe's vmargs cannot carry")
    return agent


def parse_properties(text: str) -> dict[str, str]:
    """key=value lines of a Java .properties file such as TorchServe's config (comments: # and !)."""
    props = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def read_properties(path: Path) -> dict[str, str]:
    return parse_properties(Path(path).read_text())


def write_properties(path: Path, props: dict[str, str]) -> None:
    Path(path).write_text("".join(f"{k}={v}\n" for k, v in props.items()))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_overrides() -> dict[str, str]:
    """Config overrides putting every listener on a free loopback port, gRPC included
    (TorchServe always opens its two gRPC ports, so two servers on defaults collide)."""
    overrides = {f"{kind}_address": f"http://127.0.0.1:{free_port()}" for kind in ("inference", "management", "metrics")}
    overrides["grpc_inference_port"] = str(free_port())
    overrides["grpc_management_port"] = str(free_port())
    return overrides


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


class TorchServeProcess:
    def __init__(self, config: str | Path = ROOT / "config.properties", model_store: str | Path = ROOT / "model_store",
                 run_dir: str | Path = ROOT / ".run", overrides: dict[str, str] | None = None,
                 log_config: str | Path | None = ROOT / "log4j2.xml", torchserve_fix: bool = True):
        self.base_config = Path(config)
        # False runs TorchServe's own classes: only to show issue #16 (tests/test_worker_scaling.py).
        self.torchserve_fix = torchserve_fix
        self.log_config = Path(log_config).resolve() if log_config else None
        self.model_store = Path(model_store).resolve()
        self.run_dir = Path(run_dir).resolve()
        self.overrides = dict(overrides or {})
        self.props = {**read_properties(self.base_config), **self.overrides}
        self._popen: subprocess.Popen | None = None

    # ---- where things are ----------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.properties"

    @property
    def key_file(self) -> Path:
        return self.run_dir / "key_file.json"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "torchserve.pid"

    def address(self, kind: str) -> str:
        return self.props.get(f"{kind}_address", {"inference": "http://127.0.0.1:8080",
                                                   "management": "http://127.0.0.1:8081",
                                                   "metrics": "http://127.0.0.1:8082"}[kind])

    def client(self, timeout: float = 10.0) -> TorchServeClient:
        return TorchServeClient(self.address("inference"), self.address("management"), self.address("metrics"),
                                timeout=timeout, key_file=self.key_file)

    # ---- state ---------------------------------------------------------------------------

    def pid(self) -> int | None:
        if self._popen is not None and self._popen.poll() is None:
            return self._popen.pid
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        # The pid file may outlive the server (a crash, a reboot): the pid then is
        # dead, a zombie child of an earlier TorchServeProcess, or someone else's.
        return pid if _is_torchserve(pid) else None

    def is_running(self) -> bool:
        return self.pid() is not None

    def is_healthy(self) -> bool:
        try:
            return self.client(timeout=2).ping() == "Healthy"
        except TorchServeError:
            return False

    def started_at(self) -> float | None:
        """When the running server was started (epoch seconds), else None."""
        try:
            return self.pid_file.stat().st_mtime if self.is_running() else None
        except OSError:
            return None

    def uptime_s(self) -> float | None:
        started = self.started_at()
        return None if started is None else max(0.0, time.time() - started)

    def log_tail(self, lines: int = 50, name: str = "ts_log.log") -> list[str]:
        path = self.log_dir / name
        if not path.exists():
            path = self.run_dir / "torchserve.out"
        if not path.exists():
            return []
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 200_000))
            return f.read().decode("utf-8", errors="replace").splitlines()[-lines:]

    # ---- start / stop -------------------------------------------------------------------

    def start(self, models: str | None = None, wait_s: float = 120, model_snapshot: dict | None = None) -> None:
        """Start TorchServe and wait until it answers /ping. Raises StartError with a plain reason.
        With `model_snapshot` (chatstack.serving_snapshot), TorchServe registers what it names."""
        if self.is_running():
            raise StartError(f"TorchServe is already running (pid {self.pid()})")
        java = shutil.which("java", path=(os.environ.get("JAVA_HOME", "") + "/bin:" if os.environ.get("JAVA_HOME") else "") + os.environ.get("PATH", ""))
        if java is None:
            raise StartError("Java was not found: TorchServe needs a Java 17 runtime "
                             "(Debian/Ubuntu: apt-get install openjdk-17-jre-headless)")
        torchserve = shutil.which("torchserve", path=str(Path(sys.executable).parent) + ":" + os.environ.get("PATH", ""))
        if torchserve is None:
            raise StartError("the torchserve command is not installed (pip install -r requirements.txt)")
        agent = torchserve_fix_agent() if self.torchserve_fix else None
        listeners = [(kind, urlparse(self.address(kind))) for kind in ("inference", "management", "metrics")]
        listeners = [(f"{kind} API", url.hostname or "127.0.0.1", url.port or 80) for kind, url in listeners]
        for kind, default_port in (("inference", 7070), ("management", 7071)):
            listeners.append((f"gRPC {kind} API", self.props.get(f"grpc_{kind}_address", "127.0.0.1"),
                              int(self.props.get(f"grpc_{kind}_port", default_port))))
        for what, host, port in listeners:
            if port_in_use(host, port):
                raise StartError(f"port {port} ({what}) is already in use on {host}: "
                                 "another TorchServe or program is listening there")
        if not self.model_store.is_dir():
            raise StartError(f"the model store {self.model_store} does not exist (run ./package_llama.sh)")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "tmp").mkdir(exist_ok=True)
        props = dict(self.props)
        metrics_config = props.get("metrics_config")
        if metrics_config and not os.path.isabs(metrics_config):
            props["metrics_config"] = str((self.base_config.parent / metrics_config).resolve())
        # Java ignores TMPDIR; workers' unix sockets (.ts.sock.9000, ...) and unpacked archives go to
        # java.io.tmpdir, so two servers sharing /tmp would cross their workers' sockets.
        props["vmargs"] = f"{props.get('vmargs', '')} -Djava.io.tmpdir={self.run_dir / 'tmp'}".strip()
        if agent:
            props["vmargs"] += f" -javaagent:{agent}"  # loads torchserve_fix's ContinuousBatching
        if model_snapshot:  # one line of JSON; a .properties value keeps a backslash only doubled
            props["model_snapshot"] = json.dumps(model_snapshot).replace("\\", "\\\\")
        write_properties(self.config_path, props)
        self.key_file.unlink(missing_ok=True)
        # Config snapshots stay on: TorchServe writes what it serves to logs/config/ at each change,
        # which the console's Start reads back (chatstack.serving_snapshot).
        cmd = [torchserve, "--start", "--foreground", "--ts-config", str(self.config_path),
               "--model-store", str(self.model_store)]
        if self.log_config:
            cmd += ["--log-config", str(self.log_config)]
        if models:
            cmd += ["--models", models]
        # PYTHONFAULTHANDLER: a worker killed by a signal (say, SIGSEGV in llama.cpp) then writes
        # "Fatal Python error" and its stack to model_log.log, which worker_failures.py reports.
        env = {**os.environ, "TMPDIR": str(self.run_dir / "tmp"), "LOG_LOCATION": str(self.log_dir),
               "METRICS_LOCATION": str(self.log_dir), "PYTHONFAULTHANDLER": "1"}
        out = open(self.run_dir / "torchserve.out", "wb")
        self._popen = subprocess.Popen(cmd, cwd=self.run_dir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        self.pid_file.write_text(str(self._popen.pid))
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self._popen.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                tail = "\n".join(self.log_tail(15))
                raise StartError(f"TorchServe exited during start-up (code {self._popen.returncode}). Last log lines:\n{tail}")
            if self.key_file.exists() and self.client().keys.inference:
                try:
                    self.client(timeout=2).ping()
                    return
                except ServerUnreachable:
                    pass
                except TorchServeError:
                    return  # it answers; /ping may say Unhealthy while models load
            time.sleep(0.3)
        self.stop()
        raise StartError(f"TorchServe did not answer within {wait_s:.0f} s; see {self.log_dir}")

    def stop(self, wait_s: float = 30) -> bool:
        """Stop the server and its workers. Returns False when it was not running."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and self._alive(pid):
            time.sleep(0.2)
        if self._alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._popen is not None:
            self._popen.wait(timeout=10)
            self._popen = None
        self.pid_file.unlink(missing_ok=True)
        return True

    @staticmethod
    def _alive(pid: int) -> bool:
        _reap(pid)
        try:
            os.killpg(pid, 0)
        except OSError:
            return False
        # A group whose leader is a zombie may still hold live workers; only the
        # leader's state says nothing when the whole group is gone.
        return _process_state(pid) not in ("Z", None) or _group_has_live_members(pid)


def _reap(pid: int) -> None:
    """Collect the exit status of our own child, so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child: its parent reaps it
        pass


def _is_live(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _process_state(pid: int) -> str | None:
    """"Z" for a zombie, None for no such process, else "live"."""
    try:
        return "live" if _is_live(psutil.Process(pid)) else "Z"
    except psutil.Error:
        return None


def _group_has_live_members(pgid: int) -> bool:
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and _is_live(proc):
                return True
        except (OSError, psutil.Error):
            continue
    return False


def _is_torchserve(pid: int) -> bool:
    _reap(pid)
    try:
        proc = psutil.Process(pid)
        return _is_live(proc) and any(arg.endswith("torchserve") for arg in proc.cmdline())
    except psutil.Error:
        return False


def version() -> str:
    """The installed torchserve package's version (the console asks the running server too)."""
    from importlib.metadata import PackageNotFoundError, version as package_version
    try:
        return package_version("torchserve")
    except PackageNotFoundError:
        return "unknown"

