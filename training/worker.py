"""Stale-job recovery and warm shutdown inside every Celery worker.

When a worker is ready it re-sends the task of every queued job (a broker that restarted
without persistence may have lost it; duplicates are harmless, only one claim wins) and
starts a daemon thread that runs ``services.jobs_recover_stale`` every
``TRAINING_RECOVER_EVERY_S`` seconds. The thread lives in the worker's main process, so it
keeps running while the pool's child executes a long training job, and it needs no beat
process. Several workers may all run it: every change it makes is a compare-and-set.

When a worker is stopped (SIGTERM: ``docker stop``, Ctrl-C of ``manage.py studio``), its
running job stops at its next step, saves a checkpoint and goes back to the queue, so the
next worker resumes it there; the attempt is not counted.

A worker declares how many devices it has (``WORKER_DEVICES``; default: the GPUs it can see,
1 on a CPU) and, when it consumes the ``gpu`` queue, also consumes ``gpu-2`` ... ``gpu-D``:
a job on N devices is sent to ``gpu-N`` (``services.job_queue``), so it runs only on a
worker that has them.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading

from billiard.process import active_children
from celery.signals import (
    celeryd_after_setup,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)
from django.db import close_old_connections, connection

from training.runtime import request_stop

logger = logging.getLogger(__name__)

_stop = threading.Event()
_thread: threading.Thread | None = None


def recovery_loop(*, every_s: float, stale_after_s: float, stop: threading.Event) -> None:
    from training import services

    try:
        while True:
            try:
                close_old_connections()
                report = services.jobs_recover_stale(stale_after_s=stale_after_s)
                if report.requeued or report.failed or report.cancelled:
                    logger.warning(
                        "stale jobs: requeued %s, failed %s, cancelled %s",
                        report.requeued,
                        report.failed,
                        report.cancelled,
                    )
            except Exception:  # the database may be restarting: try again next round
                logger.exception("stale-job recovery failed")
                connection.close()
            if stop.wait(every_s):
                return
    finally:
        connection.close()


def worker_devices() -> int:
    """How many devices this worker offers a job: ``WORKER_DEVICES``, else the GPUs it can see
    (``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``), else 1 (a CPU). Torch is not imported:
    the pool's processes must not inherit an initialised CUDA."""
    raw = os.environ.get("WORKER_DEVICES", "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"WORKER_DEVICES={raw!r} is not a positive integer")
        return int(raw)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return max(1, len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"]))
    if shutil.which("nvidia-smi"):
        try:
            listed = subprocess.run(
                ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return 1
        return max(1, sum(line.startswith("GPU ") for line in listed.splitlines()))
    return 1


def device_queues(devices: int) -> list[str]:
    """The queues of the job sizes a worker with ``devices`` devices can run."""
    from training.services import job_queue

    return [job_queue(n) for n in range(1, devices + 1)]


@celeryd_after_setup.connect
def _consume_the_queues_that_fit(sender=None, instance=None, **kwargs) -> None:
    """A worker of the ``gpu`` queue also takes the jobs of up to its device count."""
    queues = instance.app.amqp.queues
    if "gpu" not in (queues.consume_from or {}):
        return
    devices = worker_devices()
    for name in device_queues(devices)[1:]:
        queues.select_add(name)
    logger.info("%s device(s): consuming %s", devices, ", ".join(device_queues(devices)))


@worker_ready.connect
def _start_recovery(sender=None, **kwargs) -> None:
    global _thread
    from training import services

    try:
        requeued = services.jobs_requeue_waiting(older_than_s=0)
        if requeued:
            logger.info("re-sent the tasks of queued jobs %s", requeued)
    except Exception:
        logger.exception("could not re-send queued jobs")
    finally:
        connection.close()
    if _thread is not None and _thread.is_alive():
        return
    _stop.clear()
    _thread = threading.Thread(
        target=recovery_loop,
        kwargs={
            "every_s": services.recover_every_s(),
            "stale_after_s": services.stale_after_s(),
            "stop": _stop,
        },
        name="training-recovery",
        daemon=True,
    )
    _thread.start()
    logger.info(
        "stale-job recovery every %s s (stale after %s s)",
        services.recover_every_s(),
        services.stale_after_s(),
    )


@worker_shutdown.connect
def _stop_recovery(sender=None, **kwargs) -> None:
    _stop.set()


@worker_shutting_down.connect
def _tell_the_running_job(sig=None, how=None, **kwargs) -> None:
    """A warm shutdown (SIGTERM or Ctrl-C of the worker, e.g. ``docker stop``) waits for the
    running task: tell it to stop at its next step, in this process (solo pool) and in the
    pool processes, which the signal did not reach when only the worker got it."""
    if how != "Warm":
        return
    request_stop()
    from celery.worker import state

    if not state.active_requests:  # an idle pool ends cleanly with the warm shutdown
        return
    for child in active_children():
        try:
            os.kill(child.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
