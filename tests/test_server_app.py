"""The admin console (server_app.py and its pages) through Streamlit's AppTest, and the logic behind it."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from streamlit.testing.v1 import AppTest

from chatstack import metric_names
from chatstack.console_auth import PASSWORD_ENV, SignIn, is_loopback, password_matches, sign_in_method
from chatstack.console_config import ConsoleConfig
from chatstack.console_display import format_duration, mask_key
from chatstack.gateway_process import GatewayProcess
from chatstack.metrics_history import MetricsHistory, MetricsSnapshot
from chatstack.model_archive import (ArchiveError, ModelSettings, edit_model_config, list_archives, next_version,
                                     package_variant, read_archive)
from chatstack.model_registry import register_archive
from chatstack.torchserve_client import TorchServeError
from chatstack.worker_failures import last_worker_failure
from conftest import ROOT, free_port

pytestmark = pytest.mark.timeout(600)

APP = str(ROOT / "server_app.py")


def console_ports() -> str:
    return ",".join(str(free_port()) for _ in range(6))


def open_app(page: str = "server") -> AppTest:
    at = AppTest.from_file(APP, default_timeout=600)
    at.run()
    if page != "server":
        at.switch_page(f"console_pages/{page}.py").run()
    assert not at.exception, at.exception
    return at


def texts(elements) -> list[str]:
    return [e.value for e in elements]


@pytest.fixture(scope="module")
def console(session_dir):
    """The console's environment: an empty model store, its own run folder and free ports."""
    store, run_dir = session_dir / "console_store", session_dir / "console_run"
    store.mkdir()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CHATSTACK_MODEL_STORE", str(store))
        env.setenv("CHATSTACK_RUN_DIR", str(run_dir))
        env.setenv("CHATSTACK_PORTS", console_ports())
        # Workers inherit TorchServe's environment: with faulthandler on, a worker killed by a
        # signal says which in its log, so the status page can tell why it died.
        env.setenv("PYTHONFAULTHANDLER", "1")
        yield ConsoleConfig.from_env()
        ConsoleConfig.from_env().process().stop()


# ---- the app with a real TorchServe ---------------------------------------------------------
# These run in order on one console: stopped -> started -> used -> stopped.

def test_a_stopped_server_shows_stopped_and_stop_says_it_was_not_running(console):
    at = open_app()
    assert at.metric[0].value == "Stopped"
    at.button(key="stop").click().run()
    assert texts(at.success) == ["TorchServe was not running"]
    assert not at.error and not at.exception


def test_first_start_builds_the_default_archive_and_registers_it(console):
    assert list_archives(console.model_store) == []
    at = open_app()
    at.button(key="start").click().run()
    assert not at.error, texts(at.error)
    assert texts(at.success) == ["TorchServe is running"]
    assert at.metric[0].value == "Running"
    assert at.metric[1].value == "Healthy"
    assert at.metric[2].value == "0.12.0"
    assert [a.file for a in list_archives(console.model_store)] == ["llama.mar"]
    at.switch_page("console_pages/models.py").run()
    registered = next(df.value for df in at.dataframe if "default" in df.value.columns)
    assert registered[["model", "version", "default"]].values.tolist() == [["llama", "1.0", True]]


def test_starting_twice_says_it_is_already_running(console):
    at = open_app()
    at.button(key="start").click().run()
    assert len(at.error) == 1 and at.error[0].value.startswith("TorchServe is already running (pid ")
    assert at.metric[0].value == "Running"


def test_status_page_lists_each_worker_with_pid_and_memory(console):
    at = open_app("status")
    workers = next(df.value for df in at.dataframe if "worker" in df.value.columns)
    assert workers["status"].tolist() == ["READY"]
    assert int(workers["pid"].iloc[0]) > 0 and float(workers["memory MB"].iloc[0].replace(",", "")) > 0
    queue = next(df.value for df in at.dataframe if "pending requests" in df.value.columns)
    assert queue["pending requests"].tolist() == [0]


def test_registering_a_registered_archive_shows_torchserve_message(console):
    at = open_app("models")
    register = next(b for b in at.button if b.label == "Register")
    register.click().run()
    assert texts(at.error) == ["Model version 1.0 is already registered for model llama"]
    assert not at.exception


