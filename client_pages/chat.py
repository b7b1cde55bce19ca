"""The chat page of client_app.py: conversations with the model TorchServe serves.

Where the server and the database are configured: see client_app.py and
docs/chat-client.md.
"""

from datetime import datetime

import streamlit as st

from chatstack.chat_display import answer_caption, as_markdown, context_use
from chatstack.chat_settings import LIMITS, SETTING_NAMES, ChatSettings, needs_answer, request_messages
from chatstack.client_state import ClientState
from chatstack.conversations import ConversationStore, default_db_path
from chatstack.reply_stream import Answer
from chatstack.server_health import LOADING, READY, Health, check_health, worker_failure
from chatstack.server_settings import ServerSettings, available_models
from chatstack.torchserve_client import TorchServeError
from chatstack.worker_failures import WorkerFailure


def streamlit_secrets() -> dict:
    try:
        return dict(st.secrets)
    except FileNotFoundError:  # no secrets.toml: environment variables only
        return {}


@st.cache_resource
def open_store(path: str) -> ConversationStore:
    return ConversationStore(path)


@st.cache_data(ttl=30, show_spinner=False)
def registered_models(server: ServerSettings) -> list[str]:
    return available_models(server)


def show_failure(failure: WorkerFailure) -> None:
    """Why a worker died (its cause in the title), and its last log lines folded away."""
    with st.expander(failure.summary(), icon=":material/heart_broken:"):
        st.code("\n".join(failure.last_lines), language=None, wrap_lines=True)


server = ServerSettings.from_sources(secrets=streamlit_secrets())
store = open_store(str(default_db_path()))

# What this session remembers between runs. The open conversation lives in the URL too,
# so a page reload reopens it.
if "chat" not in st.session_state:
    opened = st.query_params.get("conversation", "")
    st.session_state.chat = ClientState(conversation_id=int(opened) if opened.isdigit() and store.get(int(opened))
                                        else None)
state: ClientState = st.session_state.chat


def rename_conversation(conversation_id: int) -> None:
    store.rename(conversation_id, st.session_state[f"title-{conversation_id}"])


def delete_conversation(conversation_id: int) -> None:
    store.delete(conversation_id)
    state.open(None)


def answer_again(conversation_id: int) -> None:
    """Regenerate the last answer, or retry one that failed."""
    store.remove_last_answer(conversation_id)
    state.answer_pending = True
    state.forget_health()


def save_settings() -> None:
    store.save_settings({name: st.session_state[name] for name in SETTING_NAMES})


# ---- sidebar: conversations and settings ---------------------------------------

with st.sidebar:
    st.button("New chat", icon=":material/add:", on_click=state.open, args=(None,), width="stretch")
    conversation_list = st.container()  # filled once the new message is in (below)

    with st.expander("Settings", icon=":material/tune:"):
        models = registered_models(server)
        # Settings last across reloads and restarts: the database keeps the last ones used.
        if not state.settings_loaded or st.session_state.model not in models:
            st.session_state.update(ChatSettings.from_saved(store.load_settings(), models).as_dict())
            state.settings_loaded = True
        st.selectbox("Model", models, key="model", on_change=save_settings)
        st.text_area("System prompt", key="system_prompt", on_change=save_settings)
        st.slider("Temperature", *LIMITS["temperature"], step=0.05, key="temperature", on_change=save_settings,
                  help="Higher is more varied, 0 always picks the likeliest word.")
        st.slider("Top p", *LIMITS["top_p"], step=0.05, key="top_p", on_change=save_settings,
                  help="Sample only from the likeliest words that together make up this share.")
        st.number_input("Max answer tokens", *LIMITS["max_tokens"], step=64, key="max_tokens",
                        on_change=save_settings)
        settings = ChatSettings(**{name: st.session_state[name] for name in SETTING_NAMES})
    st.caption(server.describe())
    context_placeholder = st.empty()

# ---- the open conversation and the server's health ------------------------------------

# A click during an answer (Stop, or anything else) starts this run while the old run
# still streams; it stops at its next chunk and saves. Wait for that to show it.
if state.running_answer is not None:
    with st.spinner("Stopping the answer…"):
        state.running_answer.wait_until_saved(timeout=30)
    state.running_answer = None
