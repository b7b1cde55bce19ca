"""Chat with the model TorchServe serves: `streamlit run client_app.py`.

Where the server is comes from environment variables or Streamlit secrets
(TORCHSERVE_URL, TORCHSERVE_MANAGEMENT_URL, TORCHSERVE_INFERENCE_KEY,
TORCHSERVE_MANAGEMENT_KEY or TORCHSERVE_KEY_FILE, TORCHSERVE_MODEL);
conversations live in the SQLite file CHAT_DB_PATH. See docs/chat-client.md.
"""

import streamlit as st

from chatstack import chat_session as chat
from chatstack.conversations import ConversationStore, default_db_path
from chatstack.torchserve_client import TorchServeError

st.set_page_config(page_title="Chat", page_icon="💬")


def streamlit_secrets() -> dict:
    try:
        return dict(st.secrets)
    except FileNotFoundError:  # no secrets.toml: environment variables only
        return {}


@st.cache_resource
def open_store(path: str) -> ConversationStore:
    return ConversationStore(path)


@st.cache_data(ttl=30, show_spinner=False)
def registered_models(server: chat.ServerSettings) -> list[str]:
    return chat.available_models(server)


server = chat.ServerSettings.from_sources(secrets=streamlit_secrets())
store = open_store(str(default_db_path()))


def open_conversation(conversation_id: int | None) -> None:
    st.session_state.conversation_id = conversation_id
    st.session_state.answer_pending = False


def rename_conversation(conversation_id: int) -> None:
    store.rename(conversation_id, st.session_state[f"title-{conversation_id}"])


def delete_conversation(conversation_id: int) -> None:
    store.delete(conversation_id)
    open_conversation(None)


def answer_again(conversation_id: int) -> None:
    """Regenerate the last answer, or retry one that failed."""
    store.remove_last_answer(conversation_id)
    st.session_state.answer_pending = True
    check_again()


def save_settings() -> None:
    store.save_settings({name: st.session_state[name] for name in chat.ChatSettings().as_dict()})


def check_again() -> None:
    st.session_state.pop("health", None)


# ---- sidebar: conversations and settings ---------------------------------------

with st.sidebar:
    st.button("New chat", icon=":material/add:", on_click=open_conversation, args=(None,), width="stretch")
    conversation_list = st.container()  # filled once the new message is in (below)

    with st.expander("Settings", icon=":material/tune:"):
        models = registered_models(server)
        # Settings last across reloads and restarts: the database keeps the last ones used.
        if "settings_loaded" not in st.session_state or st.session_state.model not in models:
            st.session_state.update(chat.ChatSettings.from_saved(store.load_settings(), models).as_dict())
            st.session_state.settings_loaded = True
        st.selectbox("Model", models, key="model", on_change=save_settings)
        st.text_area("System prompt", key="system_prompt", on_change=save_settings)
        st.slider("Temperature", *chat.LIMITS["temperature"], step=0.05, key="temperature", on_change=save_settings,
                  help="Higher is more varied, 0 always picks the likeliest word.")
        st.slider("Top p", *chat.LIMITS["top_p"], step=0.05, key="top_p", on_change=save_settings,
                  help="Sample only from the likeliest words that together make up this share.")
        st.number_input("Max answer tokens", *chat.LIMITS["max_tokens"], step=64, key="max_tokens",
                        on_change=save_settings)
        st.caption(f"Server: {server.inference_url}")
        settings = chat.ChatSettings(**{name: st.session_state[name] for name in chat.ChatSettings().as_dict()})
    context_placeholder = st.empty()

# ---- session state: open conversation, health of the server, answer to write ---------

# Which conversation is open lives in the URL, so a page reload reopens it.
if "conversation_id" not in st.session_state:
    opened = st.query_params.get("conversation", "")
    st.session_state.conversation_id = int(opened) if opened.isdigit() and store.get(int(opened)) else None

# A click during an answer (Stop, or anything else) starts this run while the old run
# still streams; it stops at its next chunk and saves. Wait for that to show it.
if (running := st.session_state.pop("running_answer", None)) is not None:
    with st.spinner("Stopping the answer…"):
        running.wait_until_saved(timeout=30)
current = store.get(st.session_state.conversation_id) if st.session_state.conversation_id else None

