"""What one browser session of the chat page remembers between its script runs
(kept in st.session_state under one key; the widgets keep their own values)."""

from __future__ import annotations

from dataclasses import dataclass

from chatstack.reply_stream import Answer
from chatstack.server_health import Health
from chatstack.worker_failures import WorkerFailure


@dataclass
class ClientState:
    conversation_id: int | None = None   # the open conversation (also in the URL)
    user: str | None = None              # whose conversations these are
    answer_pending: bool = False         # the next run streams an answer to the selected path's last message...
    continue_id: int | None = None       # ...or continues this answer, which was cut short
    deleted: tuple[int, str] | None = None  # the conversation just deleted (id, title), offered for undo
    summary_pending: bool = False        # the next run asks the model to summarise the older turns
    attachment_round: int = 0            # a new number empties the file uploader after a message is sent
    drawn: int = 0                       # elements the last run drew for the conversation (see chat page)
    running_answer: Answer | None = None  # an answer a run is streaming; a run started by a click waits for it
    health: Health | None = None         # checked before the first message and after a failed call...
    health_model: str | None = None      # ...for this model
    last_error: str | None = None        # why the last answer failed, when nothing was saved
    last_failure: WorkerFailure | None = None  # the worker death behind that failure, if one was found
    settings_loaded: bool = False        # the chat settings were read from the database

    def open(self, conversation_id: int | None) -> None:
        self.conversation_id = conversation_id
        self.answer_pending = False
        self.continue_id = None

    def health_for(self, model: str) -> Health | None:
        """The last health check, if it was made for `model`."""
        return self.health if self.health_model == model else None

    def set_health(self, model: str, health: Health | None) -> None:
        self.health, self.health_model = health, model

    def forget_health(self) -> None:
        """Check again on the next run."""
        self.health = None
