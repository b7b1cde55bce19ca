"""Text files added to a message: read, counted, refused with the numbers."""

from __future__ import annotations

import pytest

from chatstack.attachments import (
    ESTIMATE_CHARS_PER_TOKEN, Attachment, AttachmentRefused, check_fits, read_attachment, with_attachments,
)


def test_text_files_become_part_of_the_message_with_their_name_and_language():
    notes = read_attachment("notes.md", "# Plan\n- ship it\n".encode())
    code = read_attachment("tool.py", b"print('hi')\n")
    assert (notes.language, code.language) == ("markdown", "python")
    message = with_attachments("Review these.", [notes, code])
    assert message == "Review these.\n\nFile notes.md:\n```markdown\n# Plan\n- ship it\n```" \
                      "\n\nFile tool.py:\n```python\nprint('hi')\n```"
    assert with_attachments("Just text.", []) == "Just text."
    # A file holding a fence gets a longer one, so it stays one block.
    assert read_attachment("a.md", b"```x```").as_content().startswith("File a.md:\n````markdown")


def test_the_token_count_is_an_estimate_from_the_length():
    attachment = Attachment("data.csv", "a,b\n" * 100)
    assert attachment.tokens == -(-len(attachment.as_content()) // ESTIMATE_CHARS_PER_TOKEN)


@pytest.mark.parametrize("name, data, says", [
    ("photo.png", b"\x89PNG", "only text files can be attached"),
    ("notes.txt", b"caf\xe9", "notes.txt is not UTF-8 text (byte 3"),
    ("dump.txt", b"a\x00b", "holds NUL bytes"),
])
def test_files_that_are_not_text_are_refused_by_name(name, data, says):
    with pytest.raises(AttachmentRefused, match=says.replace("(", r"\(")):
        read_attachment(name, data)


def test_files_too_large_for_the_context_are_refused_with_the_numbers():
    small = Attachment("small.txt", "x" * 400)
    check_fits([small], context_length=2048, context_used=1000, answer_room=512)
    big = Attachment("big.txt", "x" * 8000)
    with pytest.raises(AttachmentRefused) as refused:
        check_fits([small, big], context_length=2048, context_used=1000, answer_room=512)
    message = str(refused.value)
    total = small.tokens + big.tokens
    assert f"about {total:,} tokens" in message and f"big.txt (≈{big.tokens:,})" in message
    assert "context is 2,048 tokens" in message and "uses 1,000" in message and "keeps 512, leaving 536" in message
