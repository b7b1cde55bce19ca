"""The chat page of client_app.py: conversations with the model TorchServe serves.

Where the server and the database are configured: see client_app.py and
docs/chat-client.md. The logic lives in chatstack/ (conversations.py, the store and
its branches; reply_stream.py, one streamed answer; chat_settings.py, chat_display.py).
"""

from datetime import datetime
from pathlib import Path

import streamlit as st

from chatstack.attachments import (
    ACCEPTED_TYPES, ASSUMED_CONTEXT, ESTIMATE_CHARS_PER_TOKEN, AttachmentRefused, check_fits, read_attachment,
    with_attachments,
)
from chatstack.chat_display import answer_caption, as_markdown, branch_label, context_use
from chatstack.chat_settings import (
    LIMITS, SETTING_NAMES, ChatSettings, continue_messages, needs_answer, request_messages,
)
from chatstack.client_state import ClientState
from chatstack.conversations import Message, default_db_path
from chatstack.people import LOCAL_USER, display_name, providers, sign_in_configured, user_id
from chatstack.reply_stream import Answer
from chatstack.server_health import LOADING, READY, Health, check_health, worker_failure
from chatstack.server_settings import ServerSettings, available_models
from chatstack.summarise import summarise_and_continue
from chatstack.torchserve_client import TorchServeError
from chatstack.worker_failures import WorkerFailure
from client_pages.page_setup import open_store, streamlit_secrets

if (Path(__file__).parent / "message_view.py").exists():
    from client_pages.message_view import show_assistant_message
else:  # until the message view exists: the text alone
    def show_assistant_message(message: Message) -> None:
        st.markdown(as_markdown(message.content))


BLANKED_CHILDREN = 8  # more than a drawn answer has elements (text, reasoning, tool calls, caption, controls)


@st.cache_data(ttl=30, show_spinner=False)
def registered_models(server: ServerSettings) -> list[str]:
    return available_models(server)


def show_failure(failure: WorkerFailure) -> None:
    """Why a worker died (its cause in the title), and its last log lines folded away."""
    with st.expander(failure.summary(), icon=":material/heart_broken:"):
        st.code("\n".join(failure.last_lines), language=None, wrap_lines=True)


secrets = streamlit_secrets()
server = ServerSettings.from_sources(secrets=secrets)
store = open_store(str(default_db_path()))

# ---- who is chatting: signed in where the secrets configure it, else single-user mode ------

if sign_in_configured(secrets):
    if not st.user.is_logged_in:
        st.title("Chat")
        st.write("Sign in to see your conversations.")
        for provider in providers(secrets) or [None]:
            st.button(f"Sign in with {provider}" if provider else "Sign in", icon=":material/login:",
                      on_click=st.login, args=(provider,) if provider else ())
        st.stop()
    user = user_id(st.user.to_dict())
else:
    user = LOCAL_USER

# What this session remembers between runs. The open conversation lives in the URL too,
# so a page reload reopens it.
if "chat" not in st.session_state or st.session_state.chat.user != user:
    opened = st.query_params.get("conversation", "")
    st.session_state.chat = ClientState(
        user=user, conversation_id=int(opened) if opened.isdigit() and store.get(user, int(opened)) else None)
state: ClientState = st.session_state.chat


def rename_conversation(conversation_id: int) -> None:
    store.rename(user, conversation_id, st.session_state[f"title-{conversation_id}"])


def delete_conversation(conversation_id: int, title: str) -> None:
    store.delete(user, conversation_id)
    state.deleted = (conversation_id, title)
    state.open(None)


def undo_delete() -> None:
    conversation_id, _ = state.deleted
    if store.restore(user, conversation_id):
        state.open(conversation_id)
    state.deleted = None


def answer_again(conversation_id: int, question_id: int | None) -> None:
    """Regenerate an answer (any, not only the last): a new answer to its question, beside it."""
    store.select(user, conversation_id, question_id)
    state.answer_pending = True
    state.forget_health()


def retry(conversation_id: int) -> None:
    """Answer the last question again after a failure (a failed answer is replaced)."""
    store.remove_failed_answer(user, conversation_id)
    state.answer_pending = True
    state.forget_health()


