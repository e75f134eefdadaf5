"""Fixtures that run a REAL Celery worker process against the test database and real Redis.

How the worker sees the test's data:

- pytest-django creates the test database (``test_<name>`` of DATABASE_URL) once per session;
  the worker fixture depends on ``django_db_setup`` and builds the worker's DATABASE_URL from
  the live connection settings, so the worker process talks to exactly that database.
- Tests that use the worker are ``@pytest.mark.django_db(transaction=True)``: their writes
  are committed (no wrapping transaction), so the worker sees them, and ``job_launch``'s
  ``transaction.on_commit`` really fires and sends the task to Redis.
- The worker is session-scoped (a Celery + Django start costs seconds) and is stopped before
  pytest-django drops the database (fixture teardown order). A test that kills it
  (``kill -9`` of its whole process group) gets a fresh one with ``worker.restart()``.
- The Redis db of REDIS_URL is flushed at session start so no stale message from an earlier
  run is delivered. Use your own Redis db number (REDIS_URL=redis://127.0.0.1:6379/<n>).

Recovery timings are shortened through the environment (heartbeat every 1 s, stale after
4 s, recovery loop every 1 s) so a killed worker's job is recovered within seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from django.conf import settings

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL_DIR = Path(
    os.environ.get("TEST_TINY_MODEL_DIR", ROOT / "var" / "test-models" / "tiny-lm")
)
STALE_AFTER_S = 4


def wait_for(
    predicate, *, timeout: float, interval: float = 0.2, message: str = "condition", details=None
):
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout`` s
    (with ``details()``, e.g. the worker's log, in the failure message)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{details()}" if details else ""
            pytest.fail(f"timed out after {timeout} s waiting for {message}{extra}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """The engine's tiny random Llama + BPE tokenizer, built once and cached under var/."""
    from rlhf.modeling import build_tiny_model

    return str(build_tiny_model(TINY_MODEL_DIR))


def _database_url() -> str:
    from django.db import connection

    s = connection.settings_dict
    if not s["ENGINE"].endswith("postgresql"):
        pytest.skip("the worker tests need PostgreSQL: set DATABASE_URL=postgres://... (CI does)")
    auth = s["USER"] + (f":{s['PASSWORD']}" if s["PASSWORD"] else "")
    return f"postgres://{auth}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


class WorkerProcess:
    """One ``celery -A config worker`` subprocess in its own process group."""

    instances: list[WorkerProcess] = []

    def __init__(self, *, env: dict, log_dir: Path):
        WorkerProcess.instances.append(self)
        self.env = env
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.starts = 0

    def start(self, *, timeout: float = 90) -> None:
        self.starts += 1
        self.log_path = self.log_dir / f"worker-{self.starts}.log"
        log = open(self.log_path, "wb")  # noqa: SIM115 - owned by the process
        cmd = [
            sys.executable, "-m", "celery", "-A", "config", "worker",
            "-Q", "gpu,default", "-c", "1", "--prefetch-multiplier", "1",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-n", f"test-{uuid.uuid4().hex[:8]}@%h", "-l", "INFO",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        wait_for(
            self._ready,
            timeout=timeout,
            interval=0.3,
            message=f"the Celery worker to start (log: {self.log_path})",
        )

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"the Celery worker exited with {self.proc.returncode}:\n{self.log()}")
        return b" ready." in self.log_path.read_bytes()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:] if self.log_path else ""

    def kill9(self) -> None:
        """SIGKILL the worker and its pool child at once: what a crash or the OOM killer does."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, *, timeout: float = 60) -> None:
        """SIGTERM to the worker's main process only, as ``docker stop`` sends it, and wait
        for the warm shutdown to finish."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


# One worker and one checkpoint folder per pytest session, however many modules import these
# fixtures (tests/training/conftest.py and tests/e2e/test_training_job.py each register their
# own copy of the fixture functions, which pytest would otherwise set up twice: two workers
# competing for the same queue).
_shared: dict = {"users": 0}


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory) -> Path:
    if "checkpoint_dir" not in _shared:
        _shared["checkpoint_dir"] = tmp_path_factory.mktemp("checkpoints")
        # job_launch computes output dirs in this process
        _shared["old_checkpoint_dir"], settings.CHECKPOINT_DIR = (
            settings.CHECKPOINT_DIR,
            _shared["checkpoint_dir"],
        )
    return _shared["checkpoint_dir"]


def _start_shared_worker(tiny_model: str, checkpoint_dir: Path) -> WorkerProcess:
    import redis

    redis.Redis.from_url(settings.REDIS_URL).flushdb()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": _database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "CHECKPOINT_DIR": str(checkpoint_dir),
        "DEFAULT_BASE_MODEL": tiny_model,
        "TRAINING_HEARTBEAT_S": "1",
        "TRAINING_STALE_AFTER_S": str(STALE_AFTER_S),
        "TRAINING_RECOVER_EVERY_S": "1",
        "WORKER_DEVICES": "2",  # consumes gpu and gpu-2: the 2-process jobs run on the CPU
        "CACHE_REDIS": "0",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    # Logs outside pytest's temp folders (other sessions on the machine prune those).
    log_dir = ROOT / "var" / "test-logs" / f"workers-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    worker = WorkerProcess(env=env, log_dir=log_dir)
    _shared["old_base_model"] = settings.DEFAULT_BASE_MODEL
    settings.DEFAULT_BASE_MODEL = tiny_model  # what job_launch defaults to in this process
    worker.start()
    return worker


@pytest.fixture(scope="session")
def celery_worker(django_db_setup, django_db_blocker, tiny_model, checkpoint_dir):
    if "worker" not in _shared:
        _shared["worker"] = _start_shared_worker(tiny_model, checkpoint_dir)
    _shared["users"] += 1
    yield _shared["worker"]
    _shared["users"] -= 1
    if _shared["users"] == 0:  # the last user stops it, before pytest-django drops the database
        _shared.pop("worker").stop()
        settings.DEFAULT_BASE_MODEL = _shared.pop("old_base_model")
        from django.db import connections

        connections.close_all()


@pytest.fixture
def worker(celery_worker, transactional_db):
    """The running worker, for one transactional test; restarted if an earlier test killed it.
    At the end, the test's still-active jobs are cancelled and awaited so the next test starts
    with an idle worker."""
    if not celery_worker.alive():
        celery_worker.start()
    yield celery_worker
    from training.models import Job
    from training.services import job_cancel

    for job in Job.objects.filter(status__in=Job.ACTIVE_STATUSES):
        job_cancel(job=job)
    if celery_worker.alive():
        wait_for(
            lambda: not Job.objects.filter(status__in=Job.ACTIVE_STATUSES).exists(),
            timeout=30,
            message="the test's jobs to stop",
        )
