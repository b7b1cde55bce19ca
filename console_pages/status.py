"""Status: every worker with its pid and memory, each version's job queue, and why the
last worker that died did so; refreshed every few seconds."""

from datetime import datetime

import pandas as pd
import streamlit as st

from chatstack.console_display import QUEUE_COLUMNS, WORKER_COLUMNS, queue_rows, worker_rows
from chatstack.metrics_history import slots_by_worker
from chatstack.torchserve_client import TorchServeError
from chatstack.worker_failures import last_worker_failure
from console_pages.shared import console_process, read_models

# ---- state
process = console_process()
refresh_s = st.session_state["refresh_s"]


@st.fragment(run_every=refresh_s)
def live_status():
    # ---- read
    models, not_listed = read_models(process, process.client(timeout=5))
    running = process.is_running()
    failure = last_worker_failure(process.log_dir)
    try:
        slots = slots_by_worker(process.client(timeout=5).metric_samples()) if running else {}
    except TorchServeError:
        slots = {}   # the table still shows the workers; only their slots are unknown

    # ---- draw
    if not_listed:
        st.warning(not_listed)
        return
    st.caption(f"Read from the server at {datetime.now():%H:%M:%S}, every {refresh_s} s")
    if not running:
        st.info("TorchServe is stopped.")
    else:
        rows = worker_rows(models, slots)
        st.markdown(f"**Workers** — {sum(r['status'] == 'READY' for r in rows)} READY of {len(rows)}")
        st.dataframe(pd.DataFrame(rows, columns=WORKER_COLUMNS), hide_index=True)
        st.markdown("**Job queue**")
        st.dataframe(pd.DataFrame(queue_rows(models), columns=QUEUE_COLUMNS), hide_index=True)
    if failure:
        st.markdown("**Last worker failure**")
        st.warning(failure.summary())
        with st.expander("Last log lines of that worker"):
            st.code("\n".join(failure.last_lines) or "(none)", language=None)


live_status()
