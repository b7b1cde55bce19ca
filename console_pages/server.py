"""Server: start and stop TorchServe; its state, health, version, uptime, addresses and log."""

import pandas as pd
import streamlit as st

from chatstack.console_display import address_rows, format_duration
from chatstack.model_archive import DEFAULT_ARCHIVE
from chatstack.server_lifecycle import server_status, start_server, stop_server
from console_pages.shared import console_process, run_action

# ---- state
process = console_process()

# ---- read
status = server_status(process)
log = process.log_tail(st.session_state["log_lines"])

# ---- draw
col_state, col_health, col_version, col_uptime = st.columns(4)
col_state.metric("State", "Running" if status.running else "Stopped")
col_health.metric("Health (/ping)", status.health)
col_version.metric("TorchServe version", status.version or "–")
col_uptime.metric("Uptime", format_duration(status.uptime_s))
st.dataframe(pd.DataFrame(address_rows(status.addresses)), hide_index=True)
if status.running:
    st.caption(f"pid {status.pid} · logs in `{process.log_dir}`")

register_default = st.checkbox(f"Register the default model ({DEFAULT_ARCHIVE}) after start", value=True,
                               key="register_default",
                               help="Start first brings back the models, versions, batch settings and workers "
                                    "served before the last stop (TorchServe's snapshot in the run folder); "
                                    "the default model is registered only when that leaves nothing served")
start_col, stop_col, _ = st.columns([1, 1, 4])
start = start_col.button("Start TorchServe", type="primary", key="start")
stop = stop_col.button("Stop TorchServe", key="stop")

st.subheader("Recent log lines")
st.code("\n".join(log) if log else "(no log yet)", language=None)

# ---- act
if start:
    run_action("Starting TorchServe", lambda step: start_server(
        process, register_default=register_default, on_step=step) or "TorchServe is running")
if stop:
    run_action("Stopping TorchServe", lambda step: stop_server(process))
