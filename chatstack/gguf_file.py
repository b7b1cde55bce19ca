"""What a GGUF file's header says, read without llama.cpp: checked before a model is packaged.

    python -m chatstack.gguf_file FILE    # one line about the model, or why FILE is not a GGUF (exit 2)

A GGUF starts with the magic b"GGUF", a format version (llama.cpp reads 2 and 3), the
number of tensors and the number of metadata key/values, then the key/values themselves
(little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md). Reading all of
them proves the header is whole; a file cut short, a wrong magic or absurd counts are refused
with a message that says which. The tensor data itself is not checked (llama.cpp does that
when the worker loads the model).
"""

from __future__ import annotations

import mmap
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_TENSORS = 1 << 20         # far above any real model (a 405B model has ~1,100 tensors)
MAX_KEY_VALUES = 1 << 16
SHORT_ARRAY = 16              # longer arrays (the vocabulary) are kept as their length only

# value type -> struct format (8 = string, 9 = array are read by hand)
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


class GgufError(ValueError):
    """The file is not a readable GGUF; the message says why."""


@dataclass(frozen=True)
class ArrayValue:
    """A long metadata array (such as the vocabulary), kept as its length."""
    item_type: int
    length: int


@dataclass(frozen=True)
class GgufInfo:
    path: Path
    version: int
    tensor_count: int
    metadata: dict = field(repr=False)
    size_bytes: int = 0

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    @property
    def name(self) -> str | None:
        return self.metadata.get("general.name")

    @property
    def context_length(self) -> int | None:
        """The context the model was trained for, in tokens."""
        return self.metadata.get(f"{self.architecture}.context_length")

    @property
    def layers(self) -> int | None:
        """The model's blocks: what n_gpu_layers counts (one more offloads the output layer too)."""
        return self.metadata.get(f"{self.architecture}.block_count")

    def summary(self) -> str:
        parts = [f"GGUF v{self.version}", f"{self.tensor_count} tensors", f"{self.size_bytes / 1e6:.0f} MB"]
        if self.architecture:
            parts.append(f"architecture {self.architecture}")
        if self.name:
            parts.append(f"name {self.name!r}")
        if self.layers:
            parts.append(f"{self.layers} layers")
        if self.context_length:
            parts.append(f"trained context {self.context_length} tokens")
        return ", ".join(parts)


def read_gguf(path: str | Path) -> GgufInfo:
    """The header of a GGUF file. Raises GgufError naming what is wrong."""
    path = Path(path)
    try:
        if not path.is_file():
            raise _Bad("it is not a file" if path.exists() else "there is no such file")
        size = path.stat().st_size
        if size == 0:
            raise _Bad("it is empty")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _parse(path, data, size)
    except OSError as e:
        raise GgufError(f"{path} cannot be read: {e.strerror or e}") from None
    except _Bad as e:
        raise GgufError(f"{path} is not a GGUF file llama.cpp can read: {e}") from None


class _Bad(Exception):
    """Why the file is not a readable GGUF (read_gguf adds the file's name)."""


def _parse(path: Path, data: mmap.mmap, size: int) -> GgufInfo:
    reader = _Reader(data)
    magic = bytes(data[:4])
    if magic != MAGIC:
        raise _Bad(f"it does not start with the magic b'GGUF' (it starts with {magic!r})")
    reader.pos = 4
    version = reader.unpack("<I", "the format version")
    if version not in SUPPORTED_VERSIONS:
        raise _Bad(f"it is GGUF version {version}; llama.cpp reads versions "
                        f"{' and '.join(map(str, SUPPORTED_VERSIONS))}")
    tensors = reader.unpack("<Q", "the tensor count")
    key_values = reader.unpack("<Q", "the metadata count")
    if not 0 < tensors <= MAX_TENSORS:
        raise _Bad(f"its header says it holds {tensors} tensors, which no model has (a damaged header)")
    if key_values > MAX_KEY_VALUES:
        raise _Bad(f"its header says it holds {key_values} metadata entries (a damaged header)")
    metadata = {}
    for i in range(key_values):
        key = reader.string(f"metadata key {i + 1} of {key_values}")
        metadata[key] = reader.value(reader.unpack("<I", f"the type of {key}"), key)
    return GgufInfo(path, version, tensors, metadata, size)


class _Reader:
    def __init__(self, data: mmap.mmap):
        self.data, self.pos = data, 0

    def take(self, n: int, what: str) -> int:
        start = self.pos
        if start + n > len(self.data):
            raise _Bad(f"it is truncated: it ends inside {what} (the header needs at least {start + n} "
                       f"bytes, the file has {len(self.data)})")
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str):
        return struct.unpack_from(fmt, self.data, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.unpack("<Q", what)
        start = self.take(length, what)
        return self.data[start:start + length].decode("utf-8", errors="replace")

    def value(self, kind: int, key: str):
        if kind in SCALARS:
            return self.unpack(SCALARS[kind], key)
        if kind == STRING:
            return self.string(key)
        if kind == ARRAY:
            item_type = self.unpack("<I", f"the item type of {key}")
            length = self.unpack("<Q", f"the length of {key}")
            if item_type == ARRAY or (item_type not in SCALARS and item_type != STRING):
                raise _Bad(f"metadata {key} is an array of unknown type {item_type} (a damaged header)")
            if item_type in SCALARS and length > SHORT_ARRAY:  # skip fixed-size items at once
                self.take(length * struct.calcsize(SCALARS[item_type]), key)
                return ArrayValue(item_type, length)
            if length > SHORT_ARRAY:  # strings: step over each without decoding it
                for _ in range(length):
                    self.take(self.unpack("<Q", key), key)
                return ArrayValue(item_type, length)
            return [self.value(item_type, key) for _ in range(length)]
        raise _Bad(f"metadata {key} has unknown value type {kind} (a damaged header)")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    try:
        print(read_gguf(args[0]).summary())
    except GgufError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