def ask_for_summary() -> None:
    state.summary_pending = True


def continue_answer(message_id: int) -> None:
    state.answer_pending, state.continue_id = True, message_id


def send_edit(conversation_id: int, message: Message) -> None:
    """An edited question is a new branch beside the original, and gets its own answer."""
    text = st.session_state[f"edit-text-{message.id}"]
    if text.strip():
        store.add_user_message(user, conversation_id, text, parent_id=message.parent_id)
        state.answer_pending = True


def show_branch(conversation_id: int, message_id: int) -> None:
    store.show_branch(user, conversation_id, message_id)


def save_settings() -> None:
    store.save_settings(user, {name: st.session_state[name] for name in SETTING_NAMES})


def branch_switch(conversation_id: int, message: Message) -> None:
    """‹ 2/3 › between a message and its alternatives (drawn only where there are some)."""
    label = branch_label(message)
    if not label:
        return
    position = message.alternatives.index(message.id)
    before = message.alternatives[position - 1] if position > 0 else None
    after = message.alternatives[position + 1] if position + 1 < len(message.alternatives) else None
    st.button("‹", key=f"previous-{message.id}", disabled=before is None, on_click=show_branch,
              args=(conversation_id, before), help="Previous version")
    st.caption(label, width="content")
    st.button("›", key=f"next-{message.id}", disabled=after is None, on_click=show_branch,
              args=(conversation_id, after), help="Next version")


# ---- sidebar: conversations and settings ---------------------------------------

with st.sidebar:
    st.button("New chat", icon=":material/add:", on_click=state.open, args=(None,), width="stretch")
    if state.deleted:
        with st.container(border=True):
            st.caption(f"Deleted “{state.deleted[1]}”")
            st.button("Undo", icon=":material/undo:", on_click=undo_delete, key="undo_delete")
    searched = st.text_input("Search", key="search", placeholder="Search conversations",
                             label_visibility="collapsed", icon=":material/search:")
    conversation_list = st.container()  # filled once the new message is in (below)

    with st.expander("Settings", icon=":material/tune:"):
        models = registered_models(server)
        # Settings last across reloads and restarts: the database keeps the last ones used.
        if not state.settings_loaded or st.session_state.model not in models:
            st.session_state.update(ChatSettings.from_saved(store.load_settings(user), models).as_dict())
            state.settings_loaded = True
        st.selectbox("Model", models, key="model", on_change=save_settings)
        st.text_area("System prompt", key="system_prompt", on_change=save_settings)
        st.slider("Temperature", *LIMITS["temperature"], step=0.05, key="temperature", on_change=save_settings,
                  help="Higher is more varied, 0 always picks the likeliest word.")
        st.slider("Top p", *LIMITS["top_p"], step=0.05, key="top_p", on_change=save_settings,
                  help="Sample only from the likeliest words that together make up this share.")
        st.number_input("Max answer tokens", *LIMITS["max_tokens"], step=64, key="max_tokens",
                        on_change=save_settings)
        st.toggle("JSON answer", key="json_answer", on_change=save_settings,
                  help="Ask for the answer as one JSON object (response_format json_object).")
        settings = ChatSettings(**{name: st.session_state[name] for name in SETTING_NAMES})
    st.caption(server.describe())
    if user != LOCAL_USER:
        st.caption(f"Signed in as {display_name(st.user.to_dict())}")
        st.button("Sign out", icon=":material/logout:", on_click=st.logout)
    context_placeholder = st.empty()

# ---- the open conversation and the server's health ------------------------------------

# A click during an answer (Stop, or anything else) starts this run while the old run
# still streams; it stops at its next chunk and saves. Wait for that to show it.
if state.running_answer is not None:
    with st.spinner("Stopping the answer…"):
        state.running_answer.wait_until_saved(timeout=30)
    state.running_answer = None
current = store.get(user, state.conversation_id) if state.conversation_id else None

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

# The conversation, then the files for the next message: made now, filled below (the files are
# read before the new message, and the conversation is drawn after it).
conversation_box, attachment_box = st.container(), st.container()

# ---- summarise and continue (asked for from the context meter below) ---------------------

