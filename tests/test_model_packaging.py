"""chatstack.model_packaging: what the console may package, the checks before packaging,
package_llama.sh run with the chosen settings, and a new model added to a real TorchServe."""

from __future__ import annotations

import zipfile

import pytest
import yaml

from chatstack.model_archive import read_archive
from chatstack.model_packaging import (PackagingError, PackagingRequest, add_model, allowed_source, check_request,
                                       model_sources, package_model, quant_types)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def folder(tmp_path, default_gguf):
    """An allowed model folder holding the default GGUF (a link), a snapshot and a file that is not a GGUF."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "smol.gguf").symlink_to(default_gguf)
    (models / "notes.gguf").write_bytes(b"not a model")
    snapshot = models / "snap"
    snapshot.mkdir()
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"")
    return models


def packed_config(mar):
    with zipfile.ZipFile(mar) as z:
        return yaml.safe_load(z.read("model-config.yaml"))


def test_the_console_offers_the_gguf_files_and_snapshots_of_its_folders(folder, tmp_path):
    assert model_sources([folder, tmp_path / "missing"]) == [folder / "notes.gguf", folder / "smol.gguf",
                                                             folder / "snap"]


def test_a_path_inside_the_folders_is_resolved(folder, default_gguf):
    # A link inside the folder to a file elsewhere is the file elsewhere: refused unless that is allowed too.
    assert allowed_source(folder / "snap" / ".." / "notes.gguf", [folder]) == folder / "notes.gguf"
    with pytest.raises(PackagingError, match="is outside the folders"):
        allowed_source(folder / "smol.gguf", [folder])
    assert allowed_source(folder / "smol.gguf", [folder, default_gguf.parent]) == default_gguf.resolve()


@pytest.mark.parametrize("path, message", [
    ("", "give the path of a GGUF file"),
    ("/etc/passwd", "/etc/passwd is outside the folders the console may read models from"),
    ("{folder}/../secret.gguf", "is outside the folders"),
    ("{folder}/missing.gguf", "does not exist"),
])
def test_a_path_outside_the_folders_or_missing_is_refused(folder, path, message):
    (folder.parent / "secret.gguf").write_bytes(b"GGUF")
    with pytest.raises(PackagingError, match=message):
        allowed_source(path.format(folder=folder), [folder])


@pytest.mark.parametrize("source, name, registered, message", [
    ("notes.gguf", "new", [], "model file: .*notes.gguf is not a GGUF file llama.cpp can read: it does not start "
                              "with the magic"),
    ("smol.gguf", "llama", ["llama"], "name: a model called 'llama' already exists"),
    ("smol.gguf", "stored", [], "name: a model called 'stored' already exists"),
    ("smol.gguf", "", [], "name: give the new model a name"),
    ("snap/config.json", "new", [], "not a GGUF"),
    ("smol.gguf", "small-context", [], r"context per chat: 512 tokens leaves no room .* above max_tokens \(512\)"),
])
def test_bad_requests_are_refused_before_packaging(folder, default_gguf, tmp_path, source, name, registered,
                                                   message):
    store = tmp_path / "store"
    store.mkdir()
    (store / "stored.mar").write_bytes(b"")
    request = PackagingRequest(folder / source, name, n_ctx=512 if name == "small-context" else 1024)
    with pytest.raises(PackagingError, match=message):
        check_request(request, [folder, default_gguf.parent], store, registered)
    assert [p.name for p in store.iterdir()] == ["stored.mar"]


def test_a_snapshot_folder_is_accepted_as_such(folder, tmp_path):
    request, info = check_request(PackagingRequest(folder / "snap", "new"), [folder], tmp_path, [])
    assert info is None and request.source == folder / "snap"
    assert "--quant" in request.command(tmp_path) and "Q8_0" in quant_types()


def test_packaging_writes_the_chosen_settings_and_reports_progress(default_gguf, tmp_path):
    lines = []
    request = PackagingRequest(default_gguf, "smol", "2.0", n_ctx=1024, slots=3, gpu_layers=0)
    archive = package_model(request, tmp_path, lambda line, done: lines.append((line, done)))
    assert archive == tmp_path / "smol.mar"
    config = packed_config(archive)
    assert (config["handler"]["n_ctx"], config["batchSize"], config["handler"]["n_gpu_layers"]) == (1024, 3, 0)
    info = read_archive(archive)
    assert (info.model_name, info.version, info.settings.batch_size) == ("smol", "2.0", 3)
    assert any(line.startswith("Weights: GGUF v3") for line, _ in lines)
    fractions = [done for _, done in lines if done is not None]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_a_failure_of_the_script_comes_back_with_its_reason(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(PackagingError, match="could not package bad.gguf: .*it is truncated"):
        package_model(PackagingRequest(bad, "bad"), tmp_path / "store")
    assert not (tmp_path / "store" / "bad.mar").exists()


def test_a_new_model_is_packaged_registered_and_answers(torchserve, model_store, default_gguf):
    client = torchserve.client(timeout=300)
    steps, lines = [], []
    request = PackagingRequest(default_gguf, "added", n_ctx=1024, slots=2)
    try:
        status = add_model(client, model_store, request, [default_gguf.parent], workers=1, on_step=steps.append,
                           on_line=lambda line, done: lines.append(done))
        assert "registered" in status
        entry = client.describe_model("added")[0]
        assert (entry["batchSize"], entry["minWorkers"]) == (2, 1)
        answer = client.chat("added", [{"role": "user", "content": "Say hi"}], max_tokens=8)
        assert answer["usage"]["completion_tokens"] >= 1
        assert lines[-1] == 1.0 and "architecture llama" in steps[0]
        with pytest.raises(PackagingError, match="'added' already exists"):
            add_model(client, model_store, request, [default_gguf.parent])
    finally:
        if any(m["modelName"] == "added" for m in client.list_models()):
            client.unregister("added")
        (model_store / "added.mar").unlink(missing_ok=True)


def test_a_snapshot_is_converted_and_quantized_to_the_chosen_type(tmp_path, monkeypatch):
    from tiny_llama import make_tiny_llama
    monkeypatch.setenv("LLAMA_MODELS_DIR", str(tmp_path / "converted"))   # not the repo's models/
    snapshot = make_tiny_llama(tmp_path / "models" / "tiny-llama")
    request, info = check_request(PackagingRequest(snapshot, "tiny", quant="Q8_0", n_ctx=1024),
                                  [tmp_path / "models"], tmp_path / "store", [])
    lines = []
    archive = package_model(request, tmp_path / "store", lambda line, done: lines.append((line, done)))
    said = [line for line, _ in lines]
    assert any(line.startswith("Converting") for line in said) and "Quantizing to Q8_0..." in said
    fractions = [done for _, done in lines if done is not None]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert (tmp_path / "converted" / "tiny.Q8_0.gguf").is_file()
    assert packed_config(archive)["handler"]["n_ctx"] == 1024
