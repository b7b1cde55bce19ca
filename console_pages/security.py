"""Security: the keys token authorization uses; show the inference key, rotate either key."""

import streamlit as st

from chatstack.console_display import mask_key
from chatstack.torchserve_client import Keys
from console_pages.shared import console_process, run_action

# ---- state
process = console_process()
client = process.client(timeout=30)

# ---- read
try:
    keys = Keys.from_key_file(process.key_file) if process.is_running() else None
except (OSError, ValueError):
    keys = None

# ---- draw
st.caption(f"Token authorization is on. Keys: `{process.key_file}` (rewritten at each start).")
if keys is None:
    st.info("No keys: TorchServe is stopped (it writes new keys at each start).")
    st.stop()
show = st.toggle("Show the inference key", key="show_key")
st.text_input("Inference key (give this to chat clients)", keys.inference if show else mask_key(keys.inference),
              disabled=True, key=None)
st.text_input("Management key (this console uses it)", mask_key(keys.management), disabled=True)
r1, r2, _ = st.columns([1, 1, 3])
rotate_inference = r1.button("Rotate inference key", key="rotate_inference")
rotate_management = r2.button("Rotate management key", key="rotate_management")

# ---- act
if rotate_inference:
    run_action("Rotating the inference key", lambda step: client.rotate_key("inference") and
               "New inference key issued: chat clients need it now")
if rotate_management:
    run_action("Rotating the management key", lambda step: client.rotate_key("management") and
               "New management key issued")
