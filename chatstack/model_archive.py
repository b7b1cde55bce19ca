"""Model archives (.mar) in the model store: what they hold, and new versions with other settings.

Some serving settings live only inside an archive's model-config.yaml: TorchServe
takes `continuousBatching` and `responseTimeout` from there, not from the
registration call. So changing them means a new archive, and TorchServe can serve
it next to the old one only under a new version. `package_variant` writes that
archive by copying the source archive with an edited model-config.yaml and
manifest, which keeps its weights and handler exactly as they were (re-packing
with package_llama.sh would pick up the default weights and today's handler).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ARCHIVE = "llama.mar"
MANIFEST = "MAR-INF/MANIFEST.json"
# package_variant marks its copies in the manifest (TorchServe ignores keys it does not know), so
# that a copy can be deleted once no version uses it; a model's original archive never is.
COPY_OF = "chatstackCopyOf"


class ArchiveError(Exception):
    """An archive could not be read or written; the message says why."""


@dataclass(frozen=True)
class ModelSettings:
    """The serving settings the console lets one choose, named as in model-config.yaml."""
    min_workers: int = 1
    max_workers: int = 1
    batch_size: int = 8
    max_batch_delay: int = 5
    response_timeout: int = 300
    continuous_batching: bool = True

    YAML_KEYS = {"min_workers": "minWorkers", "max_workers": "maxWorkers", "batch_size": "batchSize",
                 "max_batch_delay": "maxBatchDelay", "response_timeout": "responseTimeout",
                 "continuous_batching": "continuousBatching"}

    @classmethod
    def from_model_config(cls, config: dict) -> "ModelSettings":
        default = cls()
        values = {field: config.get(key, getattr(default, field)) for field, key in cls.YAML_KEYS.items()}
        return cls(**{k: (bool(v) if k == "continuous_batching" else int(v)) for k, v in values.items()})

    @classmethod
    def from_description(cls, entry: dict) -> "ModelSettings":
        """The settings of a registered model version, from GET /models/{name}/{version}."""
        return cls(min_workers=entry.get("minWorkers", 1), max_workers=entry.get("maxWorkers", 1),
                   batch_size=entry.get("batchSize", 1), max_batch_delay=entry.get("maxBatchDelay", 100),
                   response_timeout=entry.get("responseTimeout", 120),
                   continuous_batching=bool(entry.get("continuousBatching", False)))


@dataclass(frozen=True)
class ArchiveInfo:
    file: str          # file name in the model store: what registration takes as `url`
    model_name: str
    version: str
    settings: ModelSettings
    size_bytes: int
    copy_of: str | None = None   # the archive this one was copied from by package_variant

    @property
    def is_copy(self) -> bool:
        """A copy package_variant wrote (marked, or named NAME-vVERSION.mar as it names them)."""
        return self.copy_of is not None or self.file == f"{self.model_name}-v{self.version}.mar"


def read_archive(path: str | Path) -> ArchiveInfo:
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = json.loads(archive.read(MANIFEST))
            config_name = manifest.get("model", {}).get("configFile")
            config = yaml.safe_load(archive.read(config_name)) if config_name else {}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, yaml.YAMLError) as e:
        raise ArchiveError(f"{path.name} is not a readable model archive: {e}") from None
    model = manifest.get("model", {})
    return ArchiveInfo(file=path.name, model_name=model.get("modelName", path.stem),
                       version=str(model.get("modelVersion", "1.0")),
                       settings=ModelSettings.from_model_config(config or {}), size_bytes=path.stat().st_size,
                       copy_of=manifest.get(COPY_OF))


def list_archives(store: str | Path) -> list[ArchiveInfo]:
    """The readable archives in the model store (unreadable ones are left out)."""
    store = Path(store)
    if not store.is_dir():
        return []
    infos = []
    for path in sorted(store.glob("*.mar")):
        try:
            infos.append(read_archive(path))
        except ArchiveError:
            continue
    return infos


def edit_model_config(text: str, settings: ModelSettings) -> str:
    """model-config.yaml text with the top-level settings replaced, comments kept."""
    for field, key in ModelSettings.YAML_KEYS.items():
        value = getattr(settings, field)
        value_text = str(value).lower() if isinstance(value, bool) else str(value)
        pattern = re.compile(rf"^({key}:)[ \t]*[^#\n]*?([ \t]*#.*)?$", re.MULTILINE)
        if pattern.search(text):
            text = pattern.sub(lambda m: f"{m.group(1)} {value_text}{m.group(2) or ''}", text, count=1)
        else:
            text = f"{key}: {value_text}\n" + text
    return text


def package_variant(store: str | Path, source: str, version: str, settings: ModelSettings,
                    archive_file: str | None = None) -> ArchiveInfo:
    """Write a copy of archive `source` as model version `version` with `settings`.

    The new archive goes into the store as `archive_file` (default NAME-vVERSION.mar)
    and never replaces an existing file."""
    store = Path(store)
    src = store / source
    info = read_archive(src)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", version):
        raise ArchiveError(f"version '{version}' may only hold letters, digits, ., _ and -")
    target = store / (archive_file or f"{info.model_name}-v{version}.mar")
    if target.exists():
        raise ArchiveError(f"{target.name} already exists in the model store")
    partial = target.with_name(target.name + ".part")
    try:
        # Level 1: quantized weights barely compress, so spend little time on it.
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zout:
            manifest = json.loads(zin.read(MANIFEST))
            manifest.setdefault("model", {})["modelVersion"] = version
            manifest[COPY_OF] = manifest.get(COPY_OF) or src.name   # the original, for a copy of a copy
            config_name = manifest["model"].get("configFile")
            for entry in zin.infolist():
                if entry.filename == MANIFEST:
                    zout.writestr(entry, json.dumps(manifest, indent=2))
                elif entry.filename == config_name:
                    zout.writestr(entry, edit_model_config(zin.read(entry).decode(), settings))
                else:
                    large = entry.file_size * 1.05 > zipfile.ZIP64_LIMIT  # as zipfile decides for known sizes
                    with zin.open(entry) as data, zout.open(entry.filename, "w", force_zip64=large) as out:
                        shutil.copyfileobj(data, out, 1 << 20)
            if config_name is None:
                raise ArchiveError(f"{source} has no model-config.yaml to change")
        partial.rename(target)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        partial.unlink(missing_ok=True)
        raise ArchiveError(f"could not write {target.name}: {e}") from None
    except ArchiveError:
        partial.unlink(missing_ok=True)
        raise
    return read_archive(target)


def next_version(versions: list[str]) -> str:
    """A version after all given ones: '1.0' -> '2.0', ['1.0', '2.0'] -> '3.0'."""
    majors = []
    for v in versions:
        head = re.match(r"\d+", v)
        if head:
            majors.append(int(head.group()))
    return f"{max(majors, default=0) + 1}.0"


def ensure_default_archive(store: str | Path, timeout_s: float = 900) -> Path:
    """Make sure the store holds the default model archive, building it with
    package_llama.sh when missing (the first run downloads the default model)."""
    store = Path(store)
    archive = store / DEFAULT_ARCHIVE
    if archive.exists():
        return archive
    store.mkdir(parents=True, exist_ok=True)
    # torch-model-archiver stages files in $TMPDIR/<model name>: a private TMPDIR keeps
    # two packagings at once (another console, a test run) from mixing their files.
    with tempfile.TemporaryDirectory(prefix="package-llama-") as private_tmp:
        try:
            done = subprocess.run([str(ROOT / "package_llama.sh"), "--model-store", str(store)],
                                  capture_output=True, text=True, timeout=timeout_s,
                                  env={**os.environ, "TMPDIR": private_tmp})
        except subprocess.TimeoutExpired:
            raise ArchiveError(f"package_llama.sh did not finish within {timeout_s:.0f} s") from None
    if done.returncode != 0 or not archive.exists():
        detail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise ArchiveError("package_llama.sh could not build the default model archive: " + " ".join(detail))
    return archive