def test_adding_a_file_outside_the_model_folders_is_refused_before_packaging(console):
    at = open_app("models")
    at.text_input(key="add_path").input("/etc/../etc/passwd")
    at.text_input(key="add_name").input("passwd")
    next(b for b in at.button if b.label == "Package and register").click().run()
    assert texts(at.error) == [f"model file: /etc/../etc/passwd is outside the folders the console may read models "
                               f"from ({ROOT / 'models'}; CHATSTACK_MODEL_FOLDERS sets them)"]
    assert not (console.model_store / "passwd.mar").exists() and not at.exception


def test_adding_a_model_under_a_name_in_use_is_refused(console):
    at = open_app("models")
    at.selectbox(key="add_source").set_value(str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    at.text_input(key="add_name").input("llama")
    next(b for b in at.button if b.label == "Package and register").click().run()
    assert texts(at.error) == ["name: a model called 'llama' already exists (registered, or an archive in the "
                               "model store); choose another name"]


def test_the_page_follows_changes_made_behind_its_back(console):
    client = console.process().client(timeout=300)
    at = open_app("models")
    assert "No model is registered." not in texts(at.info)
    client.unregister("llama", "1.0")  # someone else, e.g. with curl
    # Clicking reruns the page, which first re-reads the server: the model is gone, so
    # the page says so instead of acting on what it showed before.
    at.button(key="unregister").click().run()
    assert not at.exception and not at.error
    assert "No model is registered." in texts(at.info)
    at.switch_page("console_pages/tuning.py").run()
    assert "Register a model first (Models page)." in texts(at.info)
    client.register("llama.mar")
    at.switch_page("console_pages/models.py").run()
    assert "No model is registered." not in texts(at.info)


def test_the_inference_key_is_masked_until_asked(console):
    key = json.loads(console.process().key_file.read_text())["inference"]["key"]
    at = open_app("security")
    shown = texts(at.text_input)
    assert key not in shown and mask_key(key) in shown
    at.toggle(key="show_key").set_value(True).run()
    assert key in texts(at.text_input)


def test_rotating_the_inference_key_issues_a_new_one(console):
    key_file = console.process().key_file
    old = json.loads(key_file.read_text())["inference"]["key"]
    at = open_app("security")
    at.button(key="rotate_inference").click().run()
    assert not at.error, texts(at.error)
    new = json.loads(key_file.read_text())["inference"]["key"]
    assert new != old
    assert console.process().client().ping() == "Healthy"


def test_metrics_page_shows_handler_counters(console):
    client = console.process().client(timeout=120)
    client.chat("llama", [{"role": "user", "content": "Hi"}], max_tokens=8)
    at = open_app("metrics")
    labels = [m.label for m in at.metric]
    assert {"Generated tokens/s (now)", "Tokens generated", "Slots active / free"} <= set(labels)
    counters = next(df.value for df in at.dataframe if "metric" in df.value.columns)
    assert "llama_tokens_generated" in counters["metric"].tolist()


def test_status_page_says_why_a_worker_died(console):
    process = console.process()
    client = process.client(timeout=300)
    assert last_worker_failure(process.log_dir) is None
    pid = client.describe_model("llama")[0]["workers"][0]["pid"]
    assert pid > 1  # TorchServe says -1 for a worker without a process, and kill(-1) signals every process
    os.kill(pid, signal.SIGSEGV)
    deadline = time.monotonic() + 60
    while (failure := last_worker_failure(process.log_dir, "llama")) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert failure is not None and failure.model == "llama"
    assert failure.cause == "killed by signal 11 (SIGSEGV)"
    assert failure.phase == "serving"
    at = open_app("status")
    assert any("killed by signal 11 (SIGSEGV)" in w for w in texts(at.warning)), texts(at.warning)
    client.wait_for_workers("llama", timeout=300)  # TorchServe starts a new one


def test_stopping_from_the_page_stops_the_server(console):
    at = open_app()
    at.button(key="stop").click().run()
    assert texts(at.success) == ["TorchServe stopped"]
    assert at.metric[0].value == "Stopped"
    assert not console.process().is_running()


def test_a_port_in_use_shows_the_reason_instead_of_starting(session_dir, monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("CHATSTACK_MODEL_STORE", str(session_dir / "console_store"))
        monkeypatch.setenv("CHATSTACK_RUN_DIR", str(session_dir / "port_run"))
        monkeypatch.setenv("CHATSTACK_PORTS", f"{port},{free_port()},{free_port()},{free_port()},{free_port()}")
        at = open_app()
        at.button(key="start").click().run()
    assert texts(at.error) == [f"port {port} (inference API) is already in use on 127.0.0.1: "
                               "another TorchServe or program is listening there"]
    assert at.metric[0].value == "Stopped"


# ---- the logic behind the app (no server) ------------------------------------------------------

def fake_archive(path: Path, version="1.0", config="minWorkers: 1 # workers\nbatchSize: 8\n"
                 "continuousBatching: true\nhandler:\n  n_ctx: 2048\n") -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("MAR-INF/MANIFEST.json", json.dumps(
            {"model": {"modelName": "llama", "modelVersion": version, "configFile": "model-config.yaml"}}))
        z.writestr("model-config.yaml", config)
        z.writestr("model.gguf", b"GGUF" + bytes(1000))
    return path


def test_editing_the_model_config_changes_values_and_keeps_comments():
    text = (ROOT / "model-config.yaml").read_text()
    edited = edit_model_config(text, ModelSettings(batch_size=3, max_batch_delay=40, continuous_batching=False))
    assert "batchSize: 3 " in edited and "# requests in flight per worker" in edited
    assert "continuousBatching: false # one handler call" in edited
    assert "maxBatchDelay: 40 " in edited
    assert edited.count("\n") == text.count("\n")


def test_a_variant_archive_is_a_new_version_with_the_new_settings(tmp_path):
    fake_archive(tmp_path / "llama.mar")
    info = package_variant(tmp_path, "llama.mar", "2.0", ModelSettings(batch_size=2, continuous_batching=False))
    assert (info.file, info.model_name, info.version) == ("llama-v2.0.mar", "llama", "2.0")
    assert (info.settings.batch_size, info.settings.continuous_batching) == (2, False)
    with zipfile.ZipFile(tmp_path / info.file) as z, zipfile.ZipFile(tmp_path / "llama.mar") as original:
        assert z.read("model.gguf") == original.read("model.gguf")
        assert "n_ctx: 2048" in z.read("model-config.yaml").decode()
    assert read_archive(tmp_path / "llama.mar").version == "1.0"
    with pytest.raises(ArchiveError, match="already exists"):
        package_variant(tmp_path, "llama.mar", "2.0", ModelSettings())


def test_next_version_is_above_every_existing_one():
    assert next_version(["1.0"]) == "2.0"
    assert next_version(["1.0", "3.0", "2.5-cb300"]) == "4.0"
    assert next_version([]) == "1.0"


def test_registering_anything_but_a_store_archive_is_refused_before_asking_the_server(tmp_path):
    for url in ("http://example.com/llama.mar", "file:///tmp/llama.mar", "../llama.mar"):
        with pytest.raises(TorchServeError, match="only archives in the model store"):
            register_archive(None, tmp_path, url, ModelSettings())


def test_the_metric_names_the_console_computes_with_are_declared_in_metrics_yaml():
    declared = yaml.safe_load((ROOT / "metrics.yaml").read_text())["model_metrics"]
    declared = {m["name"] for kind in declared.values() for m in kind}
    used = {value for name, value in vars(metric_names).items()
            if name.isupper() and isinstance(value, str) and name != "HANDLER_PREFIX"}
    assert used and used <= declared
    names = metric_names.declared_metrics()
    assert set(names.handler_counters + names.handler_gauges) == {n for n in declared if n.startswith("llama_")}
    assert "ts_inference_requests_total" in names.torchserve_counters and "QueueTime" in names.torchserve_gauges


def test_metrics_history_derives_tokens_per_second_from_counter_deltas():
    history = MetricsHistory()
    history.add(MetricsSnapshot(100.0, {"llama_tokens_generated": 50.0}, {}))
    history.add(MetricsSnapshot(102.0, {"llama_tokens_generated": 90.0}, {}))
    assert history.rate("llama_tokens_generated") == 20.0
    assert [r["generated tokens/s"] for r in history.rows()] == [None, 20.0]
    history.add(MetricsSnapshot(103.0, {"llama_tokens_generated": 5.0}, {}))  # the server restarted
    assert len(history.snapshots) == 1


def test_console_config_reads_folders_and_ports_from_the_environment():
    config = ConsoleConfig.from_env({"CHATSTACK_RUN_DIR": "/tmp/r", "CHATSTACK_MODEL_STORE": "/tmp/s",
                                     "CHATSTACK_PORTS": "1,2,3,4,5,6"})
    process = config.process()
    assert (process.run_dir, process.model_store) == (Path("/tmp/r"), Path("/tmp/s"))
    assert [process.address(k) for k in ("inference", "management", "metrics")] == [
        "http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"]
    assert (process.props["grpc_inference_port"], process.props["grpc_management_port"]) == ("4", "5")
    assert GatewayProcess(process).base_url == "http://127.0.0.1:6/v1"   # a second console's gateway
    five = ConsoleConfig.from_env({"CHATSTACK_PORTS": "1,2,3,4,5"}).process()
    assert GatewayProcess(five).address == "http://127.0.0.1:8000"        # the config's, as before
    for wrong in ("8080", "1,2,3,4", "1,2,3,4,5,6,7", "1,2,x"):
        with pytest.raises(ValueError, match="CHATSTACK_PORTS"):
            ConsoleConfig.from_env({"CHATSTACK_PORTS": wrong})


def test_durations_read_like_uptimes():
    assert format_duration(None) == "–"
    assert format_duration(42) == "42s"
    assert format_duration(3 * 3600 + 5 * 60 + 1) == "3h 5m 1s"


# ---- sign-in when the console listens beyond this machine ----------------------------------------

@pytest.mark.parametrize("address, loopback", [("127.0.0.1", True), ("127.0.1.1", True), ("::1", True),
                                               ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                               ("", False), (None, False), ("10.1.2.3", False),
                                               ("console.example.com", False)])
def test_only_loopback_addresses_count_as_this_machine(address, loopback):
    assert is_loopback(address) is loopback


def test_the_way_to_sign_in_follows_the_address_and_the_configuration():
    password = {PASSWORD_ENV: "s3cret"}
    assert sign_in_method("127.0.0.1", password, oidc_configured=True) is SignIn.NOT_NEEDED
    assert sign_in_method("0.0.0.0", password, oidc_configured=True) is SignIn.OIDC
    assert sign_in_method("0.0.0.0", password, oidc_configured=False) is SignIn.PASSWORD
    assert sign_in_method("0.0.0.0", {PASSWORD_ENV: ""}, oidc_configured=False) is SignIn.UNCONFIGURED
    assert password_matches("s3cret", "s3cret") and not password_matches("s3cre", "s3cret")
    assert not password_matches("", "")   # an empty password never signs anyone in


@pytest.fixture
def exposed(monkeypatch, tmp_path):
    """The console bound to every interface (as `streamlit run --server.address 0.0.0.0`), with a
    stopped server of its own."""
    from streamlit import config
    before = config.get_option("server.address")
    config.set_option("server.address", "0.0.0.0")
    monkeypatch.setenv("CHATSTACK_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    yield monkeypatch
    config.set_option("server.address", before)


def test_an_exposed_console_without_a_sign_in_shows_nothing_but_how_to_set_one(exposed):
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert texts(at.error) == ["This console listens on 0.0.0.0, beyond this machine, and no sign-in is set up: set "
                               f"{PASSWORD_ENV} in its environment, or [auth] in .streamlit/secrets.toml for "
                               "st.login, or bind it to 127.0.0.1."]
    assert not at.metric and not at.button and not at.sidebar.markdown


def test_an_exposed_console_asks_for_the_password_before_any_page(exposed):
    exposed.setenv(PASSWORD_ENV, "s3cret")
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.metric and [b.label for b in at.button] == ["Sign in"]
    at.switch_page("console_pages/security.py").run()   # a page's address does not get past it
    assert not at.text_input(key="sign_in_password").value and not at.toggle
    at.text_input(key="sign_in_password").input("guess")
    at.button[0].click().run()
    assert texts(at.error) == ["Wrong password."] and not at.metric
    at.text_input(key="sign_in_password").input("s3cret")
    at.button[0].click().run()
    assert not at.error and not at.exception
    assert "No keys: TorchServe is stopped (it writes new keys at each start)." in texts(at.info)
    assert any(b.label == "Sign out" for b in at.sidebar.button)


def test_an_exposed_console_with_st_login_configured_offers_log_in(exposed):
    at = AppTest.from_file(APP, default_timeout=60)
    at.secrets["auth"] = {"redirect_uri": "http://console.example.com/oauth2callback", "cookie_secret": "x",
                          "client_id": "id", "client_secret": "secret",
                          "server_metadata_url": "https://id.example.com/.well-known/openid-configuration"}
    at.run()
    assert [b.label for b in at.button] == ["Log in"] and not at.metric and not at.exception
