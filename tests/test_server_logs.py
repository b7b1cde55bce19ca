"""chatstack.server_logs over TorchServe's own log lines (tests/data/server_logs: a real run's
ts_log.log, model_log.log and access_log.log with a start, a chat, two 400s and a worker killed
by SIGSEGV mid-answer; model_log.log also holds a request's failure as the handler's
logger.exception prints it in a worker, one log line per traceback line), and the Logs page."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from chatstack.server_logs import (failed_requests, filter_entries, read_entries, request_entries, workers_of)
from conftest import ROOT

LOGS = Path(__file__).parent / "data" / "server_logs"
FAILED_ID = "5d0c6a8e-2f4b-4a57-9c1e-0b7f1d2e3a4c"


@pytest.fixture(scope="module")
def entries():
    return read_entries(LOGS)


def test_entries_come_newest_first_from_all_three_logs(entries):
    assert [e.when for e in entries] == sorted((e.when for e in entries), reverse=True)
    assert {e.source for e in entries} == {"server", "worker", "access"}
    assert entries[-1].source == "server"   # the frontend writes first


def test_a_worker_traceback_is_one_error_entry_holding_its_request_id(entries):
    failure = next(e for e in entries if e.first_line == f"request {FAILED_ID} failed")
    assert failure.level == "ERROR" and failure.request_id == FAILED_ID
    assert (failure.model, failure.version, failure.worker) == ("llama", "1.0", "W-9000")
    assert failure.text.count("\n") == 7 and failure.text.endswith("is already in use")
    assert not any(e.first_line.startswith(("Traceback", "  File", "ValueError")) for e in entries)


def test_a_crash_is_one_error_entry_with_its_stack(entries):
    crash = next(e for e in entries if e.first_line == "Fatal Python error: Segmentation fault")
    assert crash.level == "ERROR" and "llama_engine.py\", line 477 in step" in crash.text
    assert "Extension modules:" in crash.text and crash.request_id is None
    assert not any(e.first_line.startswith("Current thread") for e in entries)


def test_filters_by_model_worker_level_and_text(entries):
    assert workers_of(entries) == {"llama": ["W-9000"]}
    errors = filter_entries(entries, levels=["ERROR"])
    assert [e.first_line for e in errors] == ["Fatal Python error: Segmentation fault", f"request {FAILED_ID} failed"]
    refused = filter_entries(entries, model="llama", levels=["WARN"])
    assert [e.text.split(" (from")[0] for e in refused] == ["POST /predictions/llama → 400 in 26 ms",
                                                             "POST /predictions/llama → 400 in 10 ms"]
    assert filter_entries(entries, model="llama", worker="W-9001") == []
    assert all("worker started" in e.text.lower() for e in filter_entries(entries, text="TORCH WORKER STARTED"))
    assert len(filter_entries(entries, text="torch worker started")) == 2   # the first worker and its restart
    assert len(filter_entries(entries, model="llama", worker="W-9000")) < len(filter_entries(entries, model="llama"))


def test_a_failed_request_leads_to_all_its_lines(entries):
    assert [e.request_id for e in failed_requests(entries)] == [FAILED_ID]
    lines = request_entries(entries, FAILED_ID)
    assert len(lines) == 1 and "Traceback (most recent call last):" in lines[0].text


def test_a_log_cut_at_the_start_or_missing_gives_no_half_line(tmp_path, monkeypatch):
    import chatstack.server_logs as server_logs
    shutil.copy(LOGS / "model_log.log", tmp_path / "model_log.log")
    monkeypatch.setattr(server_logs, "TAIL_BYTES", 500)
    tail = read_entries(tmp_path)
    assert tail and all(e.source == "worker" for e in tail) and len(tail) < 5
    assert read_entries(tmp_path / "missing") == []


def test_the_logs_page_filters_and_shows_a_failed_request(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    shutil.copytree(LOGS, tmp_path / "run" / "logs")
    monkeypatch.setenv("CHATSTACK_RUN_DIR", str(tmp_path / "run"))
    at = AppTest.from_file(str(ROOT / "server_app.py"), default_timeout=60)
    at.run()
    at.switch_page("console_pages/logs.py").run()
    assert not at.exception
    table = at.dataframe[0].value
    assert table["time"].tolist() == sorted(table["time"], reverse=True)
    at.multiselect(key="log_levels").set_value(["ERROR"]).run()
    assert at.dataframe[0].value["message"].tolist() == ["Fatal Python error: Segmentation fault",
                                                         f"request {FAILED_ID} failed"]
    assert at.dataframe[0].value["request id"].tolist() == ["", FAILED_ID]
    assert at.selectbox(key="log_request").value == FAILED_ID
    assert "ValueError: request id" in at.code[0].value
    at.text_input(key="log_text").input("segmentation").run()
    assert at.dataframe[0].value["message"].tolist() == ["Fatal Python error: Segmentation fault"]