# Checked before the first message, and again after any failed call.
if st.session_state.get("health_model") != settings.model:
    st.session_state.pop("health", None)
if "health" not in st.session_state:
    st.session_state.health = chat.check_health(server, settings.model)
    st.session_state.health_model = settings.model
st.session_state.setdefault("answer_pending", False)
health: chat.Health = st.session_state.health

if not health.ok:
    box = st.info if health.state == chat.LOADING else st.error
    box(health.message, icon=":material/info:" if health.state == chat.LOADING else ":material/error:")
    st.button("Check again", on_click=check_again)

# ---- replay the conversation -------------------------------------------------------

history = store.messages(current.id) if current else []
if not history:
    st.caption("Ask anything. Answers come from the model on your TorchServe.")
for message in history:
    with st.chat_message(message.role):
        st.markdown(chat.as_markdown(message.content))
        if message.role == "assistant":
            st.caption(chat.answer_caption(message))
            with st.popover("Copy", icon=":material/content_copy:"):
                st.code(message.content, language=None, wrap_lines=True)

use = chat.context_use(history)
if use:
    context_placeholder.progress(use.fraction, text=use.label())
    if use.dropped_note():
        st.warning(use.dropped_note(), icon=":material/history:")

if current and chat.needs_answer(history) and not st.session_state.answer_pending:
    # When the server is unwell, the health message above already says why.
    failure = history[-1].error or st.session_state.get("last_error")
    if failure and health.ok:
        st.error(f"The answer failed: {failure}")
    st.button("Retry", icon=":material/refresh:", on_click=answer_again, args=(current.id,))
elif current and history and history[-1].role == "assistant" and not st.session_state.answer_pending:
    st.button("Regenerate", icon=":material/autorenew:", on_click=answer_again, args=(current.id,),
              help="Ask the model again for the last answer")

# ---- new message ---------------------------------------------------------------------

if prompt := st.chat_input("Message the model", submit_mode="stop"):
    if current is None:
        current = store.create()
        st.session_state.conversation_id = current.id
    # Saved before the model is asked: a server failure cannot lose it.
    store.add_user_message(current.id, prompt)
    with st.chat_message("user"):
        st.markdown(prompt)
    st.session_state.answer_pending = True

if current:
    st.query_params["conversation"] = str(current.id)
else:
    st.query_params.pop("conversation", None)

# Listed after the new message is saved, so a conversation it started shows at once,
# even when its answer is stopped (a stopped run draws nothing more).
with conversation_list:
    for conversation in store.list():
        st.button(conversation.title, key=f"open-{conversation.id}", on_click=open_conversation,
                  args=(conversation.id,), width="stretch",
                  type="primary" if current and conversation.id == current.id else "tertiary")
    if current:
        with st.expander("This conversation"):
            st.session_state.setdefault(f"title-{current.id}", current.title)
            st.text_input("Title", key=f"title-{current.id}", on_change=rename_conversation, args=(current.id,))
            st.button("Delete conversation", icon=":material/delete:", on_click=delete_conversation,
                      args=(current.id,))

# ---- stream the answer, then save it -----------------------------------------------

if st.session_state.answer_pending:
    st.session_state.answer_pending = False
    st.session_state.last_error = None
    messages = chat.request_messages(settings.system_prompt, store.messages(current.id))
    with st.chat_message("assistant"):
        if not prompt:
            # The message box turns into a Stop button only for answers to a new message;
            # a click on any widget ends the run, and this one is there to be clicked.
            st.button("Stop", icon=":material/stop_circle:", key="stop_answer")
        waiting = st.empty()
        try:
            with chat.Answer(store, current.id, server, settings, messages,
                             on_wait=lambda why, pause: waiting.info(f"{why.message} Trying again in {pause:.0f} s…")
                             ) as answer:
                st.session_state.running_answer = answer
                st.write_stream(answer.stream)
        except TorchServeError as error:
            st.session_state.last_error = error.message
            st.session_state.pop("health", None)  # say what is wrong on the next run
        else:
            st.session_state.health = chat.Health(chat.READY, "The last answer came through.")
    st.session_state.pop("running_answer", None)  # saved: nothing for the next run to wait for
    st.rerun()
