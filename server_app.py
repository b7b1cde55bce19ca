"""Admin console for the chat stack's TorchServe: `streamlit run server_app.py`.

One page per concern in console_pages/. Every page re-reads the server on each run,
so it never shows a state the server does not have; the work itself lives in chatstack/.
"""

import streamlit as st

from console_pages.shared import console_process, require_sign_in, show_outcome

st.set_page_config(page_title="TorchServe admin console", page_icon="🛠️", layout="wide")
require_sign_in()   # nothing below is drawn for a visitor who has not signed in, when one must

navigation = st.navigation([
    st.Page("console_pages/server.py", title="Server", icon=":material/dns:", default=True),
    st.Page("console_pages/models.py", title="Models", icon=":material/inventory_2:"),
    st.Page("console_pages/tuning.py", title="Tuning", icon=":material/tune:"),
    st.Page("console_pages/status.py", title="Status", icon=":material/monitor_heart:"),
    st.Page("console_pages/metrics.py", title="Metrics", icon=":material/monitoring:"),
    st.Page("console_pages/security.py", title="Security", icon=":material/key:"),
    st.Page("console_pages/logs.py", title="Logs", icon=":material/article:"),
])
process = console_process()

with st.sidebar:
    st.title("TorchServe console")
    st.slider("Auto-refresh every (s)", 2, 60, 15, key="refresh_s",
              help="Status and Metrics re-read the server this often while their page is open")
    st.slider("Log lines", 10, 200, 40, step=10, key="log_lines")
    st.caption(f"Model store: `{process.model_store}`")
    st.caption(f"Run folder: `{process.run_dir}`")
    st.caption(f"Config: `{process.base_config}`")

st.title("TorchServe admin console")
show_outcome()
navigation.run()
