"""Response schemas shared by the API's routers (labeling.api, training.api)."""

from typing import Any

from ninja import Schema


class ValidationErrorOut(Schema):
    """What django-ninja answers, with 422, to a request whose path, query, form or body does
    not validate: pydantic's list of errors, each with its "loc", "msg" and "type"."""

    detail: list[dict[str, Any]]


# Every operation that takes input lists this among its responses, so the schema says so.
INVALID = {422: ValidationErrorOut}
