"""Tuning: scale the serving version's workers live; change its batch settings without
dropping chats (a version swap)."""

import streamlit as st

from chatstack.model_archive import ModelSettings
from chatstack.model_registry import scale_workers, swap_settings
from console_pages.shared import console_process, read_models, run_action

# ---- state
process = console_process()
client = process.client(timeout=30)

# ---- read
models, not_listed = read_models(process, client)
defaults = {m.name: m for m in models if m.is_default}

# ---- draw
if not_listed:
    st.error(not_listed)
if not defaults:
    st.info("Register a model first (Models page).")
    st.stop()
name = st.selectbox("Model", list(defaults), key="tune_model")
current = defaults[name]
st.caption(f"Serving version {current.version}: {len(current.workers)} worker(s), "
           f"batch size {current.settings.batch_size}, batch delay {current.settings.max_batch_delay} ms, "
           f"continuous batching {'on' if current.settings.continuous_batching else 'off'}")

st.subheader("Workers (live)")
# Forms: the inputs rerun the page only when submitted, not at every change.
with st.form("scale_form"):
    w1, w2 = st.columns(2)
    min_workers = w1.number_input("Min workers", 0, 16, current.settings.min_workers, key="min_workers")
    max_workers = w2.number_input("Max workers", 0, 16, current.settings.max_workers, key="max_workers")
    scale = st.form_submit_button("Scale workers", key="scale")

st.subheader("Batching (without dropping chats)")
st.caption("TorchServe cannot change these on a running model: the console registers them as a new "
           "version, waits for its workers, makes it the default, lets chats in flight on the old "
           "version finish, then unregisters the old version.")
with st.form("batching_form"):
    b1, b2, b3 = st.columns(3)
    batch = b1.number_input("Batch size", 1, 64, current.settings.batch_size, key="tune_batch")
    delay = b2.number_input("Max batch delay (ms)", 0, 10_000, current.settings.max_batch_delay, key="tune_delay")
    continuous = b3.checkbox("Continuous batching", current.settings.continuous_batching, key="tune_continuous")
    swap = st.form_submit_button("Apply batch settings", key="swap")

# ---- act
if scale:
    run_action(f"Scaling {name} to {min_workers}–{max_workers} workers", lambda step: scale_workers(
        client, name, int(min_workers), int(max_workers), version=current.version))
if swap:
    workers_now = max(1, len(current.workers))
    wanted = ModelSettings(min_workers=workers_now, max_workers=max(workers_now, current.settings.max_workers),
                           batch_size=batch, max_batch_delay=delay, response_timeout=current.settings.response_timeout,
                           continuous_batching=continuous)
    run_action(f"Changing batch settings of {name}", lambda step: "Now serving version "
               + swap_settings(client, process.model_store, name, wanted, on_step=step))
