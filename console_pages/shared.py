"""What every console page shares: the TorchServe process the console owns, and how an
action runs and reports its outcome."""

from __future__ import annotations

import os
import time
from typing import Callable

import streamlit as st

from chatstack.console_auth import PASSWORD_ENV, SignIn, password_matches, sign_in_method
from chatstack.console_config import ConsoleConfig
from chatstack.metrics_history import MetricsHistory, MetricsSampler, snapshot
from chatstack.model_archive import ArchiveError
from chatstack.model_registry import ModelVersion, registered_models
from chatstack.torchserve_client import TorchServeClient, TorchServeError
from chatstack.torchserve_process import StartError, TorchServeProcess

FAILURES = (StartError, ArchiveError, TorchServeError, ValueError)


@st.cache_resource
def _process(config: str, store: str, run_dir: str, overrides: tuple) -> TorchServeProcess:
    # One object per server for the console's lifetime: it owns the TorchServe child process.
    return TorchServeProcess(config, store, run_dir, overrides=dict(overrides))


def console_process() -> TorchServeProcess:
    """The TorchServe this console runs, as the environment places it (ConsoleConfig)."""
    config = ConsoleConfig.from_env()
    key = (str(config.config), str(config.model_store), str(config.run_dir), config.overrides)
    _sampler(*key)   # the metrics history starts with the console, not when a chart is first opened
    return _process(*key)


@st.cache_resource
def _sampler(config: str, store: str, run_dir: str, overrides: tuple) -> MetricsSampler:
    # One reader per server for the console's lifetime: the charts show the server's history,
    # the same for every session, not what one browser happened to see.
    process = _process(config, store, run_dir, overrides)
    return MetricsSampler(lambda: snapshot(process.client(timeout=5)) if process.is_running() else None).start()


def metrics_history() -> MetricsHistory:
    """The console's history of the server's metrics (MetricsSampler, every 5 s)."""
    config = ConsoleConfig.from_env()
    sampler = _sampler(str(config.config), str(config.model_store), str(config.run_dir), config.overrides)
    sampler.first_sample.wait(timeout=5)   # a page opened as the console starts shows figures at once
    return sampler.history


def require_sign_in() -> None:
    """Stop the run here unless the console listens on loopback only or the visitor signed in
    (chatstack.console_auth says how); server_app.py calls it before any page is drawn."""
    method = sign_in_method(st.get_option("server.address"), os.environ, _oidc_configured())
    if method is SignIn.NOT_NEEDED:
        return
    if method is SignIn.OIDC:
        if not getattr(st.user, "is_logged_in", False):   # absent until st.login has run
            st.title("TorchServe admin console")
            st.button("Log in", on_click=st.login, key="login")
            st.stop()
        st.sidebar.button("Log out", on_click=st.logout, key="logout")
        return
    if method is SignIn.UNCONFIGURED:
        st.error(f"This console listens on {st.get_option('server.address') or 'every interface'}, beyond this "
                 f"machine, and no sign-in is set up: set {PASSWORD_ENV} in its environment, or [auth] in "
                 ".streamlit/secrets.toml for st.login, or bind it to 127.0.0.1.")
        st.stop()
    if st.session_state.get("signed_in"):
        st.sidebar.button("Sign out", on_click=lambda: st.session_state.pop("signed_in", None), key="sign_out")
        return
    st.title("TorchServe admin console")
    with st.form("sign_in_form"):
        password = st.text_input("Password", type="password", key="sign_in_password")
        if st.form_submit_button("Sign in"):
            if password_matches(password, os.environ.get(PASSWORD_ENV, "")):
                st.session_state["signed_in"] = True
                st.rerun()
            time.sleep(1)   # slows guessing
            st.error("Wrong password.")
    st.stop()


def _oidc_configured() -> bool:
    try:
        return "auth" in st.secrets
    except (FileNotFoundError, KeyError, ValueError):   # no secrets.toml: no st.login
        return False


def read_models(process: TorchServeProcess, client: TorchServeClient) -> tuple[list[ModelVersion], str | None]:
    """The registered model versions, and why they could not be listed (None when they could)."""
    if not process.is_running():
        return [], None
    try:
        return registered_models(client), None
    except TorchServeError as e:  # the server went away, or does not answer yet
        return [], f"TorchServe did not list its models: {e.message}"


def run_action(title: str, action: Callable[[Callable[[str], None]], str | None]) -> None:
    """Run `action(on_step)` showing its steps, then rerun the page, which re-reads the
    server and shows the outcome; a failure shows TorchServe's own message."""
    steps: list[str] = []
    with st.status(title, expanded=True) as box:
        def on_step(text: str) -> None:
            steps.append(text)
            box.write(text)
        try:
            message = action(on_step)
        except FAILURES as e:
            box.update(label=f"{title}: failed", state="error")
            st.session_state["outcome"] = ("error", getattr(e, "message", None) or str(e), steps)
            st.rerun()
        box.update(label=f"{title}: done", state="complete")
    st.session_state["outcome"] = ("success", message or f"{title}: done", steps)
    st.rerun()


def show_outcome() -> None:
    """The outcome of the action that ran before this rerun, once."""
    if "outcome" not in st.session_state:
        return
    kind, message, steps = st.session_state.pop("outcome")
    (st.error if kind == "error" else st.success)(message)
    if steps:
        with st.expander("Steps", expanded=kind == "error"):
            st.markdown("\n".join(f"- {s}" for s in steps))
