"""Database ids as they come in from URLs, query strings and JSON bodies.

Ids are positive 64-bit integers. A larger number would overflow the database driver
(a 500) before any lookup, so every selector parses ids with :func:`as_id` (anything else
is a 404, like an id that does not exist), page URLs only match ids of up to 18 digits, and
ids in JSON bodies and query strings are checked by pydantic (a 422 naming the field).
JSON ids are strict: ``true`` is not the id 1.
"""

from typing import Annotated

from django.urls import register_converter
from pydantic import Field, StrictInt

MAX_ID = 2**63 - 1

Id = Annotated[StrictInt, Field(ge=1, le=MAX_ID)]
"""An id in a JSON body."""

QueryId = Annotated[int, Field(ge=1, le=MAX_ID)]
"""An id in a query string (text, so not strict)."""


class IdConverter:
    """``<id:name>`` in Django URL patterns."""

    regex = "[0-9]{1,18}"  # 10**18 - 1 < 2**63 - 1

    def to_python(self, value: str) -> int:
        return int(value)

    def to_url(self, value) -> str:
        return str(value)


register_converter(IdConverter, "id")


def as_id(value) -> int | None:
    """``value`` (an int or a string of digits) as an id, or None when it cannot be one (not a
    whole number, a bool, below 1 or above :data:`MAX_ID`): callers answer None with a 404."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
        if not (value.isascii() and value.isdigit()) or len(value) > 19:  # not "²"
            return None
        value = int(value)
    if not isinstance(value, int) or not 1 <= value <= MAX_ID:
        return None
    return value
