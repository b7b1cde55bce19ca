"""The chat client's pages, listed by client_app.py (st.navigation)."""
