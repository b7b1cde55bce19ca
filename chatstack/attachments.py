"""Text files added to a message: read as UTF-8, counted in tokens before sending, and
refused, with the numbers, when they cannot fit the model's context.

The server has no route that tokenizes text, so the count is an estimate from the
length of the text: ESTIMATE_CHARS_PER_TOKEN characters a token (the default model's
tokenizer averages about 4 on English prose and code). The page says it is an estimate.

Plain Python (no Streamlit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import PurePath

ESTIMATE_CHARS_PER_TOKEN = 4
ASSUMED_CONTEXT = 2048  # the default model's context, used until an answer reports the real one

# Plain text, Markdown, CSV and source code: what can be read as text and makes sense to a model.
TEXT_SUFFIXES = {
    ".txt": "", ".md": "markdown", ".markdown": "markdown", ".csv": "csv", ".tsv": "", ".log": "",
    ".py": "python", ".js": "javascript", ".ts": "typescript", ".jsx": "jsx", ".tsx": "tsx", ".java": "java",
    ".kt": "kotlin", ".c": "c", ".h": "c", ".cpp": "cpp", ".hpp": "cpp", ".cc": "cpp", ".cs": "csharp",
    ".go": "go", ".rs": "rust", ".rb": "ruby", ".php": "php", ".swift": "swift", ".scala": "scala",
    ".sh": "bash", ".bash": "bash", ".sql": "sql", ".r": "r", ".lua": "lua", ".pl": "perl",
    ".html": "html", ".css": "css", ".xml": "xml", ".json": "json", ".yaml": "yaml", ".yml": "yaml",
    ".toml": "toml", ".ini": "ini", ".cfg": "ini", ".properties": "properties",
}
ACCEPTED_TYPES = [suffix.lstrip(".") for suffix in TEXT_SUFFIXES]


class AttachmentRefused(ValueError):
    """A file that cannot be attached; the message says why, with the numbers where there are some."""


@dataclass(frozen=True)
class Attachment:
    name: str
    text: str

    @property
    def language(self) -> str:
        return TEXT_SUFFIXES.get(PurePath(self.name).suffix.lower(), "")

    @property
    def tokens(self) -> int:
        return estimate_tokens(self.as_content())

    def as_content(self) -> str:
        """The file as it is added to the message: its name, then its text in a fenced block."""
        fence = "````" if "```" in self.text else "```"
        return f"File {self.name}:\n{fence}{self.language}\n{self.text.rstrip()}\n{fence}"


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / ESTIMATE_CHARS_PER_TOKEN)


def read_attachment(name: str, data: bytes) -> Attachment:
    """The file as text; refused if its type is not a text type or its bytes are not UTF-8 text."""
    suffix = PurePath(name).suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise AttachmentRefused(f"{name}: only text files can be attached ({', '.join(sorted(TEXT_SUFFIXES))})")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise AttachmentRefused(f"{name} is not UTF-8 text (byte {error.start} cannot be read)") from None
    if "\x00" in text:
        raise AttachmentRefused(f"{name} holds NUL bytes: it is not a text file")
    return Attachment(name, text)


def check_fits(attachments: list[Attachment], context_length: int, context_used: int, answer_room: int) -> None:
    """Refuse files that cannot fit beside the conversation and the room kept for the answer."""
    total = sum(a.tokens for a in attachments)
    available = context_length - context_used - answer_room
    if total > available:
        names = ", ".join(f"{a.name} (≈{a.tokens:,})" for a in attachments)
        raise AttachmentRefused(
            f"Too large for the context: the files are about {total:,} tokens ({names}); the model's context is "
            f"{context_length:,} tokens, of which the conversation uses {context_used:,} and the answer keeps "
            f"{answer_room:,}, leaving {max(available, 0):,}.")


def with_attachments(text: str, attachments: list[Attachment]) -> str:
    """The message as sent and saved: what was typed, then each file."""
    return "\n\n".join([text, *(a.as_content() for a in attachments)]) if attachments else text
