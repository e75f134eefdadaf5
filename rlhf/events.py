"""The engine's event stream: what a supervisor reads from ``python -m rlhf <kind> --events``.

One JSON object per line (written whole and flushed, so a reader never sees half of one):

    {"event": "log", "line": "rlhf.sft: ..."}                 a record of the ``rlhf`` logger
    {"event": "metrics", "step": 12, "metrics": {...}}         after each optimizer step
    {"event": "checkpoint", "step": 10, "path": "..."}         once the folder is complete
    {"event": "result", "step", "stopped", "checkpoint", "metrics"}   a training run ended
    {"event": "result", "rows", "stopped", "path"}             a sampling run ended
    {"event": "failed", "reason": "...", "expected": true}     the run cannot go on

``reason`` is what a person is shown: for the errors the engine names (bad config or data,
NaN loss, out of memory, a failing reward function) it is the engine's own message with its
advice and ``expected`` is true; for anything else it is ``Type: message``, ``expected`` is
false and ``traceback`` holds a short traceback for the operator's log. Non-finite metric
values are written as null (JSON has no NaN).

Under torchrun only rank 0 writes, except ``failed``, which any rank reports.

Trainers need not know about this module beyond :func:`emit`: it is a no-op unless
``python -m rlhf`` opened a stream (:func:`streaming`), the way a logger is silent without a
handler.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import math
import os
import signal
import threading
import traceback
from collections.abc import Iterator
from typing import IO, Any

from rlhf.errors import (
    ConfigError,
    DataError,
    NonFiniteLossError,
    OutOfMemoryError,
    RewardFunctionError,
    TrainingError,
)

EVENTS = ("log", "metrics", "checkpoint", "result", "failed")


class EventWriter:
    """Writes events as JSON lines to ``stream``; thread-safe. ``rank`` > 0 writes only
    ``failed`` events (rank 0 speaks for the group)."""

    def __init__(self, stream: IO[str], *, rank: int = 0):
        self.stream = stream
        self.rank = rank
        self._lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> None:
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}")
        if self.rank != 0 and event != "failed":
            return
        line = json.dumps({"event": event, **fields}, default=_plain, allow_nan=False)
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()


def _plain(obj: Any) -> Any:
    return str(obj)  # paths and other objects a metric dict may carry


def finite(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """``metrics`` with every non-finite float as None, so it is valid JSON."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v)
        for k, v in (metrics or {}).items()
    }


_writer: EventWriter | None = None


def emit(event: str, **fields: Any) -> None:
    """Write an event to the open stream, if any (see :func:`streaming`)."""
    if _writer is not None:
        _writer.emit(event, **fields)


class _LogHandler(logging.Handler):
    def __init__(self, writer: EventWriter):
        super().__init__(level=logging.INFO)
        self.writer = writer
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.writer.emit("log", line=self.format(record))
        except Exception:  # pragma: no cover - logging must never break a run
            self.handleError(record)


@contextlib.contextmanager
def streaming(writer: EventWriter) -> Iterator[EventWriter]:
    """Make ``writer`` the stream of :func:`emit` and copy the ``rlhf`` logger's INFO records
    into it as ``log`` events, until the block ends."""
    global _writer
    logger = logging.getLogger("rlhf")
    handler = _LogHandler(writer)
    previous_writer, previous_level = _writer, logger.level
    _writer = writer
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield writer
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
        _writer = previous_writer


def failure(exc: BaseException) -> dict[str, Any]:
    """The fields of the ``failed`` event for ``exc``: the engine's own message (with the
    kind of failure a person reads first) for the errors it names, else the type and message
    and a short traceback."""
    import torch

    prefixes = (
        (NonFiniteLossError, "Training diverged"),
        (OutOfMemoryError, "Out of memory"),
        (ConfigError, "Invalid config"),
        (DataError, "Invalid data"),
        (RewardFunctionError, "Reward function failed"),
    )
    for cls, prefix in prefixes:
        if isinstance(exc, cls):
            return {"reason": f"{prefix}: {exc}", "expected": True}
    if isinstance(exc, torch.OutOfMemoryError):
        return {
            "reason": "Out of memory: reduce batch_size or max_seq_len (or raise grad_accum_steps).",
            "expected": True,
        }
    if isinstance(exc, TrainingError):
        return {"reason": str(exc), "expected": True}
    return {
        "reason": f"{type(exc).__name__}: {exc}",
        "expected": False,
        "traceback": "".join(traceback.format_exception(exc, limit=-8)),
    }


# --------------------------------------------------------------------------- process group

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies (prctl
    PR_SET_PDEATHSIG), so a supervisor killed with kill -9 leaves no training process behind.
    Returns False where it is not available (not Linux)."""
    prctl = libc_prctl()
    return prctl is not None and prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


_libc_prctl = None


def libc_prctl():
    """libc's prctl, looked up once (a ``preexec_fn`` between fork and exec must not load
    libraries: call this before forking)."""
    global _libc_prctl
    if _libc_prctl is None and os.uname().sysname == "Linux":
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc_prctl = libc.prctl
    return _libc_prctl
