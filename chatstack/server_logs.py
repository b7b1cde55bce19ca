"""TorchServe's logs as entries the console can filter: per model and worker, by level and
text, newest first, and every line of one request.

Three files of the run folder's logs/ hold them (log4j2.xml's patterns; worker_failures
reads the same lines): ts_log.log, the Java frontend's own lines; model_log.log, each
worker's output under its thread name W-<port>-<model>_<version>; and access_log.log, one
line per API call with its status (a 4xx is a WARN entry, a 5xx an ERROR, of the model its
path names).
A worker's Python logging prints only the message (TorchServe's format is "%(message)s"),
so its lines all come as INFO; an error shows as a message ("request <id> failed") followed
by a traceback, one line each, or as faulthandler's "Fatal Python error". Such a block is
folded into one ERROR entry. The request id is TorchServe's: the handler logs it, and the
frontend sends it to the client as the x-request-id header, so a client's error leads here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from chatstack.worker_failures import LINE, TAIL_BYTES, WORKER_THREAD

LOG_FILES = {"ts_log.log": "server", "model_log.log": "worker", "access_log.log": "access"}
ACCESS = re.compile(r'^(?P<when>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d,\d{3}) - /?(?P<client>\S+) "(?P<method>[A-Z]+) '
                    r'(?P<path>\S+) [^"]*" (?P<status>\d{3}) (?P<ms>\d+)$')
PREDICTION_PATH = re.compile(r"^/(?:predictions|v1/models)/(?P<model>[^/?]+)(?:/(?P<version>[^/?]+))?")
LEVELS = ("ERROR", "WARN", "INFO", "DEBUG")
REQUEST_ID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
EXCEPTION_LINE = re.compile(r"^\w[\w.]*(Error|Exception|Exit|Interrupt)\b")
ERROR_TEXT = re.compile(r"\bfailed\b|^Backend worker process died|^Fatal Python error|^Traceback \(most recent",
                        re.IGNORECASE)
BLOCK_GAP_S = 2.0   # lines of one traceback are written within this time of each other


@dataclass
class LogEntry:
    when: datetime
    level: str                   # ERROR, WARN, INFO, DEBUG (a worker's error block: ERROR)
    source: str                  # "server" (ts_log.log) or "worker" (model_log.log)
    thread: str
    text: str                    # the message, with a traceback's lines after the first
    model: str | None = None
    version: str | None = None
    worker: str | None = None    # "W-9000": the worker's port, as TorchServe names it
    request_id: str | None = None
    open_block: bool = field(default=False, repr=False)   # a traceback still taking lines

    @property
    def first_line(self) -> str:
        return self.text.split("\n", 1)[0]


def read_entries(log_dir: Path) -> list[LogEntry]:
    """The entries of the run folder's logs (the last TAIL_BYTES of each file), newest first."""
    entries = []
    for name, source in LOG_FILES.items():
        text = _tail(Path(log_dir) / name)
        entries += _parse_access(text) if source == "access" else _parse(text, source)
    # newest first; within one millisecond, the later line first
    order = sorted(range(len(entries)), key=lambda i: (entries[i].when, i), reverse=True)
    return [entries[i] for i in order]


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            start = max(0, f.tell() - TAIL_BYTES)
            f.seek(start)
            data = f.read()
    except OSError:
        return ""
    if start:   # the first line was cut
        data = data.split(b"\n", 1)[-1]
    return data.decode("utf-8", errors="replace")


