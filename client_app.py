"""Chat with the model TorchServe serves: `streamlit run client_app.py`.

This file is only the navigation; each page is a file in client_pages/ (the chat,
and where present compare-and-replay and export-and-import). It finds the TorchServe
this install started (the admin console or `python -m chatstack start`) through its
run folder; environment variables or Streamlit secrets override that
(TORCHSERVE_URL, TORCHSERVE_MANAGEMENT_URL, TORCHSERVE_INFERENCE_KEY,
TORCHSERVE_MANAGEMENT_KEY or TORCHSERVE_KEY_FILE, TORCHSERVE_MODEL); conversations
live in the SQLite file CHAT_DB_PATH. See docs/chat-client.md.
"""

from pathlib import Path

import streamlit as st

HERE = Path(__file__).parent
# Pages written by other parts of the work appear once their file exists.
OPTIONAL_PAGES = (("client_pages/compare.py", "Compare", ":material/compare:"),
                  ("client_pages/transfer.py", "Export and import", ":material/import_export:"))

pages = [st.Page("client_pages/chat.py", title="Chat", icon=":material/chat:", default=True)]
pages += [st.Page(path, title=title, icon=icon) for path, title, icon in OPTIONAL_PAGES if (HERE / path).exists()]
page = st.navigation(pages)
# One page config per run, chosen for its page: Compare sets two answers side by side.
st.set_page_config(page_title="Chat", page_icon="💬", layout="wide" if page.title == "Compare" else "centered")
page.run()
