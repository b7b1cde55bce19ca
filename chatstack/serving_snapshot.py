"""What TorchServe was serving, so that Start brings it back: TorchServe's own config snapshots.

TorchServe writes a snapshot of what it serves (every model version with its archive,
minWorkers, maxWorkers, batchSize, maxBatchDelay, responseTimeout and default version) to
LOG_LOCATION/config/<timestamp>-{startup,snapshot,shutdown}.cfg after start-up and after
every management call that changes it, whoever made the call (the console, curl, the
tuner). It reads one back when its config has a `model_snapshot` property. The console
passes it the last snapshot of its run folder, with the versions whose archive is gone from
the model store left out (TorchServe would refuse to start over a missing archive).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

KEEP_SNAPSHOTS = 20   # older snapshot files are deleted at start; the newest is all that is read
SNAPSHOT_FILE = re.compile(r"^\d{17}-(startup|snapshot|shutdown)\.cfg$")


@dataclass(frozen=True)
class ServedVersion:
    model: str
    version: str
    archive: str
    is_default: bool
    min_workers: int
    max_workers: int
    batch_size: int


def snapshot_dir(log_dir: Path) -> Path:
    return Path(log_dir) / "config"


def snapshot_files(log_dir: Path) -> list[Path]:
    """The snapshot files, oldest first (their names begin with a yyyyMMddHHmmssSSS time)."""
    folder = snapshot_dir(log_dir)
    return sorted(p for p in folder.iterdir() if SNAPSHOT_FILE.match(p.name)) if folder.is_dir() else []


def java_property(text: str, key: str) -> str | None:
    """The value of `key` in a Java .properties text, its escapes undone (TorchServe writes the
    snapshot's JSON on one line, with \\n, \\: and \\= escapes)."""
    for line in text.splitlines():
        if line.startswith(f"{key}="):
            value = line[len(key) + 1:]
            return re.sub(r"\\(u[0-9a-fA-F]{4}|.)", _unescape, value)
    return None


def _unescape(match: re.Match) -> str:
    code = match.group(1)
    if code.startswith("u") and len(code) == 5:
        return chr(int(code[1:], 16))
    return {"n": "\n", "t": "\t", "r": "\r", "f": "\f"}.get(code, code)


def last_snapshot(log_dir: Path) -> dict | None:
    """The model snapshot TorchServe wrote last in this run folder, as JSON; None when none."""
    for path in reversed(snapshot_files(log_dir)):
        try:
            value = java_property(path.read_text(), "model_snapshot")
            return json.loads(value) if value else None
        except (OSError, ValueError):
            continue   # a snapshot cut short by a crash: the one before it
    return None


def restorable(snapshot: dict | None, store: Path) -> tuple[dict | None, list[str]]:
    """The snapshot without the versions whose archive is not in the store, and what was left
    out ("llama 2.0 (llama-v2.0.mar is not in the model store)"). None when nothing is left."""
    if not snapshot:
        return None, []
    left_out, models = [], {}
    for name, versions in snapshot.get("models", {}).items():
        kept = {}
        for version, entry in versions.items():
            if (Path(store) / entry.get("marName", "")).is_file():
                kept[version] = entry
            else:
                left_out.append(f"{name} {version} ({entry.get('marName')} is not in the model store)")
        if kept:
            if not any(e.get("defaultVersion") for e in kept.values()):
                kept[max(kept)]["defaultVersion"] = True   # its default was left out
            models[name] = kept
    if not models:
        return None, left_out
    return {**snapshot, "models": models, "modelCount": sum(len(v) for v in models.values())}, left_out


def served_versions(snapshot: dict | None) -> list[ServedVersion]:
    return [ServedVersion(name, version, e.get("marName", ""), bool(e.get("defaultVersion")),
                          int(e.get("minWorkers", 1)), int(e.get("maxWorkers", 1)), int(e.get("batchSize", 1)))
            for name, versions in (snapshot or {}).get("models", {}).items() for version, e in versions.items()]


def prune_snapshots(log_dir: Path, keep: int = KEEP_SNAPSHOTS) -> None:
    """Delete all but the newest `keep` snapshot files (TorchServe writes one per change)."""
    for path in snapshot_files(log_dir)[:-keep]:
        path.unlink(missing_ok=True)


def snapshot_to_restore(log_dir: Path, store: Path, on_step: Callable[[str], None] = lambda _: None) -> dict | None:
    """The snapshot Start should pass to TorchServe (None: nothing to restore), saying what it
    brings back and what it cannot."""
    snapshot, left_out = restorable(last_snapshot(log_dir), store)
    for what in left_out:
        on_step(f"Not restored: {what}")
    if snapshot:
        on_step("Restoring what was served before the stop: " + "; ".join(
            f"{v.model} {v.version}{' (default)' if v.is_default else ''} from {v.archive}, "
            f"{v.min_workers}–{v.max_workers} worker(s), batch size {v.batch_size}" for v in served_versions(snapshot)))
    prune_snapshots(log_dir)
    return snapshot


def wait_for_restored(client, snapshot: dict | None, timeout_s: float = 600) -> None:
    """Wait until every restored version has its minimum of READY workers (TorchServe loads
    them after it answers), so Start returns a server that can chat, as a registration does."""
    for v in served_versions(snapshot):
        if v.min_workers:
            client.wait_for_workers(v.model, v.version, count=v.min_workers, timeout=timeout_s)
