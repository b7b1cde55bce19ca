"""Export and import page of client_app.py: conversations out as JSON (everything, every
branch) or Markdown (to read), and back in from our JSON or a plain OpenAI messages
array. The logic lives in chatstack/conversation_transfer.py; see docs/chat-client.md."""

import re
from datetime import date

import streamlit as st

from chatstack.conversation_transfer import (MAX_IMPORT_BYTES, TransferError, export_json, export_markdown, import_plan,
                                             read_import)
from client_pages.page_setup import page_setup

ALL = 0  # the choice "all conversations"

_, store, user = page_setup()
conversations = {c.id: c.title for c in store.list(user)}

st.title("Export and import")

st.subheader("Export")
if not conversations:
    st.caption("No conversation to export yet.")
else:
    chosen = st.selectbox("Conversations", [ALL, *conversations], key="export_choice",
                          format_func=lambda cid: f"All ({len(conversations)})" if cid == ALL else conversations[cid])
    ids = None if chosen == ALL else [chosen]
    name = "conversations" if chosen == ALL else (re.sub(r"[^\w-]+", "-", conversations[chosen]).strip("-").lower()
                                                 or "conversation")
    name = f"{name}-{date.today().isoformat()}"
    left, right = st.columns(2)
    # The files are written when a button is clicked, not on every run of the page.
    left.download_button("Download JSON", lambda: export_json(store, user, ids), f"{name}.json", "application/json",
                         icon=":material/data_object:", width="stretch", on_click="ignore",
                         help="Every message of every branch, with the model, its version, usage and the "
                              "server's figures: import it here to get the same conversations back.")
    right.download_button("Download Markdown", lambda: export_markdown(store, user, ids), f"{name}.md",
                          "text/markdown", icon=":material/description:", width="stretch", on_click="ignore",
                          help="The conversations as they are shown, to read or share (other branches left out).")

st.subheader("Import")
st.caption("A JSON file exported here, or an OpenAI `messages` array (or a request body holding one). "
           "A file is checked whole before anything is saved: it is imported completely or not at all.")
# Streamlit turns a larger file away before it is uploaded; read_import checks again.
upload = st.file_uploader("File to import", type=["json"], key="import_file",
                          max_upload_size=MAX_IMPORT_BYTES // 2**20)
if upload is not None:
    try:
        plan = read_import(upload.getvalue())
    except TransferError as refusal:
        st.error(f"This file cannot be imported: {refusal}", icon=":material/block:")
    else:
        st.info(f"{upload.name}: {plan.summary()}.", icon=":material/inventory_2:")
        for note in plan.notes:
            st.caption(note)
        done = st.session_state.get("imported")
        if done and done[0] == upload.file_id:
            st.success(f"Imported {len(done[1])} conversation{'s' if len(done[1]) != 1 else ''}: "
                       + ", ".join(done[1]), icon=":material/check_circle:")
        elif st.button("Import", icon=":material/upload:", type="primary"):
            added = import_plan(store, user, plan)
            st.session_state.imported = (upload.file_id, [c.title for c in added])
            st.rerun()