if current and state.summary_pending:
    state.summary_pending = False
    try:
        with st.spinner("The model is summarising the older turns…"):
            summarise_and_continue(store, user, current.id, server, settings)
    except TorchServeError as error:
        st.error(f"The summary failed: {error.message}")
        state.forget_health()

# ---- files to add to the next message, counted before it is sent --------------------------

path_so_far = store.messages(user, current.id) if current else []
so_far = context_use(path_so_far)
with attachment_box:
    with st.popover("Attach text files", icon=":material/attach_file:"):
        uploads = st.file_uploader("Text files (.txt, .md, .csv, source code)", type=ACCEPTED_TYPES,
                                   accept_multiple_files=True, key=f"attachments-{state.attachment_round}")
    attachments, refusals = [], []
    for upload in uploads or []:
        try:
            attachments.append(read_attachment(upload.name, upload.getvalue()))
        except AttachmentRefused as refusal:
            refusals.append(str(refusal))
    if attachments:
        try:
            check_fits(attachments, so_far.length if so_far else ASSUMED_CONTEXT, so_far.used if so_far else 0,
                       settings.max_tokens)
        except AttachmentRefused as refusal:
            refusals.append(str(refusal))
            attachments = []
    for refusal in refusals:
        st.error(refusal, icon=":material/block:")
    if attachments:
        st.caption(" · ".join(f"{a.name} ≈ {a.tokens:,} tokens" for a in attachments)
                   + f" — added to your next message (estimated at {ESTIMATE_CHARS_PER_TOKEN} characters a token: "
                   "the server has no tokenize route)")

# ---- a new message (read first, so the page below is drawn once, with it) ---------------

if prompt := st.chat_input("Message the model", submit_mode="disable"):
    if current is None:
        current = store.create(user)
        state.conversation_id = current.id
    # Saved before the model is asked: a server failure cannot lose it.
    store.add_user_message(user, current.id, with_attachments(prompt, attachments))
    state.answer_pending, state.continue_id = True, None
    if uploads:
        state.attachment_round += 1  # a fresh, empty uploader for the next message

# ---- the conversation: the selected path, each message with its controls --------------------

history = store.messages(user, current.id) if current else []
drawn = 0  # elements drawn into conversation_box, to blank what the last run drew beyond them
with conversation_box:
    if not history:
        st.caption("Ask anything. Answers come from the model on your TorchServe.")
        drawn += 1
    last_box = None
    for index, message in enumerate(history):
        is_last = index == len(history) - 1
        busy = state.answer_pending  # controls are drawn, but not offered, while an answer is coming
        last_box = st.chat_message(message.role)
        drawn += 1
        with last_box:
            if message.role == "user":
                st.markdown(as_markdown(message.content))
                with st.container(horizontal=True, vertical_alignment="center", key=f"controls-{message.id}"):
                    branch_switch(current.id, message)
                    with st.popover("Edit", icon=":material/edit:", disabled=busy):
                        st.text_area("Your message", value=message.content, key=f"edit-text-{message.id}")
                        st.button("Send", key=f"send-edit-{message.id}", type="primary", on_click=send_edit,
                                  args=(current.id, message))
                continue
            show_assistant_message(message)
            if caption := answer_caption(message):
                st.caption(caption)
            if is_last and state.continue_id == message.id:
                continue  # its continuation streams below, into this message
            with st.container(horizontal=True, vertical_alignment="center", key=f"controls-{message.id}"):
                branch_switch(current.id, message)
                st.button("Regenerate", icon=":material/autorenew:", key=f"regenerate-{message.id}", disabled=busy,
                          on_click=answer_again, args=(current.id, message.parent_id),
                          help="Ask the model again; this answer is kept as another version")
                with st.popover("Copy", icon=":material/content_copy:"):
                    st.code(message.content, language=None, wrap_lines=True)
                if is_last and message.cut_short and not busy:
                    st.button("Continue", icon=":material/play_arrow:", key=f"continue-{message.id}",
                              on_click=continue_answer, args=(message.id,),
                              help="Ask the model to go on from where the answer was cut")

    use = context_use(history)
    if use:
        context_placeholder.progress(use.fraction, text=use.label())
        if use.dropped_note():
            st.warning(use.dropped_note(), icon=":material/history:")
            drawn += 1
        if use.nearly_full and not state.answer_pending:
            with st.container(border=True):
                st.caption(f"The conversation fills {use.fraction:.0%} of the model's context. The model can "
                           "summarise the older turns and go on from the summary in a new branch "
                           "(the original messages are kept).")
                st.button("Summarise and continue", icon=":material/summarize:", key="summarise",
                          on_click=ask_for_summary)
            drawn += 1

    if current and needs_answer(history) and not state.answer_pending:
        # When the server is unwell, the health message above already says why.
        failure = history[-1].error or state.last_error
        if failure and health.ok:
            st.error(f"The answer failed: {failure}")
            drawn += 1
        if state.last_failure and state.last_failure != health.failure:
            show_failure(state.last_failure)
            drawn += 1
        st.button("Retry", icon=":material/refresh:", on_click=retry, args=(current.id,))
        drawn += 1

