"""Models: the archives in the model store, the registered versions; register, unregister,
set the default version."""

import pandas as pd
import streamlit as st

from chatstack.console_display import archive_rows, model_rows
from chatstack.model_archive import DEFAULT_ARCHIVE, ModelSettings, list_archives
from chatstack.model_registry import register_archive
from console_pages.shared import console_process, read_models, run_action

# ---- state
process = console_process()
client = process.client(timeout=30)

# ---- read
archives = list_archives(process.model_store)
running = process.is_running()
models, not_listed = read_models(process, client)

# ---- draw
st.subheader("Archives in the model store")
if archives:
    st.dataframe(pd.DataFrame(archive_rows(archives)), hide_index=True)
else:
    st.info(f"No archives in {process.model_store}: Start builds {DEFAULT_ARCHIVE}, or run ./package_llama.sh")

st.subheader("Registered models")
if not running:
    st.info("TorchServe is stopped: start it on the Server page.")
elif not_listed:
    st.error(not_listed)
elif not models:
    st.info("No model is registered.")
else:
    st.dataframe(pd.DataFrame(model_rows(models)), hide_index=True)

register = wanted = None
if running and archives:
    with st.form("register_form"):
        st.markdown("**Register an archive**")
        archive_file = st.selectbox("Archive", [a.file for a in archives], key="reg_archive")
        chosen = next(a for a in archives if a.file == archive_file).settings
        c1, c2, c3 = st.columns(3)
        workers = c1.number_input("Workers", 1, 16, chosen.min_workers, key="reg_workers")
        batch = c2.number_input("Batch size", 1, 64, chosen.batch_size, key="reg_batch")
        delay = c3.number_input("Max batch delay (ms)", 0, 10_000, chosen.max_batch_delay, key="reg_delay")
        timeout = c1.number_input("Response timeout (s)", 1, 3600, chosen.response_timeout, key="reg_timeout")
        continuous = c2.checkbox("Continuous batching", chosen.continuous_batching, key="reg_continuous")
        register = st.form_submit_button("Register")
        wanted = ModelSettings(min_workers=workers, max_workers=workers, batch_size=batch, max_batch_delay=delay,
                               response_timeout=timeout, continuous_batching=continuous)

unregister = set_default = False
if models:
    labels = {f"{m.name} {m.version}": m for m in models}
    pick_col, unregister_col, default_col = st.columns([3, 1, 1])
    picked = labels[pick_col.selectbox("Model version", list(labels), key="picked_version")]
    unregister = unregister_col.button("Unregister", key="unregister")
    set_default = default_col.button("Set default", key="set_default")

# ---- act
if register:
    run_action(f"Registering {archive_file}", lambda step: register_archive(
        client, process.model_store, archive_file, wanted, on_step=step))
if unregister:
    run_action(f"Unregistering {picked.name} {picked.version}",
               lambda step: client.unregister(picked.name, picked.version))
if set_default:
    run_action(f"Making {picked.version} the default of {picked.name}",
               lambda step: client.set_default_version(picked.name, picked.version))
