"""Models: the archives in the model store, the registered versions; register, unregister,
set the default version; add a model from a GGUF file or a Hugging Face snapshot on the server."""

import pandas as pd
import streamlit as st

from chatstack.console_config import ConsoleConfig
from chatstack.console_display import archive_rows, model_rows
from chatstack.model_archive import DEFAULT_ARCHIVE, ModelSettings, list_archives
from chatstack.model_packaging import PackagingRequest, add_model, model_sources, packed_config, quant_types
from chatstack.model_registry import register_archive, remove_unused_copies
from console_pages.shared import console_process, read_models, run_action

# ---- state
process = console_process()
client = process.client(timeout=30)
model_folders = ConsoleConfig.from_env().model_folders
defaults = packed_config()

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

add = None
st.subheader("Add a model")
if not running:
    st.info("Start TorchServe to add a model: it is registered once packaged.")
else:
    sources = [str(p) for p in model_sources(model_folders)]
    st.caption("A GGUF file, or a Hugging Face snapshot folder (converted to GGUF, then quantized), from the "
               f"model folders: {', '.join(f'`{f}`' for f in model_folders)}.")
    with st.form("add_form"):
        add_picked = st.selectbox("Model file", sources, index=None, placeholder="Pick a file from the model folders",
                                  key="add_source")
        add_typed = st.text_input("…or its path on the server", key="add_path",
                                  help="Symlinks and .. are resolved first; it must lie inside a model folder")
        a1, a2, a3, a4 = st.columns(4)
        add_name = a1.text_input("Name", key="add_name", help="Letters, digits, _ and -; not taken yet")
        add_version = a2.text_input("Version", "1.0", key="add_version")
        add_workers = a3.number_input("Workers", 1, 16, 1, key="add_workers")
        add_quant = a4.selectbox("Quantization (snapshots)", quant_types(), key="add_quant")
        add_ctx = a1.number_input("Context per chat (tokens)", 64, 1 << 20, defaults["handler"]["n_ctx"],
                                  key="add_ctx")
        add_slots = a2.number_input("Slots (chats at once per worker)", 1, 64, defaults["batchSize"],
                                    key="add_slots")
        add_gpu_layers = a3.number_input("GPU layers", 0, 1000, defaults["handler"]["n_gpu_layers"],
                                         key="add_gpu_layers", help="0 = CPU; needs a CUDA build of llama.cpp")
        add = st.form_submit_button("Package and register")
if "packaging_log" in st.session_state:
    with st.expander("Packaging log of the last model added"):
        st.code("\n".join(st.session_state["packaging_log"]) or "(empty)", language=None)

# ---- act
if add:
    request = PackagingRequest(add_typed.strip() or add_picked or "", add_name.strip(), add_version.strip(),
                               int(add_ctx), int(add_slots), int(add_gpu_layers), add_quant)

    def adding(step):
        bar = st.progress(0.0, "Checking the file")
        log_view = st.empty()
        log = st.session_state["packaging_log"] = []

        def on_line(line, done):
            log.append(line)
            log_view.code("\n".join(log[-30:]), language=None)
            if done is not None:
                bar.progress(done, line[:100])
        return add_model(client, process.model_store, request, model_folders, int(add_workers),
                         on_step=step, on_line=on_line)
    run_action(f"Adding {request.name or 'a model'}", adding)
if register:
    run_action(f"Registering {archive_file}", lambda step: register_archive(
        client, process.model_store, archive_file, wanted, on_step=step))
if unregister:
    def unregistering(step):
        step(client.unregister(picked.name, picked.version))
        removed = remove_unused_copies(client, process.model_store)   # a copy made for that version
        return f"{picked.name} {picked.version} unregistered" + (f"; deleted {', '.join(removed)}" if removed else "")
    run_action(f"Unregistering {picked.name} {picked.version}", unregistering)
if set_default:
    run_action(f"Making {picked.version} the default of {picked.name}",
               lambda step: client.set_default_version(picked.name, picked.version))
