"""The errors a client sees, and the one table from an exception to one of them.

An error is OpenAI's `{"error": {"message", "type", "param", "code"}}` with an HTTP status.
`api_error` turns whatever a request raised into that: bad input is a 400 naming the
parameter, a request stopped at its time limit a 504, anything unexpected a 500 that says
only the exception's type (the log has the rest).
"""

from __future__ import annotations

import json

from chat_prompt import ContextOverflow, TemplateRefused
from llama_engine import InvalidGrammar, PromptTooLong


class ApiError(Exception):
    """An error the client caused or must hear about, with its HTTP status."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.type = type

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


class RequestTimedOut(Exception):
    """A request still generating when its time was up; the engine was told to cancel it."""

    def __init__(self, timeout_s: float):
        super().__init__(f"the request ran longer than the response timeout ({timeout_s:.0f} s) and was stopped")


class GenerationFailed(RuntimeError):
    """The engine could not go on with a request (llama_decode failed)."""

    def __init__(self, detail: str):
        super().__init__(f"generation failed: {detail}")


# exception -> (HTTP status, error type, parameter); the message is the exception's, with its notes.
ERRORS: dict[type[Exception], tuple[int, str, str | None]] = {
    ContextOverflow: (400, "invalid_request_error", "messages"),   # a chat that cannot fit
    TemplateRefused: (400, "invalid_request_error", "messages"),   # the chat template raised
    PromptTooLong: (400, "invalid_request_error", "prompt"),       # a plain completion that cannot fit
    InvalidGrammar: (400, "invalid_request_error", "grammar"),     # GBNF llama.cpp cannot parse
    RequestTimedOut: (504, "timeout", None),
    GenerationFailed: (500, "server_error", None),
}


def api_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    for kind, (status, type_, param) in ERRORS.items():
        if isinstance(exc, kind):
            message = " ".join([str(exc), *(f"({note})" for note in getattr(exc, "__notes__", ()))])
            return ApiError(message, status=status, param=param, type=type_)
    return ApiError(f"internal error: {type(exc).__name__}", status=500, type="server_error")
