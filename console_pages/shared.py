"""What every console page shares: the TorchServe process the console owns, and how an
action runs and reports its outcome."""

from __future__ import annotations

from typing import Callable

import streamlit as st

from chatstack.console_config import ConsoleConfig
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
    return _process(str(config.config), str(config.model_store), str(config.run_dir), config.overrides)


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
