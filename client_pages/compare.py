"""Compare page of client_app.py: two models (or two versions of one) answering the
same conversation side by side, and a saved conversation replayed against another
model. The logic lives in chatstack/model_compare.py; see docs/chat-client.md."""

import time

import streamlit as st

from chatstack.chat_display import as_markdown
from chatstack.chat_settings import LIMITS, ChatSettings
from chatstack.message_details import detail_rows, details_markdown
from chatstack.model_compare import (Comparison, SideAnswer, Target, compare_messages, diff_html, list_targets, replay,
                                     saved_turns)
from chatstack.server_settings import ServerSettings
from client_pages.page_setup import page_setup

REDRAW_S = 0.05  # how often the two answers are redrawn while they stream


@st.cache_data(ttl=30, show_spinner=False)
def targets_of(server: ServerSettings) -> list[Target]:
    return list_targets(server)


def show_side(answer: SideAnswer) -> None:
    """One side: which model answered, its text, and how fast it came."""
    version = f" · answered by version {answer.model_version}" if answer.model_version else ""
    st.markdown(f"**{answer.target.label()}**{version}")
    if answer.reasoning:
        with st.expander("Reasoning", icon=":material/psychology:"):
            st.markdown(as_markdown(answer.reasoning))
    if answer.text:
        st.markdown(as_markdown(answer.text))
    if answer.error:
        st.error(answer.error)
    st.caption(" · ".join(part for part in (answer.figures().caption(), answer.ending()) if part)
               or "waiting for the first token…")
    rows = detail_rows(answer.details()) if answer.ended else []
    if rows:
        with st.popover("Details", icon=":material/query_stats:"):
            st.markdown(details_markdown(rows))


server, store, user = page_setup()
targets = targets_of(server)
saved = ChatSettings.from_saved(store.load_settings(user), [t.model for t in targets])
conversations = {c.id: c.title for c in store.list(user)}

st.title("Compare models")
side_by_side, replay_tab = st.tabs(["Side by side", "Replay a conversation"])

with side_by_side:
    st.caption("The same conversation goes to both at once; each answer streams in its own column with its "
               "token count, tokens/s and time to first token (the server's own figures where it sends them).")
    left_col, right_col = st.columns(2)
    labels = {t.label(): t for t in targets}
    left = left_col.selectbox("Left", labels, index=0, key="compare_left")
    right = right_col.selectbox("Right", labels, index=min(1, len(labels) - 1), key="compare_right")
    with st.expander("Settings", icon=":material/tune:"):
        system_prompt = st.text_area("System prompt", saved.system_prompt, key="compare_system")
        temperature = st.slider("Temperature", *LIMITS["temperature"], 0.0, step=0.05, key="compare_temperature",
                                help="0: each model picks its likeliest word, so differences come from the models.")
        max_tokens = st.number_input("Max answer tokens", *LIMITS["max_tokens"], min(saved.max_tokens, 256),
                                     step=64, key="compare_max_tokens")
    start_from = st.selectbox("Start from", [None, *conversations], key="compare_from",
                              format_func=lambda cid: "A new conversation" if cid is None else conversations[cid])
    with st.form("compare_form", border=False):
        prompt = st.text_area("Message", key="compare_prompt", placeholder="Ask both models the same thing")
        send = st.form_submit_button("Send to both", icon=":material/send:", type="primary")

    results = st.container()
    if send:
        history = store.messages(user, start_from) if start_from else []
        try:
            messages = compare_messages(system_prompt, history, prompt)
        except ValueError as problem:
            st.error(str(problem))
        else:
            sampling = {"temperature": temperature, "top_p": saved.top_p, "max_tokens": int(max_tokens)}
            comparison = Comparison.start(server, [labels[left], labels[right]], messages, sampling)
            st.session_state.compare_answers = comparison.answers  # kept (as they grow) for later runs
            st.button("Stop", icon=":material/stop_circle:", key="compare_stop")
            with results:
                boxes = [column.empty() for column in st.columns(2)]
            try:
                while True:
                    if comparison.poll():
                        for box, answer in zip(boxes, comparison.answers):
                            with box.container():
                                show_side(answer)
                    if comparison.done:
                        break
                    time.sleep(REDRAW_S)
            finally:
                comparison.stop()  # a click during the answers ends this run: close both streams
            st.rerun()
    elif st.session_state.get("compare_answers"):
        with results:
            for column, answer in zip(st.columns(2), st.session_state.compare_answers):
                with column:
                    show_side(answer)

with replay_tab:
    st.caption("Each question of a saved conversation is asked again, with the saved conversation before it "
               "and your current system prompt, and the new answer is set against the saved one.")
    if not conversations:
        st.info("No saved conversation yet: chat first, then replay it here.")
    else:
        conversation_id = st.selectbox("Conversation", conversations, format_func=conversations.get,
                                       key="replay_conversation")
        target = st.selectbox("Against", labels, key="replay_target")
        replay_temperature = st.slider("Temperature", *LIMITS["temperature"], 0.0, step=0.05,
                                       key="replay_temperature")
        if st.button("Replay", icon=":material/replay:", type="primary"):
            sampling = {"temperature": replay_temperature, "top_p": saved.top_p, "max_tokens": saved.max_tokens}
            history = store.messages(user, conversation_id)
            st.session_state.replay_against = target
            st.session_state.replay_turns = turns = []
            with st.status(f"Replaying against {target}…") as status:
                for turn in replay(server.client(timeout=300), labels[target], saved.system_prompt, history, sampling):
                    turns.append(turn)
                    status.update(label=f"Replaying against {target}: {len(turns)} of "
                                        f"{len(saved_turns(history))} questions answered")
                same = sum(turn.identical for turn in turns)
                status.update(label=f"{same} of {len(turns)} answers identical", state="complete", expanded=False)
        for turn in st.session_state.get("replay_turns", []):
            icon = ":material/check_circle:" if turn.identical else ":material/difference:"
            with st.expander(f"{turn.summary()} — {turn.question[:60]}", icon=icon, expanded=not turn.identical):
                speeds = [f"{who}: {figures.caption()}" for who, figures in (
                    ("saved", turn.saved_figures), (st.session_state.replay_against, turn.replayed_figures)) if figures]
                if speeds:
                    st.caption(" — ".join(speeds))
                if turn.error:
                    st.error(turn.error)
                elif turn.identical:
                    st.markdown(as_markdown(turn.replayed))
                else:
                    st.caption(f"Saved answer ({turn.saved_model or 'model unknown'}) → "
                               f"{st.session_state.replay_against}: "
                               "removed words struck out, added words in green")
                    st.html(diff_html(turn.diff()))
