"""Status: how full each worker is (the capacity view: slots by state, tokens in context,
requests waiting, memory and CPU), each version's job queue, and why the last worker that
died did so; refreshed every few seconds (15 s by default, so an open page stays cheap)."""

from datetime import datetime

import pandas as pd
import streamlit as st

from chatstack.capacity import worker_loads
from chatstack.console_display import (CAPACITY_COLUMNS, QUEUE_COLUMNS, SLOT_COLUMNS, capacity_rows, queue_rows,
                                       slot_rows, slots_summary)
from chatstack.process_stats import CpuMeter
from chatstack.torchserve_client import TorchServeError
from chatstack.worker_failures import last_worker_failure
from console_pages.shared import console_process, read_models


@st.cache_resource
def cpu_meter() -> CpuMeter:
    # One per console process: CPU use is measured between two refreshes of any session.
    return CpuMeter()


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
        samples = process.client(timeout=5).metric_samples() if running else []
    except TorchServeError:
        samples = []   # the table still shows the workers; only their slots are unknown
    loads = worker_loads(models, samples, cpu_meter())

    # ---- draw
    if not_listed:
        st.warning(not_listed)
        return
    st.caption(f"Read from the server at {datetime.now():%H:%M:%S}, every {refresh_s} s")
    if not running:
        st.info("TorchServe is stopped.")
    else:
        ready = sum(w.status == "READY" for w in loads)
        st.markdown(f"**Workers** — {ready} READY of {len(loads)}")
        st.dataframe(pd.DataFrame(capacity_rows(loads), columns=CAPACITY_COLUMNS), hide_index=True)
        slots = slot_rows(loads)
        if slots:
            st.markdown("**Slots** — each worker answers as many chats at once as it has slots (its batch size)")
            for w in loads:
                if w.slots:
                    st.markdown(f"{w.model} {w.version}, worker {w.worker}: {slots_summary(w)}")
            # A table, not a data grid: a few rows, drawn as text (and cheap to redraw).
            st.table(pd.DataFrame(slots, columns=SLOT_COLUMNS).set_index(["worker", "slot"]))
        st.markdown("**Job queue** — requests TorchServe holds for each version's workers")
        st.dataframe(pd.DataFrame(queue_rows(models), columns=QUEUE_COLUMNS), hide_index=True)
    if failure:
        st.markdown("**Last worker failure**")
        st.warning(failure.summary())
        with st.expander("Last log lines of that worker"):
            st.code("\n".join(failure.last_lines) or "(none)", language=None)


live_status()
