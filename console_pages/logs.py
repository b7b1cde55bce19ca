"""Logs: TorchServe's and its workers' log lines, per model and worker, filtered by level and
text, newest first; a failed request's id leads to all of its lines."""

import pandas as pd
import streamlit as st

from chatstack.server_logs import LEVELS, failed_requests, filter_entries, read_entries, request_entries, workers_of
from console_pages.shared import console_process

ALL = "All"

# ---- state
process = console_process()

# ---- read
entries = read_entries(process.log_dir)
models = workers_of(entries)
failed = failed_requests(entries)

# ---- draw
st.caption(f"From `{process.log_dir}` (ts_log.log: the server; model_log.log: the workers; access_log.log: each "
           "API call and its status), newest first. "
           "A worker's traceback is one ERROR entry.")
if not entries:
    st.info("No log lines yet: TorchServe writes them once it has started.")
    st.stop()
f1, f2, f3 = st.columns([1, 1, 2])
model = f1.selectbox("Model", [ALL, *models], key="log_model")
worker = f2.selectbox("Worker", [ALL, *models.get(model, [])], key="log_worker", disabled=model == ALL)
levels = f3.multiselect("Levels", LEVELS, default=["ERROR", "WARN", "INFO"], key="log_levels")
text = st.text_input("Lines holding (any case; a request id works too)", key="log_text")
shown = filter_entries(entries, None if model == ALL else model, None if worker == ALL else worker, levels, text)
limit = st.session_state.get("log_lines", 40) * 5
count = f"**{len(shown)} {'entry' if len(shown) == 1 else 'entries'}**"
st.markdown(count + (f" (the newest {limit} shown)" if len(shown) > limit else ""))
st.dataframe(pd.DataFrame([{"time": e.when.strftime("%H:%M:%S.%f")[:-3], "level": e.level, "model": e.model or "",
                            "worker": e.worker or "", "request id": e.request_id or "", "message": e.first_line}
                           for e in shown[:limit]], columns=["time", "level", "model", "worker", "request id",
                                                             "message"]),
             hide_index=True, width="stretch")

st.subheader("Failed requests")
if not failed:
    st.caption("No error names a request.")
else:
    asked = st.query_params.get("request")   # the Logs page's address can name one: /logs?request=<id>
    ids = [e.request_id for e in failed]
    picked = st.selectbox("Request (newest first)", ids, index=ids.index(asked) if asked in ids else 0,
                          format_func=lambda rid: next(f"{rid} · {e.when:%H:%M:%S} · {e.model or 'server'} · "
                                                       f"{e.first_line[:80]}" for e in failed if e.request_id == rid),
                          key="log_request")
    st.code("\n".join(f"{e.when:%H:%M:%S.%f}"[:-3] + f" [{e.level}] {e.worker or e.thread}: {e.text}"
                      for e in request_entries(entries, picked)), language=None)
