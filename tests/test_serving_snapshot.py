"""Tuning that lasts: Start brings back what TorchServe served before the stop (its own config
snapshots), and archive copies made for old versions are deleted once no version uses them.
The first tests read snapshot files; the last one stops and starts a real TorchServe."""

from __future__ import annotations

import json

import pytest

from chatstack.model_archive import ModelSettings, list_archives
from chatstack.model_registry import registered_models, remove_unused_copies, scale_workers, swap_settings
from chatstack.server_lifecycle import start_server, stop_server
from chatstack.serving_snapshot import (java_property, last_snapshot, prune_snapshots, restorable, snapshot_files,
                                        snapshot_to_restore)
from conftest import ROOT, free_port_overrides
from chatstack.torchserve_process import TorchServeProcess

pytestmark = pytest.mark.timeout(900)

# As TorchServe 0.12 writes it: one line, ':' and '=' escaped, newlines as \n.
SNAPSHOT_LINE = ('model_snapshot={\\n  "name"\\: "20261202111500123-snapshot.cfg",\\n  "modelCount"\\: 2,\\n  '
                 '"created"\\: 1764674100123,\\n  "models"\\: {\\n    "llama"\\: {\\n      "2.0"\\: {\\n        '
                 '"defaultVersion"\\: true,\\n        "marName"\\: "llama-v2.0.mar",\\n        "minWorkers"\\: 2,\\n'
                 '        "maxWorkers"\\: 2,\\n        "batchSize"\\: 4,\\n        "maxBatchDelay"\\: 5,\\n'
                 '        "responseTimeout"\\: 300\\n      },\\n      "1.0"\\: {\\n        "defaultVersion"\\: false,\\n'
                 '        "marName"\\: "llama.mar",\\n        "minWorkers"\\: 1,\\n        "maxWorkers"\\: 1,\\n'
                 '        "batchSize"\\: 8,\\n        "maxBatchDelay"\\: 5,\\n        "responseTimeout"\\: 300\\n'
                 '      }\\n    }\\n  }\\n}')


def write_snapshot(log_dir, stamp, line=SNAPSHOT_LINE):
    folder = log_dir / "config"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stamp}-snapshot.cfg").write_text(f"#Saving snapshot\ninference_address=http\\://127.0.0.1\\:8080\n"
                                                 f"{line}\ntsConfigFile=x\n")


def test_the_last_snapshot_is_read_with_its_escapes_undone(tmp_path):
    write_snapshot(tmp_path, "20261202111500123")
    write_snapshot(tmp_path, "20261202101500123", "model_snapshot={}")   # older
    (tmp_path / "config" / "notes.txt").write_text("not a snapshot")
    assert java_property("a=http\\://x\\=1\\n", "a") == "http://x=1\n"
    snapshot = last_snapshot(tmp_path)
    assert snapshot["models"]["llama"]["2.0"]["batchSize"] == 4 and snapshot["modelCount"] == 2


def test_a_snapshot_cut_short_falls_back_to_the_one_before(tmp_path):
    write_snapshot(tmp_path, "20261202111500123")
    write_snapshot(tmp_path, "20261202121500123", 'model_snapshot={\\n  "name"\\: "cut')
    assert last_snapshot(tmp_path)["modelCount"] == 2
    assert last_snapshot(tmp_path / "nothing") is None


def test_versions_whose_archive_is_gone_are_left_out(tmp_path):
    write_snapshot(tmp_path, "20261202111500123")
    snapshot = last_snapshot(tmp_path)
    (tmp_path / "llama.mar").write_bytes(b"")
    kept, left_out = restorable(snapshot, tmp_path)
    assert left_out == ["llama 2.0 (llama-v2.0.mar is not in the model store)"]
    assert list(kept["models"]["llama"]) == ["1.0"] and kept["modelCount"] == 1
    assert kept["models"]["llama"]["1.0"]["defaultVersion"] is True   # its default was the one left out
    (tmp_path / "llama.mar").unlink()
    assert restorable(snapshot, tmp_path) == (None, ["llama 2.0 (llama-v2.0.mar is not in the model store)",
                                                     "llama 1.0 (llama.mar is not in the model store)"])


def test_only_the_newest_snapshots_are_kept(tmp_path):
    for i in range(30):
        write_snapshot(tmp_path, f"202612021115{i:05d}")
    prune_snapshots(tmp_path, keep=20)
    assert [p.name[:17] for p in snapshot_files(tmp_path)] == [f"202612021115{i:05d}" for i in range(10, 30)]


def test_start_says_what_it_restores(tmp_path):
    write_snapshot(tmp_path / "logs", "20261202111500123")
    for archive in ("llama.mar", "llama-v2.0.mar"):
        (tmp_path / archive).write_bytes(b"")
    steps = []
    snapshot = snapshot_to_restore(tmp_path / "logs", tmp_path, steps.append)
    assert snapshot["modelCount"] == 2
    assert steps == ["Restoring what was served before the stop: llama 2.0 (default) from llama-v2.0.mar, "
                     "2–2 worker(s), batch size 4; llama 1.0 from llama.mar, 1–1 worker(s), batch size 8"]


# ---- a real TorchServe: change, stop, start ----------------------------------------------------

def serving(client):
    return [(m.name, m.version, m.is_default, m.archive, m.settings.batch_size, m.settings.min_workers,
             m.settings.max_workers) for m in registered_models(client)]


def test_batch_settings_and_workers_survive_stop_and_start(session_dir, model_store):
    store = session_dir / "restore_store"
    store.mkdir()
    (store / "llama.mar").symlink_to(model_store / "llama.mar")
    process = TorchServeProcess(ROOT / "config.properties", store, session_dir / "restore_run",
                                overrides=free_port_overrides())
    try:
        start_server(process)
        client = process.client(timeout=600)
        assert serving(client) == [("llama", "1.0", True, "llama.mar", 8, 1, 1)]
        assert swap_settings(client, store, "llama", ModelSettings(batch_size=4, max_batch_delay=7)) == "2.0"
        scale_workers(client, "llama", 1, 2, version="2.0")
        before = serving(client)
        assert before == [("llama", "2.0", True, "llama-v2.0.mar", 4, 1, 2)]
        stop_server(process)

        steps = []
        start_server(process, on_step=steps.append)
        assert any(s.startswith("Restoring what was served before the stop: llama 2.0 (default)") for s in steps)
        client = process.client(timeout=600)   # new keys: TorchServe writes them at each start
        assert serving(client) == before, "not llama.mar 1.0 again"
        entry = client.describe_model("llama", "2.0")[0]
        assert entry["maxBatchDelay"] == 7
        assert client.chat("llama", [{"role": "user", "content": "Hi"}], max_tokens=4)["usage"]["completion_tokens"]

        # A second change: the copy made for 2.0 goes once 3.0 serves; the original stays.
        assert swap_settings(client, store, "llama", ModelSettings(batch_size=2)) == "3.0"
        assert sorted(a.file for a in list_archives(store)) == ["llama-v3.0.mar", "llama.mar"]
        assert remove_unused_copies(client, store) == []
    finally:
        process.stop()
