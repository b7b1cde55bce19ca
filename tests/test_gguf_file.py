"""chatstack.gguf_file: the header check made before a model is packaged, on the real default
GGUF and on files that are not readable GGUFs."""

from __future__ import annotations

import struct

import pytest

from chatstack.gguf_file import GgufError, main, read_gguf


def test_the_default_model_header_is_read_whole(default_gguf):
    info = read_gguf(default_gguf)
    assert info.version == 3
    assert info.tensor_count > 100
    assert info.architecture == "llama"
    assert info.layers == 30 and info.context_length == 8192
    assert info.metadata["tokenizer.ggml.tokens"].length == 49152  # the vocabulary, kept as its length
    assert info.size_bytes == default_gguf.stat().st_size
    assert "architecture llama" in info.summary() and "30 layers" in info.summary()


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def header(version=3, tensors=1, key_values=0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, tensors, key_values)


@pytest.mark.parametrize("data, reason", [
    (b"", "it is empty"),
    (b"PK\x03\x04 a zip, not a model", "does not start with the magic b'GGUF' (it starts with b'PK\\x03\\x04')"),
    (b"GGUF\x03\x00", "it is truncated: it ends inside the format version"),
    (header()[:20], "it is truncated: it ends inside the metadata count"),
    (header(version=1), "it is GGUF version 1; llama.cpp reads versions 2 and 3"),
    (header(tensors=0), "holds 0 tensors"),
    (header(tensors=1 << 40), "holds 1099511627776 tensors"),
    (header(key_values=1 << 40), "holds 1099511627776 metadata entries"),
    (header(key_values=2) + struct.pack("<Q", 3) + b"abc" + struct.pack("<I", 42), "metadata abc has unknown value type 42"),
])
def test_a_file_that_is_not_a_readable_gguf_is_refused_saying_why(tmp_path, data, reason):
    bad = write(tmp_path / "bad.gguf", data)
    with pytest.raises(GgufError) as refused:
        read_gguf(bad)
    assert str(refused.value).startswith(f"{bad} is not a GGUF file llama.cpp can read: ")
    assert reason in str(refused.value)


def test_the_real_gguf_cut_inside_its_metadata_is_refused_as_truncated(tmp_path, default_gguf):
    with open(default_gguf, "rb") as f:
        cut = write(tmp_path / "cut.gguf", f.read(100_000))  # inside the vocabulary
    with pytest.raises(GgufError, match=r"it is truncated: it ends inside tokenizer\.ggml\.tokens"):
        read_gguf(cut)


def test_a_folder_or_a_missing_file_is_not_a_gguf(tmp_path):
    with pytest.raises(GgufError, match="it is not a file"):
        read_gguf(tmp_path)
    with pytest.raises(GgufError, match="there is no such file"):
        read_gguf(tmp_path / "missing.gguf")


def test_the_command_line_prints_the_summary_or_the_reason(tmp_path, default_gguf, capsys):
    assert main([str(default_gguf)]) == 0
    assert "GGUF v3" in capsys.readouterr().out
    assert main([str(write(tmp_path / "empty.gguf", b""))]) == 2
    assert "it is empty" in capsys.readouterr().err
