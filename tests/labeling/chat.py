"""Conversations the labeling tests share."""

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Colour of the sky?"},
]


def said(text: str) -> list[dict]:
    """A completion in TRL's conversational form: one assistant message."""
    return [{"role": "assistant", "content": text}]