if current:
    st.query_params["conversation"] = str(current.id)
else:
    st.query_params.pop("conversation", None)

# Listed after the new message is saved, so a conversation it started shows at once,
# even when its answer is stopped (a stopped run draws nothing more).
with conversation_list:
    if searched.strip():
        hits = store.search(user, searched)
        if not hits:
            st.caption("No conversation holds that.")
        for hit in hits:
            st.button(hit.conversation.title, key=f"found-{hit.conversation.id}", on_click=state.open,
                      args=(hit.conversation.id,), width="stretch", type="tertiary")
            st.caption(hit.snippet)
    else:
        for conversation in store.list(user):
            st.button(conversation.title, key=f"open-{conversation.id}", on_click=state.open,
                      args=(conversation.id,), width="stretch",
                      icon=":material/keep:" if conversation.pinned else None,
                      type="primary" if current and conversation.id == current.id else "tertiary")
    if current:
        with st.expander("This conversation"):
            st.session_state.setdefault(f"title-{current.id}", current.title)
            st.text_input("Title", key=f"title-{current.id}", on_change=rename_conversation, args=(current.id,))
            st.button("Unpin" if current.pinned else "Pin", icon=":material/keep:", key="pin",
                      on_click=store.pin, args=(user, current.id, not current.pinned))
            st.button("Delete conversation", icon=":material/delete:", on_click=delete_conversation,
                      args=(current.id, current.title))

# ---- stream the answer, then save it -----------------------------------------------

if state.answer_pending:
    continuing = state.continue_id
    state.answer_pending, state.continue_id = False, None
    state.last_error = state.last_failure = None
    path = store.messages(user, current.id)
    if continuing and path and path[-1].id == continuing:
        messages, continues, box = continue_messages(settings.system_prompt, path), path[-1], last_box
    else:
        messages, continues = request_messages(settings.system_prompt, path), None
        with conversation_box:
            box = st.chat_message("assistant")
            drawn += 1
    with conversation_box:
        # What the last run drew below this point (an older answer of a longer path, its
        # controls) would stay on the page, greyed, until this run ends: blank it now.
        for _ in range(state.drawn - drawn):
            st.empty()
    state.drawn = drawn
    started = datetime.now()
    with box:
        # A click on any widget ends this run (Streamlit reruns the page; the answer is saved as
        # stopped and the next run shows it labelled so): this button is there to be clicked.
        # The message box is disabled meanwhile (a Stop there would end the run without a next
        # one, so the label would wait for the next click).
        st.button("Stop", icon=":material/stop_circle:", key="stop_answer")
        waiting, text = st.empty(), st.empty()
        # A new message box at the place of an older one keeps that one's contents, greyed,
        # until this run ends (a regenerated answer over the one it replaces): blank them.
        for _ in range(BLANKED_CHILDREN):
            st.empty()
        try:
            with Answer(store, user, current.id, server, settings, messages,
                        parent_id=path[-1].id if path else None, continues=continues,
                        on_wait=lambda why, pause: waiting.info(f"{why.message} Trying again in {pause:.0f} s…")
                        ) as answer:
                state.running_answer = answer
                with text.container():
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
state.drawn = drawn
