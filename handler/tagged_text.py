"""Streamed text with tags in it (`<tool_call>`, `<think>`): what to hold back."""


def partial_tail(text: str, tag: str) -> int:
    """Length of the longest end of text that is a start of tag (held back: it may become the tag)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