current = store.get(state.conversation_id) if state.conversation_id else None

# Checked before the first message, and again after any failed call.
health = state.health_for(settings.model)
if health is None:
    health = check_health(server, settings.model)
    state.set_health(settings.model, health)

if not health.ok:
    box = st.info if health.state == LOADING else st.error
    box(health.message, icon=":material/info:" if health.state == LOADING else ":material/error:")
    if health.failure:
        show_failure(health.failure)
    st.button("Check again", on_click=state.forget_health)

# ---- replay the conversation -------------------------------------------------------

history = store.messages(current.id) if current else []
if not history:
    st.caption("Ask anything. Answers come from the model on your TorchServe.")
for message in history:
    with st.chat_message(message.role):
        st.markdown(as_markdown(message.content))
        if message.role == "assistant":
            st.caption(answer_caption(message))
            with st.popover("Copy", icon=":material/content_copy:"):
                st.code(message.content, language=None, wrap_lines=True)

use = context_use(history)
if use:
    context_placeholder.progress(use.fraction, text=use.label())
    if use.dropped_note():
        st.warning(use.dropped_note(), icon=":material/history:")

if current and needs_answer(history) and not state.answer_pending:
    # When the server is unwell, the health message above already says why.
    failure = history[-1].error or state.last_error
    if failure and health.ok:
        st.error(f"The answer failed: {failure}")
    if state.last_failure and state.last_failure != health.failure:
        show_failure(state.last_failure)
    st.button("Retry", icon=":material/refresh:", on_click=answer_again, args=(current.id,))
elif current and history and history[-1].role == "assistant" and not state.answer_pending:
    st.button("Regenerate", icon=":material/autorenew:", on_click=answer_again, args=(current.id,),
              help="Ask the model again for the last answer")

# ---- new message ---------------------------------------------------------------------

if prompt := st.chat_input("Message the model", submit_mode="stop"):
    if current is None:
        current = store.create()
        state.conversation_id = current.id
    # Saved before the model is asked: a server failure cannot lose it.
    store.add_user_message(current.id, prompt)
    with st.chat_message("user"):
        st.markdown(prompt)
    state.answer_pending = True

if current:
    st.query_params["conversation"] = str(current.id)
else:
    st.query_params.pop("conversation", None)

# Listed after the new message is saved, so a conversation it started shows at once,
# even when its answer is stopped (a stopped run draws nothing more).
with conversation_list:
    for conversation in store.list():
        st.button(conversation.title, key=f"open-{conversation.id}", on_click=state.open,
                  args=(conversation.id,), width="stretch",
                  type="primary" if current and conversation.id == current.id else "tertiary")
    if current:
        with st.expander("This conversation"):
            st.session_state.setdefault(f"title-{current.id}", current.title)
            st.text_input("Title", key=f"title-{current.id}", on_change=rename_conversation, args=(current.id,))
            st.button("Delete conversation", icon=":material/delete:", on_click=delete_conversation,
                      args=(current.id,))

# ---- stream the answer, then save it -----------------------------------------------

if state.answer_pending:
    state.answer_pending = False
    state.last_error = state.last_failure = None
    messages = request_messages(settings.system_prompt, store.messages(current.id))
    started = datetime.now()
    with st.chat_message("assistant"):
        if not prompt:
            # The message box turns into a Stop button only for answers to a new message;
            # a click on any widget ends the run, and this one is there to be clicked.
            st.button("Stop", icon=":material/stop_circle:", key="stop_answer")
        waiting = st.empty()
        try:
            with Answer(store, current.id, server, settings, messages,
                        on_wait=lambda why, pause: waiting.info(f"{why.message} Trying again in {pause:.0f} s…")
                        ) as answer:
                state.running_answer = answer
                st.write_stream(answer.stream)
        except TorchServeError as error:
            state.last_error = error.message
            with st.spinner("Reading the server's logs…"):
                state.last_failure = worker_failure(server, settings.model, error, since=started, wait_s=5)
            state.forget_health()  # say what is wrong on the next run
        else:
            state.set_health(settings.model, Health(READY, "The last answer came through."))
    state.running_answer = None  # saved: nothing for the next run to wait for
    st.rerun()
