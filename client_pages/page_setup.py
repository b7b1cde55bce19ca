"""What each page of the chat client starts from: the app's secrets, the conversation
store, the server, and who is using the page (signed in through st.login where the
secrets configure it, else the single user, as chatstack/people.py decides)."""

from __future__ import annotations

import streamlit as st

from chatstack.conversations import ConversationStore, default_db_path
from chatstack.people import LOCAL_USER, sign_in_configured, user_id
from chatstack.server_settings import ServerSettings


def streamlit_secrets() -> dict:
    try:
        return dict(st.secrets)
    except FileNotFoundError:  # no secrets.toml: environment variables only
        return {}


@st.cache_resource
def open_store(path: str) -> ConversationStore:
    return ConversationStore(path)


def page_setup() -> tuple[ServerSettings, ConversationStore, str]:
    """The server, the store and the user's id; stops the page for a visitor who has not signed in."""
    secrets = streamlit_secrets()
    if sign_in_configured(secrets):
        if not st.user.is_logged_in:
            st.info("Sign in on the Chat page first.", icon=":material/login:")
            st.stop()
        user = user_id(st.user.to_dict())
    else:
        user = LOCAL_USER
    return ServerSettings.from_sources(secrets=secrets), open_store(str(default_db_path())), user
