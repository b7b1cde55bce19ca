"""Summarise and continue: when a conversation nearly fills the model's context, the
model writes a summary of the older turns, and the conversation goes on in a new branch
that starts from that summary (the original messages stay on their branch).

Plain Python (no Streamlit).
"""

from __future__ import annotations

from chatstack.chat_settings import ChatSettings, request_messages
from chatstack.conversations import FAILED, ConversationStore, Message
from chatstack.server_settings import ServerSettings

KEEP_LAST = 2  # the latest turns are copied as they are (the last question and its answer)
SUMMARY_MAX_TOKENS = 384
SUMMARY_REQUEST = ("Summarise this conversation between a user and an assistant in a few short sentences: what "
                   "the user asked and told, what the assistant answered, and any facts, names or numbers needed "
                   "to carry on. Write only the summary.")
SUMMARY_HEADING = "Summary of the earlier conversation:"


def summary_messages(system_prompt: str, older: list[Message]) -> list[dict]:
    """What to send to have `older` summarised: the turns as one transcript in one request (small
    models summarised the request itself when the turns came as chat messages before it)."""
    transcript = "\n\n".join(f"{message['role'].capitalize()}: {message['content']}"
                               for message in request_messages("", older))
    messages = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    return messages + [{"role": "user", "content": f"{SUMMARY_REQUEST}\n\n{transcript}"}]


def split_for_summary(path: list[Message]) -> tuple[list[Message], list[Message]]:
    """(the turns to summarise, the latest turns kept word for word)."""
    kept = [m for m in path if not (m.role == "assistant" and m.status == FAILED)]
    return kept[:-KEEP_LAST], kept[-KEEP_LAST:]


def summarise_and_continue(store: ConversationStore, user: str, conversation_id: int, server: ServerSettings,
                           settings: ChatSettings) -> list[Message]:
    """Ask the model for a summary of the older turns and start a new branch with it (a first
    message holding the summary, then copies of the latest turns); returns the new path.
    Raises TorchServeError when the server fails (nothing is changed then)."""
    path = store.messages(user, conversation_id)
    older, latest = split_for_summary(path)
    if not older:
        raise ValueError("nothing to summarise: the conversation is only its latest turns")
    answer = server.client().chat(settings.model, summary_messages(settings.system_prompt, older),
                                  temperature=settings.temperature, top_p=settings.top_p,
                                  max_tokens=SUMMARY_MAX_TOKENS)
    summary = (answer["choices"][0]["message"].get("content") or "").strip()
    # The summary is the user's first message of the new branch: the model reads it as what
    # the person told it so far, and the page shows it, so nothing is hidden.
    parent = store.add_user_message(user, conversation_id, f"{SUMMARY_HEADING}\n\n{summary}", parent_id=None)
    for message in latest:
        if message.role == "user":
            parent = store.add_user_message(user, conversation_id, message.content, parent_id=parent.id)
        else:  # the answer as it was, without the old context figures (they no longer apply)
            parent = store.add_answer(user, conversation_id, message.content, status=message.status,
                                      model=message.model, reasoning=message.reasoning,
                                      tool_calls=message.tool_calls, details=message.details, parent_id=parent.id)
    return store.messages(user, conversation_id)
