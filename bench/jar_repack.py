"""Carry a jar (zip) smaller than itself and rebuild it byte for byte.

TorchServe's model-server.jar is 44 MB of deflated class files that xz cannot shrink
(41 MB), too much for the 64 MiB that travels to the GPU machine. Its entries were
deflated by zlib at level 6, so this packs the jar as its uncompressed contents (xz
takes 106 MB of classes to ~18 MB) plus every byte of the zip that is not
compressed data (headers, central directory), and on the other side deflates each
entry again with Python's zlib and checks that every entry, and the whole file,
come out identical (the sha256 that torchserve_fix's agent checks).

    python bench/jar_repack.py pack model-server.jar model-server.jar.xz
    python bench/jar_repack.py unpack model-server.jar.xz model-server.jar

`pack` refuses a jar it cannot rebuild exactly (another deflater), `unpack` fails
loudly on any difference (a zlib whose output differs), never writing a wrong jar.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import struct
import sys
import zipfile
import zlib
from pathlib import Path

MAGIC = b"JARPACK1"
LEVELS = (6, 9, 5, 1)   # zlib levels tried per entry (6 is java.util.zip's default)


def _deflate(data: bytes, level: int) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -15, 8)
    return c.compress(data) + c.flush()


def pack(jar: Path, dest: Path) -> dict:
    raw = jar.read_bytes()
    z = zipfile.ZipFile(jar)
    infos = sorted(z.infolist(), key=lambda i: i.header_offset)
    skeleton, contents, entries = bytearray(), [], []
    pos = 0
    for info in infos:
        if info.flag_bits & 0x8 or info.flag_bits & 0x1:
            raise SystemExit(f"{jar}: {info.filename} uses a data descriptor or encryption: not supported")
        name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
        data_at = info.header_offset + 30 + name_len + extra_len
        skeleton += raw[pos:data_at]
        stored = raw[data_at:data_at + info.compress_size]
        content = z.read(info)
        if info.compress_type == zipfile.ZIP_STORED:
            level = None
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            level = next((lv for lv in LEVELS if _deflate(content, lv) == stored), None)
            if level is None:
                raise SystemExit(f"{jar}: {info.filename} was deflated by something zlib cannot reproduce")
        else:
            raise SystemExit(f"{jar}: {info.filename} uses compression method {info.compress_type}")
        entries.append([len(content), level])
        contents.append(content)
        pos = data_at + info.compress_size
    skeleton += raw[pos:]
    meta = {"sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw), "entries": entries,
            "skeleton": len(skeleton), "zlib": zlib.ZLIB_RUNTIME_VERSION}
    header = json.dumps(meta).encode()
    with lzma.open(dest, "wb", preset=9 | lzma.PRESET_EXTREME) as out:
        out.write(MAGIC + struct.pack("<Q", len(header)) + header + bytes(skeleton))
        for content in contents:
            out.write(content)
    return meta


def unpack(src: Path, dest: Path) -> dict:
    with lzma.open(src, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise SystemExit(f"{src} is not a jar_repack file")
        meta = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        skeleton = f.read(meta["skeleton"])
        contents = [f.read(size) for size, _ in meta["entries"]]
    out = bytearray()
    pos = 0
    for (size, level), content in zip(meta["entries"], contents):
        # the skeleton holds each local header up to its data: the header says how long it is
        assert skeleton[pos:pos + 4] == b"PK\x03\x04", f"bad local header at skeleton offset {pos}"
        compress_size = struct.unpack("<I", skeleton[pos + 18:pos + 22])[0]
        name_len, extra_len = struct.unpack("<HH", skeleton[pos + 26:pos + 30])
        end = pos + 30 + name_len + extra_len
        out += skeleton[pos:end]
        data = content if level is None else _deflate(content, level)
        if len(data) != compress_size or zlib.crc32(content) != struct.unpack("<I", skeleton[pos + 14:pos + 18])[0]:
            raise SystemExit(f"{src}: entry at {len(out)} does not deflate to its original bytes with this zlib "
                             f"({zlib.ZLIB_RUNTIME_VERSION}; packed with {meta['zlib']}): carry the jar itself")
        out += data
        pos = end
    out += skeleton[pos:]
    digest = hashlib.sha256(out).hexdigest()
    if digest != meta["sha256"]:
        raise SystemExit(f"{src}: the rebuilt jar's sha256 is {digest}, not {meta['sha256']}")
    dest.write_bytes(out)
    return meta


def main(argv=None) -> int:
    args = (argv if argv is not None else sys.argv[1:])
    if len(args) != 3 or args[0] not in ("pack", "unpack"):
        print(__doc__, file=sys.stderr)
        return 2
    cmd, src, dest = args[0], Path(args[1]), Path(args[2])
    meta = (pack if cmd == "pack" else unpack)(src, dest)
    print(f"{cmd}: {src} -> {dest} ({len(meta['entries'])} entries, sha256 {meta['sha256']})")
    if cmd == "pack":   # prove it now, not on the GPU machine
        check = dest.with_suffix(dest.suffix + ".check")
        try:
            unpack(dest, check)
        finally:
            check.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
