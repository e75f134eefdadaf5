"""Conversations: a prompt (or a demonstration) as role/content turns.

The shape is the Hugging Face chat format that ``tokenizer.apply_chat_template`` and TRL's
conversational datasets read::

    [{"role": "system", "content": "Be brief."},       # optional, first only
     {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Colour of the sky?"}]

User and assistant turns alternate, starting with the user. A prompt ends with a user turn
(the model answers it); a demonstration ends with an assistant turn (every assistant turn is a
training target). Torch-free: the labeling import and the engine check turns with the same
rules and the same words.
"""

from __future__ import annotations

from typing import Any, Literal

ROLES = ("system", "user", "assistant")


class ConversationError(ValueError):
    """A turn that breaks the rules; ``field`` names it, e.g. ``messages[2].role``."""

    def __init__(self, field: str, message: str):
        super().__init__(f"field '{field}' {message}")
        self.field = field


def conversation_check(
    value: Any, *, name: str = "messages", last: Literal["user", "assistant"] | None = "user"
) -> list[dict]:
    """Return ``value`` when it is a well-formed conversation whose final turn is from
    ``last`` (None: either); raise ConversationError naming the first bad field."""
    if not isinstance(value, list) or not value:
        raise ConversationError(name, 'must be a non-empty array of {"role", "content"} objects')
    expect = "user"
    for i, turn in enumerate(value):
        at = f"{name}[{i}]"
        if not isinstance(turn, dict):
            raise ConversationError(at, "must be an object with 'role' and 'content'")
        for key in ("role", "content"):
            if key not in turn:
                raise ConversationError(at, f"is missing '{key}'")
            if not isinstance(turn[key], str):
                raise ConversationError(f"{at}.{key}", "must be a string")
        role = turn["role"]
        if role not in ROLES:
            raise ConversationError(
                f"{at}.role", f"is {role!r}: a role is one of {', '.join(ROLES)}"
            )
        if not turn["content"].strip():
            raise ConversationError(f"{at}.content", "is empty")
        if role == "system":
            if i:
                raise ConversationError(f"{at}.role", "is 'system': only the first turn may be")
            continue
        if role != expect:
            raise ConversationError(
                f"{at}.role",
                f"is {role!r} where {expect!r} comes next (user and assistant turns alternate, "
                "starting with the user)",
            )
        expect = "assistant" if role == "user" else "user"
    final = value[-1]["role"]
    if final == "system":
        raise ConversationError(name, "holds a system turn and nothing to answer")
    if last is not None and final != last:
        what = (
            "a prompt ends with a user turn"
            if last == "user"
            else "a demonstration ends with an assistant turn"
        )
        raise ConversationError(f"{name}[{len(value) - 1}].role", f"is {final!r}: {what}")
    return value


def conversation_text(messages: list[dict]) -> str:
    """The plain-text form of a conversation: "role: content" blocks, one blank line apart
    (what Prompt.text holds for a conversation, and what a tokenizer without a chat template
    reads)."""
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)
