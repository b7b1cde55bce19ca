"""What every served benchmark here records beside its figures: the commit it ran, and a
model store holding the default archive, built by package_llama.sh as a user would."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def commit() -> str:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def default_model_store(work: Path) -> Path:
    """work/store with the default model's archive (llama.mar) in it."""
    store = work / "store"
    store.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(ROOT / "package_llama.sh"), "--model-store", str(store)], check=True, capture_output=True)
    return store
