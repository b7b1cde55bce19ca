"""How one saved answer is drawn on the chat page: its reasoning folded away, the
text, each tool call folded away, and the server's figures on demand.

Thin: what to show is decided in chatstack/message_details.py."""

from __future__ import annotations

import streamlit as st

from chatstack.chat_display import as_markdown
from chatstack.message_details import detail_rows, details_markdown, tool_call_blocks


def show_assistant_message(message) -> None:
    """Draw an assistant message (chatstack.conversations.Message) inside its st.chat_message."""
    reasoning = getattr(message, "reasoning", None)
    if reasoning:
        with st.expander("Reasoning", icon=":material/psychology:"):
            st.markdown(as_markdown(reasoning))
    if message.content:
        st.markdown(as_markdown(message.content))
    for call in tool_call_blocks(getattr(message, "tool_calls", None)):
        with st.expander(f"Tool call: {call.title}", icon=":material/build:"):
            st.code(call.arguments, language="json", wrap_lines=True)
    rows = detail_rows(getattr(message, "details", None))
    if rows:
        with st.popover("Details", icon=":material/query_stats:"):
            st.markdown(details_markdown(rows))
