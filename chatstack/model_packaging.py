"""Adding a model from the console: the files it may package, the checks made before
packaging, and package_llama.sh run with the chosen settings, its log read line by line.

One implementation, two front doors: the console runs package_llama.sh, the same command an
operator types, rather than a second packager in Python. The script already fetches, converts,
quantizes and archives, and is tested in all its modes; as a child process, a long conversion
or quantization also stays out of the Streamlit server's process, and its output is the
packaging log the console shows. What only a browser needs lives here: the folders a browser
may take files from, and refusing a name that is already taken. The GGUF header check is
chatstack.gguf_file, which the script runs as well.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import yaml

from chatstack.gguf_file import GgufError, GgufInfo, read_gguf
from chatstack.model_archive import ArchiveError, list_archives, read_archive
from chatstack.model_registry import register_archive

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_LLAMA = ROOT / "package_llama.sh"
MODEL_CONFIG = ROOT / "model-config.yaml"   # what package_llama.sh packs
PACKAGING_TIMEOUT_S = 3600   # a multi-GB conversion and quantization on a small machine

# What package_llama.sh says as it goes, and how far along that is (its last line is "Wrote ...").
STAGES = (("Fetching llama.cpp's converter", 0.05), ("Converting", 0.1), ("Quantizing", 0.5),
          ("Weights:", 0.6), ("Packing", 0.65), ("Wrote", 1.0))

Step = Callable[[str], None]
LogLine = Callable[[str, float | None], None]   # a line of the log, and the fraction done when it tells


class PackagingError(ArchiveError):
    """A model could not be packaged or was refused; the message says why."""


def packed_config() -> dict:
    """The model-config.yaml package_llama.sh packs (the defaults the console's form starts from)."""
    return yaml.safe_load(MODEL_CONFIG.read_text())


def quant_types() -> list[str]:
    """The quantization types package_llama.sh accepts (its QUANT_TYPES, the one list of them)."""
    match = re.search(r'^QUANT_TYPES="([^"]+)"', PACKAGE_LLAMA.read_text(), re.MULTILINE)
    return match.group(1).split() if match else ["Q4_0"]


@dataclass(frozen=True)
class PackagingRequest:
    source: Path | str         # a GGUF file, or a Hugging Face snapshot folder to convert
    name: str
    version: str = "1.0"
    n_ctx: int | None = None   # None: what model-config.yaml says
    slots: int | None = None
    gpu_layers: int | None = None
    quant: str = "Q4_0"        # for a snapshot

    @property
    def archive(self) -> str:
        return f"{self.name}.mar"

    def command(self, store: Path) -> list[str]:
        args = [str(PACKAGE_LLAMA), str(self.source), "--name", self.name, "--version", self.version,
                "--model-store", str(store)]
        for option, value in (("--ctx", self.n_ctx), ("--slots", self.slots), ("--gpu-layers", self.gpu_layers)):
            if value is not None:
                args += [option, str(value)]
        if Path(self.source).is_dir():
            args += ["--quant", self.quant]
        return args


def allowed_source(path: str | Path, folders: tuple[Path, ...] | list[Path]) -> Path:
    """`path` with symlinks and '..' resolved, when it lies inside one of `folders`.
    Raises PackagingError otherwise, or when nothing is there."""
    text = str(path).strip()
    if not text:
        raise PackagingError("model file: give the path of a GGUF file or a Hugging Face snapshot folder")
    resolved = Path(text).expanduser().resolve()
    roots = [Path(f).expanduser().resolve() for f in folders]
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        raise PackagingError(f"model file: {text} is outside the folders the console may read models from "
                             f"({', '.join(map(str, roots))}; CHATSTACK_MODEL_FOLDERS sets them)")
    if not resolved.exists():
        raise PackagingError(f"model file: {text} does not exist")
    return resolved


def model_sources(folders: tuple[Path, ...] | list[Path]) -> list[Path]:
    """The GGUF files and Hugging Face snapshot folders in `folders` and their subfolders
    (one level down), for the console to offer."""
    found = []
    for folder in folders:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            continue
        for path in sorted([folder, *(p for p in folder.iterdir() if p.is_dir())]):
            if path != folder and (path / "config.json").is_file():
                found.append(path)
            found += sorted(p for p in path.glob("*.gguf") if p.is_file() and not p.name.endswith(".f16.gguf"))
    return found


def taken_names(store: Path, registered: list[str]) -> set[str]:
    """Model names that a new model cannot take: registered ones, and those of the store's archives."""
    store = Path(store)
    names = set(registered) | {a.model_name for a in list_archives(store)}
    return names | ({p.stem for p in store.glob("*.mar")} if store.is_dir() else set())


def check_request(request: PackagingRequest, folders, store: Path,
                  registered: list[str]) -> tuple[PackagingRequest, GgufInfo | None]:
    """Refuse, before anything is written, a source outside `folders`, a file that is not a
    readable GGUF, a folder that is not a snapshot, or a name already taken. Returns the request
    with its source resolved, and the GGUF's header (None for a snapshot)."""
    source = allowed_source(request.source, folders)
    request = replace(request, source=source)
    if not request.name:
        raise PackagingError("name: give the new model a name")
    if not request.version:
        raise PackagingError("version: give the new model a version, such as 1.0")
    max_tokens = packed_config()["handler"]["max_tokens"]
    if request.n_ctx is not None and request.n_ctx <= max_tokens:
        # the handler refuses to load such a model, so the worker would fail at registration
        raise PackagingError(f"context per chat: {request.n_ctx} tokens leaves no room for a prompt; it must be "
                             f"above max_tokens ({max_tokens}), the answer length in model-config.yaml")
    if request.name in taken_names(store, registered):
        raise PackagingError(f"name: a model called {request.name!r} already exists (registered, or an archive "
                             f"in the model store); choose another name")
    if source.is_dir():
        if not (source / "config.json").is_file():
            raise PackagingError(f"model file: {source} is a folder but not a Hugging Face snapshot (no config.json)")
        if not any(source.glob("*.safetensors")):
            raise PackagingError(f"model file: {source} has no *.safetensors weights")
        return request, None
    try:
        return request, read_gguf(source)
    except GgufError as e:
        raise PackagingError(f"model file: {e}") from None


def package_model(request: PackagingRequest, store: Path, on_line: LogLine = lambda line, done: None,
                  timeout_s: float = PACKAGING_TIMEOUT_S) -> Path:
    """Run package_llama.sh for `request`, passing each line of its log to on_line with the
    fraction done when the line tells. Returns the archive; raises PackagingError with the
    log's last lines when the script fails."""
    store = Path(store)
    log: list[str] = []
    # torch-model-archiver stages files in $TMPDIR/<model name>: a private TMPDIR keeps two
    # packagings at once from mixing their files.
    with tempfile.TemporaryDirectory(prefix="package-llama-") as private_tmp:
        child = subprocess.Popen(request.command(store), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, bufsize=1, env={**os.environ, "TMPDIR": private_tmp})
        deadline = time.monotonic() + timeout_s
        for line in child.stdout:
            line = line.rstrip("\n")
            log.append(line)
            on_line(line, next((done for prefix, done in STAGES if line.startswith(prefix)), None))
            if time.monotonic() > deadline:
                child.kill()
                break
        code = child.wait()
    if code != 0 or not (store / request.archive).is_file():
        errors = [line.removeprefix("package_llama.sh: error: ") for line in log if "error" in line.lower()]
        why = errors[-1] if errors else (" ".join(log[-3:]) or f"exit code {code}")
        if time.monotonic() > deadline:
            why = f"it did not finish within {timeout_s:.0f} s"
        raise PackagingError(f"package_llama.sh could not package {Path(request.source).name}: {why}")
    return store / request.archive


def add_model(client, store: Path, request: PackagingRequest, folders, workers: int = 1,
              on_step: Step = lambda _: None, on_line: LogLine = lambda line, done: None) -> str:
    """Check, package and register a new model; returns TorchServe's word on the registration.
    The fraction passed to on_line runs to 0.8 for packaging, then 1.0 once registered."""
    registered = [m["modelName"] for m in client.list_models()]
    request, info = check_request(request, folders, store, registered)
    on_step(f"{request.source.name}: {info.summary()}" if info else f"{request.source.name}: a Hugging Face "
            f"snapshot, converted and quantized to {request.quant}")
    archive = package_model(request, store, lambda line, done: on_line(line, None if done is None else 0.8 * done))
    # the archive's own batch settings (the slots chosen), with the workers chosen
    settings = replace(read_archive(archive).settings, min_workers=workers, max_workers=workers)
    on_step(f"Wrote {archive.name} ({archive.stat().st_size / 1e6:.0f} MB)")
    on_line(f"Registering {archive.name} with {workers} worker(s)", 0.85)
    status = register_archive(client, store, archive.name, settings, on_step=on_step)
    on_line(status, 1.0)
    return status
