"""The bridge between a running engine and the database, for one claimed job.

``engine_run(command, monitor=...)`` starts the engine (``python -m rlhf <kind> ... --events``,
or torchrun with the job's device count) as a child process group and supervises it: a
thread reads its JSON-line events (rlhf/events.py) and this thread turns them into the
monitor's calls; a stop (cancel, lost job, worker shutting down) sends SIGINT to the group,
which stops at its next step with a checkpoint, and SIGKILL after ``TRAINING_STOP_GRACE_S``.
The child gets PR_SET_PDEATHSIG=SIGKILL, so a worker killed with kill -9 takes it along.

``JobMonitor`` turns the engine's progress into service calls:

- ``on_step(step, metrics)`` buffers metric points and writes them in batches (every second,
  every 500 points, and at every checkpoint step), together with the progress and new log
  lines, in one owner-guarded transaction (``services.metric_points_write``);
- ``should_stop()`` reads the cancel flag and the job's ownership from the database at most
  once a second; it is also true at once when the worker is shutting down
  (:data:`WORKER_STOPPING`, set by SIGTERM in the pool process, see training.worker): the
  engine then saves a checkpoint and the job goes back to the queue (``released``);
- a heartbeat thread proves the worker is alive every ``TRAINING_HEARTBEAT_S`` seconds, also
  during a long step or while the base model loads; if the worker dies (kill -9), the
  heartbeat stops and ``services.jobs_recover_stale`` takes the job back;
- ``checkpoint_written(path)`` registers each checkpoint the engine completed
  (``on_checkpoint``) as soon as its event arrives, so it is usable while the job still runs.

Log records of the ``rlhf`` logger (an engine run in this process: evaluation) are copied into
the job's log tail while it runs; a child's arrive as ``log`` events.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from django.db import DatabaseError, close_old_connections, connection

from training import services

logger = logging.getLogger(__name__)

WORKER_STOPPING = threading.Event()
"""Set when this worker process is asked to stop (a warm shutdown: ``docker stop``, Ctrl-C
of ``manage.py studio``): the running job stops at its next step with a checkpoint."""


def request_stop(signum=None, frame=None) -> None:
    """Signal handler (SIGTERM in a pool process): stop the running job at its next step. A
    second SIGTERM (a cold shutdown, ``kill`` again) ends the process at once, as before."""
    if signum is not None and WORKER_STOPPING.is_set():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    WORKER_STOPPING.set()


@contextlib.contextmanager
def stop_on_sigterm():
    """While a job runs in a pool process, SIGTERM asks it to stop at its next step instead of
    ending the process mid-step (billiard's own handler). In the worker's main process (the
    solo pool, or a direct call) Celery's handler stays: its warm shutdown calls
    :func:`request_stop` through training.worker."""
    from billiard.process import current_process

    if (
        current_process().name == "MainProcess"
        or threading.current_thread() is not threading.main_thread()
    ):
        yield
        return
    WORKER_STOPPING.clear()  # no handler was installed before: no stop request can be lost
    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _JobLogHandler(logging.Handler):
    def __init__(self, monitor: JobMonitor):
        super().__init__(level=logging.INFO)
        self.monitor = monitor

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.monitor.log(self.format(record))
        except Exception:  # pragma: no cover - logging must never break a run
            self.handleError(record)


class JobMonitor:
    FLUSH_EVERY_S = 1.0
    FLUSH_POINTS = 500
    STOP_CHECK_EVERY_S = 1.0

    def __init__(
        self,
        *,
        job_id: int,
        token: str,
        total_steps: int = 0,
        save_every: int = 0,
        heartbeat_s: float | None = None,
        on_checkpoint=None,
    ):
        self.job_id = job_id
        self.on_checkpoint = on_checkpoint  # called with each new complete checkpoint folder
        self._seen_checkpoints: set[str] = set()
        self.save_every = save_every
        self.token = token
        self.total_steps = total_steps
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else services.heartbeat_every_s()
        self.step = 0
        self.step_offset = 0  # evaluation runs several engine calls on one progress bar
        self.lost = False  # the job was taken from this worker: stop and write nothing more
        self.cancelled = False
        self.released = False  # stopped because the worker is shutting down: back to the queue
        self._points: list[tuple[int, str, float]] = []
        self._lines: list[str] = []
        self._last_flush = time.monotonic()
        self._last_stop_check = 0.0
        self._last_logged_step = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handler = _JobLogHandler(self)
        self._handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> JobMonitor:
        self._thread = threading.Thread(
            target=self._heartbeat_loop, name=f"job-{self.job_id}-heartbeat", daemon=True
        )
        self._thread.start()
        logging.getLogger("rlhf").addHandler(self._handler)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("rlhf").removeHandler(self._handler)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.heartbeat_s * 2))
        self.flush()

    def checkpoint_written(self, path: str) -> None:
        """The engine completed the checkpoint folder ``path``: register it now
        (``on_checkpoint``), so it is usable while the job still runs."""
        if self.on_checkpoint is None or self.lost or path in self._seen_checkpoints:
            return
        try:
            self.on_checkpoint(Path(path))
        except Exception:  # the final registration at the end of the job tries again
            logger.exception("job %s: could not register %s", self.job_id, path)
            return
        self._seen_checkpoints.add(path)

    def _heartbeat_loop(self) -> None:
        try:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    beat = services.job_heartbeat(job_id=self.job_id, token=self.token)
                except Exception:  # a database blip: try again at the next beat
                    logger.exception("job %s: heartbeat failed", self.job_id)
                    close_old_connections()
                    continue
                if not beat.owned:
                    self.lost = True
                if beat.cancel_requested:
                    self.cancelled = True
        finally:
            connection.close()  # this thread's own connection

    # ------------------------------------------------------------------ engine callbacks

    def on_step(self, step: int, metrics: dict) -> None:
        step = int(step) + self.step_offset
        total = metrics.get("progress/total_steps")
        with self._lock:
            if total:
                self.total_steps = int(total) + self.step_offset
            self.step = step
            for key, value in metrics.items():
                if key.startswith("progress/"):
                    continue
                if isinstance(value, (int, float)):
                    self._points.append((step, key, float(value)))
            every = max(1, (self.total_steps or 20) // 20)
            if step == 1 or step == self.total_steps or step - self._last_logged_step >= every:
                self._last_logged_step = step
                shown = ", ".join(
                    f"{k}={v:.4g}"
                    for k, v in list(metrics.items())[:4]
                    if isinstance(v, (int, float)) and not k.startswith("progress/")
                )
                self._lines.append(f"step {step}/{self.total_steps or '?'}: {shown}")
            due = (
                len(self._points) >= self.FLUSH_POINTS
                or time.monotonic() - self._last_flush >= self.FLUSH_EVERY_S
                # The engine saves a checkpoint right after this call: make the points up to
                # it durable, so a run resumed from that checkpoint has no gap in its curves.
                or (self.save_every and step % self.save_every == 0)
            )
        if due:
            self.flush()

    def should_stop(self) -> bool:
        stopping = WORKER_STOPPING.is_set()
        now = time.monotonic()
        if not (self.lost or self.cancelled or self.released) and (
            stopping or now - self._last_stop_check >= self.STOP_CHECK_EVERY_S
        ):  # on a worker stop, read the flags once more: a cancel wins over a release
            self._last_stop_check = now
            try:
                state = services.job_stop_requested(job_id=self.job_id, token=self.token)
            except DatabaseError:  # a database blip: ask again at the next check, keep training
                logger.warning("job %s: could not read its stop flags", self.job_id, exc_info=True)
                close_old_connections()
                return self.lost or self.cancelled or self.released
            self.lost = self.lost or not state.owned
            self.cancelled = self.cancelled or state.cancel_requested
            self.released = stopping and not (self.lost or self.cancelled)
        return self.lost or self.cancelled or self.released

    def log(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)

    def set_progress(self, step: int, total: int | None = None) -> None:
        with self._lock:
            self.step = step
            if total is not None:
                self.total_steps = total
        self.flush()

    def flush(self) -> None:
        with self._lock:
            points, self._points = self._points, []
            lines, self._lines = self._lines, []
            step, total = self.step, self.total_steps
            self._last_flush = time.monotonic()
        if self.lost:
            return
        try:
            written = services.metric_points_write(
                job_id=self.job_id,
                token=self.token,
                points=points,
                step=step or None,
                total_steps=total or None,
                log_lines=lines,
            )
        except DatabaseError:  # a database blip: keep the points for the next flush
            logger.warning("job %s: could not write its metrics", self.job_id, exc_info=True)
            close_old_connections()
            with self._lock:
                self._points[:0], self._lines[:0] = points, lines
            return
        if not written:
            self.lost = True


# --------------------------------------------------------------------------- the engine child

ENGINE_LOG = "engine.log"
"""The child's stderr, in its run folder: what the operator reads when it died without a word."""


@dataclass
class EngineOutcome:
    """How an engine child ended."""

    result: dict | None = None  # its ``result`` event
    failure: dict | None = None  # its first ``failed`` event (under torchrun: the first rank's)
    returncode: int | None = None
    stop_sent: bool = False  # it was asked to stop (SIGINT to the group)
    killed: bool = False  # asked to stop, it did not within the grace period
    last_output: str = ""  # the last line it wrote to stderr

    def reason(self) -> str:
        """Why the run ended without a result, as the job's error."""
        if self.failure is not None:
            return str(self.failure.get("reason") or "the engine failed")
        code = self.returncode
        if code is not None and code < 0:
            how = f"killed by {signal.Signals(-code).name}"
            if -code == signal.SIGKILL:
                how += ": out of memory (the system's OOM killer) or killed by hand"
        else:
            how = f"exit status {code}"
        last = f"; its last words: {self.last_output}" if self.last_output else ""
        return f"The training process ended without a result ({how}){last}"


def engine_command(
    kind: str,
    *,
    run_dir: Path,
    output_dir: str | Path,
    devices: int = 1,
    resume: bool = False,
    reward_model: str | None = None,
    reward_fn: str | None = None,
    stop_grace_s: float = 60,
) -> list[str]:
    """``python -m rlhf <kind> ... --events -`` on the inputs in ``run_dir``; with several
    devices the same command under torchrun, one process per device."""
    launcher = [sys.executable, "-m"]
    if devices > 1:
        # torchrun starts every rank in a session of its own: a stop reaches the ranks through
        # torchrun, which forwards it and kills them after its shutdown timeout, set to ours
        launcher += [
            "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}",
            f"--shutdown-timeout={int(stop_grace_s)}", "-m",
        ]  # fmt: skip
    command = [*launcher, "rlhf", kind]
    command += ["--config", str(run_dir / "config.json"), "--data", str(run_dir / "data.jsonl")]
    command += ["--out", str(output_dir)]
    if resume:
        command.append("--resume")
    if reward_model:
        command += ["--reward-model", str(reward_model)]
    if reward_fn:
        command += ["--reward-fn", reward_fn]
    return [*command, "--events", "-"]


def engine_env() -> dict[str, str]:
    """The worker's environment, with this project importable (a rule reward is a
    ``training.rewards:<name>`` function the engine imports without Django)."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


def engine_run(
    command: list[str],
    *,
    monitor: JobMonitor,
    log_path: Path,
    stop_grace_s: float,
    steps: bool = True,
) -> EngineOutcome:
    """Run the engine as a child process group and supervise it until it ends: its events
    become the monitor's calls (its ``metrics`` only with ``steps``); when ``monitor.should_stop()`` turns true the group gets
    SIGINT (a checkpoint at the next step), and SIGKILL ``stop_grace_s`` later if it is still
    running. Nothing outlives this call, nor the worker (PR_SET_PDEATHSIG)."""
    from rlhf.events import die_with_parent, libc_prctl

    libc_prctl()  # loaded here: the child must not load a library between fork and exec
    parent = os.getpid()

    def in_child() -> None:
        die_with_parent()
        if os.getppid() != parent:  # the worker died before the request took effect
            os._exit(1)

    with open(log_path, "ab") as stderr:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,  # its own process group (torchrun's ranks have their own)
            preexec_fn=in_child,  # noqa: PLW1509 - async-signal-safe: one prctl call
            env=engine_env(),
            text=True,
            encoding="utf-8",
            errors="replace",
        )
    events: queue.Queue = queue.Queue()
    reader = threading.Thread(
        target=_read_events, args=(proc.stdout, events), name="engine-events", daemon=True
    )
    reader.start()
    outcome = EngineOutcome()
    stop_sent_at: float | None = None
    try:
        while True:
            try:
                event = events.get(timeout=0.2)
            except queue.Empty:
                event = {}
            if event is None:  # the group closed its output: it has ended
                break
            if steps or event.get("event") != "metrics":
                _dispatch(event, monitor, outcome)
            if stop_sent_at is None and monitor.should_stop():
                stop_sent_at, outcome.stop_sent = time.monotonic(), True
                if monitor.lost:  # another worker owns the job now: no last checkpoint here
                    _signal_group(proc, signal.SIGKILL)
                    outcome.killed = True
                else:
                    _signal_group(proc, signal.SIGINT)
                    monitor.log("stop requested: the engine stops after its current step")
            elif (
                stop_sent_at is not None
                and not outcome.killed
                and time.monotonic() - stop_sent_at > stop_grace_s
            ):
                _signal_group(proc, signal.SIGKILL)
                outcome.killed = True
                monitor.log(f"the engine did not stop within {stop_grace_s:g} s: killed")
            elif outcome.killed and proc.poll() is not None:
                # killed, yet its output is still open: a process it started holds it
                waited = time.monotonic() - (stop_sent_at or time.monotonic())
                if waited > stop_grace_s + 10:
                    break
        outcome.returncode = proc.wait()
    finally:
        if proc.poll() is None:  # this thread failed: leave no engine behind
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=5)
        monitor.flush()
    outcome.last_output = _last_line(log_path)
    return outcome


def _read_events(stream, out: queue.Queue) -> None:
    """Each line of the child's stdout as an event; a stray line (not an event) as a log line.
    None at the end."""
    try:
        for raw in stream:
            line = raw.rstrip("\n")
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if not isinstance(event, dict) or not isinstance(event.get("event"), str):
                event = {"event": "log", "line": line}
            out.put(event)
    finally:
        out.put(None)


def _dispatch(event: dict, monitor: JobMonitor, outcome: EngineOutcome) -> None:
    kind = event.get("event")
    if kind == "metrics":
        metrics = {k: v for k, v in (event.get("metrics") or {}).items() if v is not None}
        monitor.on_step(int(event["step"]), metrics)
    elif kind == "log":
        monitor.log(str(event.get("line", "")))
    elif kind == "checkpoint":
        monitor.checkpoint_written(str(event["path"]))
    elif kind == "result":
        outcome.result = event
    elif kind == "failed" and outcome.failure is None:
        outcome.failure = event
        if not event.get("expected"):
            logger.error(
                "job %s: the engine failed: %s\n%s",
                monitor.job_id,
                event.get("reason"),
                event.get("traceback", ""),
            )


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # already gone
        pass


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [x for x in f.read().decode("utf-8", "replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1].strip()[:500] if lines else ""
