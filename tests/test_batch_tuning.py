"""The batch-size tuner's logic (chatstack/batch_tuning.py) without a server: candidates, time
bounds, the recommendation, result files, and the run loop against a fake client and load.
tests/test_console_measure_browser.py runs a real tune against a real TorchServe."""

from __future__ import annotations

import json
import threading
import zipfile
from pathlib import Path

import pytest

from chatstack.batch_tuning import (LOAD_ESTIMATE_S, REGISTER_S, Candidate, LevelResult, TunePlan, TuneRun, TuningJob,
                                    applied_settings, candidates, chats_in_flight, expected_level_s, latest_run,
                                    load_estimate_s, per_worker_gauge, recommend, run_tuning, save_run, tune_and_save,
                                    worker_counts_that_fit)
from chatstack.loadgen import STOPPED, RequestResult
from chatstack.model_archive import ModelSettings, read_archive
from chatstack.torchserve_client import Keys, TorchServeError


def fake_archive(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("MAR-INF/MANIFEST.json", json.dumps(
            {"model": {"modelName": "llama", "modelVersion": "1.0", "configFile": "model-config.yaml"}}))
        z.writestr("model-config.yaml", "minWorkers: 1\nmaxWorkers: 1\nbatchSize: 8\ncontinuousBatching: true\n")
        z.writestr("model.gguf", b"GGUF" + bytes(100))
    return path


class FakeClient:
    """Records the management calls the tuner makes; refuses to register `broken` versions."""
    inference_url = "http://127.0.0.1:1"

    def __init__(self, store: Path, broken: set[str] = frozenset()):
        self.store, self.broken = store, broken
        self.keys = Keys(inference="ik")
        self.registered: dict[str, ModelSettings] = {}
        self.calls: list[str] = []

    def register(self, archive, *, model_name, initial_workers, batch_size, max_batch_delay, timeout):
        info = read_archive(self.store / archive)
        self.calls.append(f"register {info.version}")
        if info.version in self.broken:
            raise TorchServeError("Failed to load the model", 500)
        self.registered[info.version] = info.settings

    def wait_for_workers(self, name, version, count, timeout):
        return [{"status": "READY"}] * count

    def unregister(self, name, version):
        if version not in self.registered:
            raise TorchServeError(f"Model version: {version} does not exist for model: {name}", 404)
        self.calls.append(f"unregister {version}")
        del self.registered[version]


def fake_load(tokens_per_request=10, seconds=1.0, ttft=0.1):
    """A load runner: each request 'generates' for `seconds`; records the specs it ran."""
    specs = []

    def load(spec, should_stop):
        specs.append(spec)
        results = [RequestResult(stream=s, index=0, ok=True, start=0.0, first_token=ttft * (1 + s), end=seconds,
                                 completion_tokens=tokens_per_request) for s in range(spec.concurrency)]
        return results, seconds
    return load, specs


def plan(**kw) -> TunePlan:
    return TunePlan(model="llama", candidates=tuple(candidates([1, 4], [1])), concurrency=(1, 2), **kw)


# ---- candidates and time ------------------------------------------------------------------

def test_worker_counts_double_up_to_the_cores_and_memory_that_fit():
    assert worker_counts_that_fit(cores=2, free_memory_mb=8000, worker_memory_mb=500) == [1, 2]
    assert worker_counts_that_fit(cores=16, free_memory_mb=64000, worker_memory_mb=500) == [1, 2, 4]
    assert worker_counts_that_fit(cores=16, free_memory_mb=1200, worker_memory_mb=500) == [1, 2]
    assert worker_counts_that_fit(cores=1, free_memory_mb=100, worker_memory_mb=500) == [1]


def test_candidates_pair_every_batch_size_with_every_worker_count_smallest_first():
    assert candidates([8, 1, 8], [2, 1]) == [Candidate(1, 1), Candidate(8, 1), Candidate(1, 2), Candidate(8, 2)]
    assert Candidate(8, 2).version == "tune-b8-w2" and Candidate(8, 2).label == "batch 8 × 2 workers"
    for bad in (([], [1]), ([1], []), ([0], [1])):
        with pytest.raises(ValueError):
            candidates(*bad)


def test_the_estimate_is_within_the_hard_limit_and_counts_every_load_and_level():
    p = plan(level_limit_s=10, load_limit_s=60, load_estimate_s=15, max_tokens=40)   # batch 1 and 4, 1 and 2 chats
    warm_up = 4 / 20 + 1
    # batch 1: 2 chats take two rounds; batch 4: one. At 20 tokens/s an answer of 40 takes 2 s + 1 s to start.
    assert p.estimate_s(20) == pytest.approx((15 + warm_up + 3 + 6) + (15 + warm_up + 3 + 3))
    assert p.estimate_s(2) == pytest.approx(2 * 15 + 2 * (4 / 2 + 1) + 4 * 10)   # each level cut at its limit
    assert p.limit_s == 2 * (60 + 3 * 10) >= p.estimate_s(None) >= p.estimate_s(1000)
    assert p.steps == 2 * 3
    with pytest.raises(ValueError, match="concurrency"):
        TunePlan(model="llama", candidates=(Candidate(1, 1),), concurrency=(0,))


# ---- recommendation -----------------------------------------------------------------------

def row(b, w, c, tps, p95, errors=0):
    return LevelResult(b, w, c, requests=c, ok=c - errors, errors=errors, tokens_per_s=tps, ttft_p95_s=p95)


def test_the_recommendation_is_the_fastest_setting_within_the_ttft_limit():
    rows = [row(1, 1, 4, 30, 3.0), row(8, 1, 4, 90, 0.8), row(8, 1, 8, 120, 2.5), row(16, 1, 8, 110, 1.5),
            row(32, 1, 8, 200, 0.5, errors=1)]
    assert recommend(rows, ttft_limit_s=2.0) == rows[3]     # 120 tok/s is over the limit; 200 had an error
    assert recommend(rows, ttft_limit_s=3.0) == rows[2]
    assert recommend(rows, ttft_limit_s=0.1) is None


def test_a_tie_goes_to_the_smaller_setting():
    assert recommend([row(16, 1, 4, 50, 1.0), row(8, 1, 4, 50, 1.0), row(8, 2, 4, 50, 1.0)], 2.0).batch_size == 8


def test_applying_keeps_the_serving_settings_except_batch_size_and_workers():
    serving = ModelSettings(min_workers=1, max_workers=3, batch_size=8, max_batch_delay=7, response_timeout=99,
                            continuous_batching=True)
    assert applied_settings(Candidate(16, 2), serving) == ModelSettings(2, 2, 16, 7, 99, True)


def test_chats_in_flight_count_only_live_workers_slots_waiting_and_queued_requests():
    samples = [("llama_slots_active", {"WorkerPid": "11"}, 2.0), ("llama_slots_active", {"WorkerPid": "99"}, 3.0),
               ("llama_requests_waiting", {"WorkerPid": "11"}, 1.0), ("llama_slots_free", {"WorkerPid": "11"}, 6.0)]
    assert chats_in_flight(samples, worker_pids=[11]) == 3           # pid 99 is a dead worker's last gauge
    assert chats_in_flight(samples, worker_pids=[11], pending_requests=2) == 5
    assert chats_in_flight([], worker_pids=[11]) == 0
    assert per_worker_gauge(samples, "llama_slots_free") == {11: 6}


# ---- files ----------------------------------------------------------------------------------

def test_a_saved_run_comes_back_as_the_latest_with_a_csv_table(tmp_path):
    older = TuneRun(model="llama", started="2026-12-02T10:00:00+00:00", plan={}, rows=[row(1, 1, 1, 10, 0.2)])
    newer = TuneRun(model="llama", started="2026-12-02T11:00:00+00:00", plan={"concurrency": [1]},
                    rows=[row(8, 1, 4, 90, 0.8)], state="done")
    other = TuneRun(model="llama-big", started="2026-12-02T12:00:00+00:00", plan={})
    for run in (older, newer, other):
        json_path, csv_path = save_run(tmp_path, run)
    assert latest_run(tmp_path, "llama") == newer
    assert latest_run(tmp_path, "mistral") is None
    lines = (tmp_path / "tuning" / "llama-20261202110000.csv").read_text().splitlines()
    assert lines[0].startswith("batch_size,workers,concurrency,") and lines[1].startswith("8,1,4,")
    (tmp_path / "tuning" / "llama-20261202130000.json").write_text("{half")   # a broken newest file is skipped
    assert latest_run(tmp_path, "llama") == newer


# ---- the run --------------------------------------------------------------------------------

def test_a_run_measures_each_candidate_at_each_level_and_leaves_nothing_registered(tmp_path):
    fake_archive(tmp_path / "llama.mar")
    client = FakeClient(tmp_path)
    load, specs = fake_load(tokens_per_request=10, seconds=2.0)
    progress = []
    run = run_tuning(client, tmp_path, plan(max_tokens=16), "llama.mar", ModelSettings(max_batch_delay=7),
                     cancel=threading.Event(), on_progress=lambda f, t: progress.append((f, t)), load=load)
    assert run.state == "done" and [(r.batch_size, r.concurrency) for r in run.rows] == [(1, 1), (1, 2), (4, 1), (4, 2)]
    assert [r.tokens_per_s for r in run.rows] == [5.0, 10.0, 5.0, 10.0]
    assert client.calls == ["register tune-b1-w1", "unregister tune-b1-w1", "register tune-b4-w1",
                            "unregister tune-b4-w1"]
    assert sorted(p.name for p in tmp_path.glob("*.mar")) == ["llama.mar"]   # candidate copies deleted
    assert specs[0].url == "http://127.0.0.1:1/predictions/llama/tune-b1-w1" and specs[0].key == "ik"
    # Each candidate is warmed up with one short answer per worker, then measured at each level.
    assert [(s.concurrency, s.max_tokens) for s in specs] == [(1, 4), (1, 16), (2, 16)] * 2
    fractions = [f for f, _ in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_a_candidate_whose_archive_is_in_the_version_has_its_settings(tmp_path):
    fake_archive(tmp_path / "llama.mar")
    client = FakeClient(tmp_path)
    seen = []
    load, _ = fake_load()

    def load_and_look(spec, should_stop):
        seen.append(dict(client.registered))
        return load(spec, should_stop)
    run_tuning(client, tmp_path, plan(), "llama.mar", ModelSettings(max_batch_delay=7, continuous_batching=True),
               cancel=threading.Event(), load=load_and_look)
    assert seen[0] == {"tune-b1-w1": ModelSettings(1, 1, 1, 7, 300, True)}


def test_a_candidate_that_fails_to_load_is_a_row_with_its_reason_and_the_run_goes_on(tmp_path):
    fake_archive(tmp_path / "llama.mar")
    client = FakeClient(tmp_path, broken={"tune-b1-w1"})
    run = run_tuning(client, tmp_path, plan(), "llama.mar", ModelSettings(), cancel=threading.Event(),
                     load=fake_load()[0])
    assert [r.error for r in run.rows[:2]] == ["Failed to load the model"] * 2
    assert [r.ok for r in run.rows[2:]] == [1, 2] and client.registered == {}
    assert not (tmp_path / "llama-tune-b1-w1.mar").exists()


def test_cancelling_stops_the_load_and_the_run_and_unregisters_the_candidate(tmp_path):
    fake_archive(tmp_path / "llama.mar")
    client = FakeClient(tmp_path)
    cancel = threading.Event()
    asked = []

    def load(spec, should_stop):
        if spec.max_tokens == 4:          # the warm-up
            return [], 0.1
        cancel.set()                      # the operator presses Cancel during the first level
        asked.append(should_stop())
        return [RequestResult(0, 0, error=STOPPED, start=0, end=1)], 1.0
    run = run_tuning(client, tmp_path, plan(), "llama.mar", ModelSettings(), cancel=cancel, load=load)
    assert asked == [True] and run.state == "cancelled" and len(run.rows) == 1 and run.rows[0].error == STOPPED
    assert client.registered == {} and client.calls == ["register tune-b1-w1", "unregister tune-b1-w1"]


def test_a_level_is_cut_off_at_its_time_limit(tmp_path):
    fake_archive(tmp_path / "llama.mar")
    stops = []

    def load(spec, should_stop):
        if spec.max_tokens == 4:          # the warm-up
            return [], 0.1
        stops.append(should_stop())
        import time
        time.sleep(0.3)
        stops.append(should_stop())
        return [], 0.3
    p = TunePlan(model="llama", candidates=(Candidate(1, 1),), concurrency=(1,), level_limit_s=0.1)
    run_tuning(FakeClient(tmp_path), tmp_path, p, "llama.mar", ModelSettings(), cancel=threading.Event(), load=load)
    assert stops == [False, True]


def test_a_job_runs_in_the_background_saves_its_run_and_shows_progress(tmp_path):
    fake_archive(tmp_path / "llama.mar")
    client = FakeClient(tmp_path)
    job = TuningJob(lambda cancel, progress: tune_and_save(
        client, tmp_path, tmp_path / "run", plan(), "llama.mar", ModelSettings(), cancel, progress,
        load=fake_load()[0])).start()
    job.thread.join(timeout=10)
    assert not job.running and job.error is None and job.run.state == "done"
    assert (job.fraction, job.text) == (1.0, "Done")
    assert latest_run(tmp_path / "run", "llama").rows == job.run.rows


def test_a_failed_job_says_why_and_its_run_is_saved(tmp_path):
    fake_archive(tmp_path / "llama.mar")

    def load(spec, should_stop):
        raise RuntimeError("the load generator broke")
    job = TuningJob(lambda cancel, progress: tune_and_save(
        FakeClient(tmp_path), tmp_path, tmp_path / "run", plan(), "llama.mar", ModelSettings(), cancel, progress,
        load=load)).start()
    job.thread.join(timeout=10)
    assert job.error == "RuntimeError: the load generator broke"
    saved = latest_run(tmp_path / "run", "llama")
    assert saved.state == "failed" and "the load generator broke" in saved.message


def test_the_estimate_uses_the_servers_own_worker_load_time_and_recent_speed():
    samples = [("WorkerLoadTime", {"WorkerName": "W-9000"}, 4000.0), ("WorkerLoadTime", {"WorkerName": "W-9001"}, 9000.0)]
    assert load_estimate_s(samples, archive_mb=200) == 1 + 9 + REGISTER_S
    assert load_estimate_s([], archive_mb=0) == LOAD_ESTIMATE_S + REGISTER_S
    assert expected_level_s(max_tokens=64, requests_per_stream=2, tokens_per_s=32) == 2 * (2 + 1)
    assert expected_level_s(max_tokens=40, requests_per_stream=1, tokens_per_s=None) == 3
    assert expected_level_s(40, 1, None, concurrency=9, slots=4) == 3 * 3   # 9 chats on 4 slots: three rounds