def _parse(text: str, source: str) -> list[LogEntry]:
    entries: list[LogEntry] = []
    last_of_thread: dict[str, LogEntry] = {}
    for raw in text.splitlines():
        match = LINE.match(raw)
        if not match:   # a message of several lines (the frontend's start-up banner, a Java stack)
            if entries:
                entries[-1].text += "\n" + raw
                _mark_request(entries[-1], raw)
            continue
        when = datetime.strptime(match["when"], "%Y-%m-%dT%H:%M:%S,%f")
        thread, line = match["thread"], match["text"]
        worker_thread = thread.rsplit("-", 1)[0] if thread.endswith(("-stdout", "-stderr")) else thread
        previous = last_of_thread.get(worker_thread)
        if previous and _continues(previous, line, when):
            previous.text += "\n" + line
            previous.level = "ERROR"
            previous.open_block = not EXCEPTION_LINE.match(line)
            _mark_request(previous, line)
            continue
        entry = LogEntry(when, _level(match["level"]), source, worker_thread, line)
        worker = WORKER_THREAD.match(worker_thread)
        if worker:
            entry.model, entry.version, entry.worker = worker["model"], worker["version"], f"W-{worker['port']}"
        if ERROR_TEXT.search(line):
            entry.level = "ERROR"
            entry.open_block = line.startswith(("Traceback", "Fatal Python error"))
        _mark_request(entry, line)
        entries.append(entry)
        last_of_thread[worker_thread] = entry
    return entries


def _parse_access(text: str) -> list[LogEntry]:
    entries = []
    for raw in text.splitlines():
        match = ACCESS.match(raw)
        if not match:
            continue
        status = int(match["status"])
        level = "ERROR" if status >= 500 else "WARN" if status >= 400 else "INFO"
        path = PREDICTION_PATH.match(match["path"])
        entries.append(LogEntry(datetime.strptime(match["when"], "%Y-%m-%dT%H:%M:%S,%f"), level, "access", "access",
                                f"{match['method']} {match['path']} → {status} in {match['ms']} ms "
                                f"(from {match['client']})", model=path["model"] if path else None,
                                version=path["version"] if path else None))
    return entries


def _continues(previous: LogEntry, line: str, when: datetime) -> bool:
    """Whether a worker's line belongs to the error block its previous line began."""
    if (when - previous.when).total_seconds() > BLOCK_GAP_S or previous.level != "ERROR":
        return False
    if line.startswith("Traceback (most recent call last)"):
        return True   # "request <id> failed" is followed by its traceback
    if not previous.open_block:
        return False
    return not line.strip() or line[:1].isspace() or bool(EXCEPTION_LINE.match(line)) or \
        line.startswith(("Current thread", "Thread 0x", "Stack (most recent", "Extension modules", "During handling",
                         "The above exception"))


def _level(level: str) -> str:
    level = level.upper()
    return "WARN" if level == "WARNING" else level if level in LEVELS else "ERROR" if level == "FATAL" else "DEBUG"


def _mark_request(entry: LogEntry, text: str) -> None:
    if entry.request_id is None:
        found = REQUEST_ID.search(text)
        entry.request_id = found.group() if found else None


def filter_entries(entries: list[LogEntry], model: str | None = None, worker: str | None = None,
                   levels: tuple[str, ...] | list[str] = LEVELS, text: str = "") -> list[LogEntry]:
    """The entries of `model` (and `worker`), at one of `levels`, holding `text` (any case)."""
    needle = text.strip().lower()
    return [e for e in entries
            if (model is None or e.model == model) and (worker is None or e.worker == worker)
            and e.level in levels and (not needle or needle in e.text.lower())]


def request_entries(entries: list[LogEntry], request_id: str) -> list[LogEntry]:
    """Every entry that names the request, oldest first: what its log says, traceback included."""
    return sorted((e for e in entries if request_id in e.text), key=lambda e: e.when)


def failed_requests(entries: list[LogEntry]) -> list[LogEntry]:
    """The error entries that name a request, newest first (one per request)."""
    seen, failed = set(), []
    for e in entries:
        if e.level == "ERROR" and e.request_id and e.request_id not in seen:
            seen.add(e.request_id)
            failed.append(e)
    return failed


def workers_of(entries: list[LogEntry]) -> dict[str, list[str]]:
    """Each model seen in the logs with its workers, for the page's choices."""
    found: dict[str, set[str]] = {}
    for e in entries:
        if e.model:
            workers = found.setdefault(e.model, set())
            if e.worker:   # access lines name the model, not a worker
                workers.add(e.worker)
    return {model: sorted(workers) for model, workers in sorted(found.items())}
