"""Why a TorchServe worker died, read from the logs of its run folder.

TorchServe 0.12 itself logs little when a worker process dies: its frontend keeps the
exit status to itself, and with the repo's log4j2.xml only a death during a load request
leaves a line in ts_log.log ("Load model failed: llama, error: Worker died."). The
worker's own output, in model_log.log, says the rest:

- a Python exception that ends the worker (during loading) is logged as
  "Backend worker process died." with its traceback, then the worker exits with code 1;
- a fatal signal (SIGSEGV in llama.cpp, SIGABRT, ...) is reported by Python's
  faulthandler when it is on in the worker (PYTHONFAULTHANDLER=1 in TorchServe's
  environment, which its workers inherit): "Fatal Python error: Segmentation fault"
  and the Python stack, which shows whether the worker was loading or serving;
- a worker killed without a word (SIGKILL, e.g. by the out-of-memory killer) shows only
  as the same worker starting again.

Each worker writes its lines under its thread name, W-<port>-<model>_<version>.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

LAST_LINES = 20
TAIL_BYTES = 2_000_000   # how much of the end of each log is read

# faulthandler's names of the fatal signals it reports
FATAL_SIGNALS = {"Segmentation fault": signal.SIGSEGV, "Aborted": signal.SIGABRT, "Bus error": signal.SIGBUS,
                 "Floating point exception": signal.SIGFPE, "Illegal instruction": signal.SIGILL}

LINE = re.compile(r"^(?P<when>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d,\d{3}) \[\s*(?P<level>\w+)\s*\] (?P<thread>\S+) (?P<logger>\S+) - "
                  r"(?P<text>.*)$")
WORKER_THREAD = re.compile(r"^W-(?P<port>\d+)-(?P<model>.+)_(?P<version>[^_]+?)(?:-(?:stdout|stderr))?$")
SERVER_START = "Initialize Inference server with"
LOAD_FAILED = re.compile(r"Load model failed: (?P<model>\S+), error: Worker died\.")


@dataclass
class WorkerFailure:
    model: str
    when: datetime                 # the time of the first line that tells of the death
    cause: str                     # "killed by signal 11 (SIGSEGV)", "exited with code 1: ValueError: ..."
    phase: str | None = None       # "loading" or "serving" when the logs tell
    last_lines: list[str] = field(default_factory=list)   # the worker's last lines, "HH:MM:SS text"

    def summary(self) -> str:
        during = f" while {self.phase}" if self.phase else ""
        return f"A worker of {self.model} died{during} at {self.when:%H:%M:%S}: {self.cause}"


@dataclass
class _Line:
    when: datetime
    thread: str
    text: str

    def short(self) -> str:
        return f"{self.when:%H:%M:%S} {self.text}"


def last_worker_failure(log_dir: Path, model: str | None = None) -> WorkerFailure | None:
    """The last worker death of the server's current run (of `model`, when given), or None."""
    log_dir = Path(log_dir)
    server_lines = _read(log_dir / "ts_log.log")
    starts = [line.when for line in server_lines if SERVER_START in line.text]
    since = starts[-1] if starts else datetime.min
    model_lines = [line for line in _read(log_dir / "model_log.log") if line.when >= since]
    failures = _failures_in_worker_output(model_lines)
    failures += _deaths_while_loading(server_lines, since, failures)
    failures = [f for f in failures if model is None or f.model == model]
    return max(failures, key=lambda f: f.when, default=None)


def _read(path: Path) -> list[_Line]:
    """The log's timestamped lines, each continuation line folded into its own line."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - TAIL_BYTES))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = []
    for raw in text.splitlines():
        match = LINE.match(raw)
        if match:
            when = datetime.strptime(match["when"], "%Y-%m-%dT%H:%M:%S,%f")
            lines.append(_Line(when, match["thread"], match["text"]))
    return lines


def _failures_in_worker_output(lines: list[_Line]) -> list[WorkerFailure]:
    """Deaths the workers' own output tells of, per worker process."""
    failures = []
    for thread, runs in _worker_processes(lines).items():
        model = WORKER_THREAD.match(thread)["model"]
        for i, run in enumerate(runs):
            restarted = i + 1 < len(runs)
            failure = _failure_of(model, run) or (_silent_death(model, run, runs[i + 1]) if restarted else None)
            if failure:
                failures.append(failure)
    return failures


def _worker_processes(lines: list[_Line]) -> dict[str, list[list[_Line]]]:
    """Each worker's lines, split where a new process of it starts ("[PID]..." comes first but one)."""
    workers: dict[str, list[list[_Line]]] = {}
    for line in lines:
        thread = line.thread.rsplit("-", 1)[0] if line.thread.endswith(("-stdout", "-stderr")) else line.thread
        if not WORKER_THREAD.match(thread):
            continue
        runs = workers.setdefault(thread, [[]])
        if line.text.startswith("s_name_part0=") and runs[-1]:
            runs.append([])
        runs[-1].append(line)
    return workers


def _failure_of(model: str, run: list[_Line]) -> WorkerFailure | None:
    for i, line in enumerate(run):
        fatal = re.match(r"Fatal Python error: (?P<name>[^:]+)", line.text)
        if fatal and fatal["name"].strip() in FATAL_SIGNALS:
            sig = FATAL_SIGNALS[fatal["name"].strip()]
            cause = f"killed by signal {int(sig)} ({sig.name})"
        elif line.text == "Backend worker process died.":
            error = next((later.text.strip() for later in reversed(run[i + 1:])
                          if re.match(r"\w[\w.]*(Error|Exception|Exit|Interrupt)\b", later.text.strip())), None)
            cause = "exited with code 1" + (f": {error}" if error else "")
        else:
            continue
        stack = " ".join(later.text for later in run[i:])
        phase = "loading" if re.search(r"\bin (load_model|initialize)\b|\bload_model\(|\.initialize\(", stack) \
            else "serving"
        # what the worker said last before the death, then the death's own first lines
        shown = run[max(0, i - LAST_LINES // 2):i] + run[i:][:LAST_LINES // 2]
        return WorkerFailure(model, line.when, cause, phase, [ln.short() for ln in shown])
    return None


def _silent_death(model: str, run: list[_Line], next_run: list[_Line]) -> WorkerFailure:
    """A worker process that ended without a word and was started again."""
    return WorkerFailure(model, next_run[0].when, "ended without a message (killed by SIGKILL, e.g. out of memory, "
                         "or a crash while faulthandler was off)", None, [ln.short() for ln in run[-LAST_LINES:]])


def _deaths_while_loading(server_lines: list[_Line], since: datetime,
                          known: list[WorkerFailure]) -> list[WorkerFailure]:
    """Load requests that failed with "Worker died." that the worker's output does not explain."""
    deaths = []
    for line in server_lines:
        died = LOAD_FAILED.search(line.text)
        if not died or line.when < since:
            continue
        explained = [f for f in known if f.model == died["model"] and abs((line.when - f.when).total_seconds()) < 30]
        for failure in explained:
            failure.phase = "loading"
        if not explained:
            deaths.append(WorkerFailure(died["model"], line.when, "died without a message", "loading",
                                        [line.text]))
    return deaths
