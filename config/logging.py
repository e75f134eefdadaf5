"""Logging filters named in settings.LOGGING."""

import logging


class ClientErrorsWithoutTraceback(logging.Filter):
    """Django logs a 403 (PermissionDenied), 404 or 400 with the exception's traceback, as if the
    server had failed. A client error is a normal answer: keep its one-line record, drop the
    traceback. A 5xx keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        status = getattr(record, "status_code", None)
        if status is not None and status < 500:
            record.exc_info = None
            record.exc_text = None
        return True
