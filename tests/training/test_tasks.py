"""training.tasks.job_run in this process (no broker): how the task supervises its engine
child and how each failure ends the job.

The job rows are created directly as queued (no task message is sent), and the tests are
transactional because the task's heartbeat thread uses its own database connection. Some
tests run the real engine (``python -m rlhf ... --events``); the others give the task a fake
engine, a few lines of Python that print the events a real one prints (tests/rlhf/test_events.py
proves the engine prints them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from training import selectors
from training.models import Job, MetricPoint
from training.tasks import job_run

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def heartbeat_every_second(monkeypatch):
    """Beat as the worker tests' workers do: a worker of those tests (session-scoped, maybe
    started earlier) recovers a job silent for 4 s, and a real engine child may load longer."""
    monkeypatch.setattr("training.services.heartbeat_every_s", lambda: 1)


def queued_job(project, *, kind="sft", config=None, tmp_path) -> Job:
    ids = selectors.demonstration_ids_for_project(project=project)
    rows = selectors.demonstration_rows(completion_ids=ids)
    return Job.objects.create(
        kind=kind,
        project=project,
        config=config if config is not None else {"model": "tiny", "max_steps": 2},
        input_kind=Job.Input.DEMONSTRATIONS,
        input_ids=ids,
        input_count=len(rows),
        input_hash=selectors.rows_hash(rows),
        base_model="tiny",
        output_dir=str(tmp_path / "job"),
    )


def test_a_config_the_engine_now_refuses_fails_the_job_with_the_reason(project, tmp_path):
    job = queued_job(
        project, config={"model": "tiny", "max_steps": 2, "learning_rat": 0.1}, tmp_path=tmp_path
    )
    assert job_run.run(job.pk) == Job.Status.FAILED
    job.refresh_from_db()
    assert job.status == Job.Status.FAILED and job.attempts == 1
    assert job.error.startswith("Invalid config:") and "learning_rate" in job.error
    assert job.finished_at is not None and job.run_token == ""


def fake_engine(monkeypatch, script: str) -> None:
    """The task starts ``script`` (Python) as its engine child instead of ``python -m rlhf``."""
    command = [sys.executable, "-c", textwrap.dedent(script)]
    monkeypatch.setattr("training.runtime.engine_command", lambda *args, **kwargs: command)


def events(*items: dict) -> str:
    """A script printing these events, one JSON line each."""
    return "".join(f"print({json.dumps(json.dumps(e))}, flush=True)\n" for e in items)


def cancel_when_logged(monkeypatch, job: Job, words: str) -> None:
    """Cancel ``job`` (through the service) as soon as a log line with ``words`` arrives."""
    from training import services
    from training.runtime import JobMonitor

    real_log = JobMonitor.log

    def log_then_cancel(self, line):
        real_log(self, line)
        if words in line:
            assert services.job_cancel(job=Job.objects.get(pk=job.pk)).cancel_requested

    monkeypatch.setattr(JobMonitor, "log", log_then_cancel)


def test_the_engines_events_become_metric_points_log_lines_and_the_result(
    project, tmp_path, monkeypatch
):
    fake_engine(
        monkeypatch,
        "import os\n"
        + events(
            {"event": "log", "line": "rlhf.sft: training 6 rows"},
            {"event": "metrics", "step": 1, "metrics": {"loss/sft": 2.0, "eval/x": None}},
            {"event": "metrics", "step": 2, "metrics": {"loss/sft": 1.5}},
        )
        + "print('a stray print of some library')\n"
        + "print('engine pid', os.getpid())\n"
        + events(
            {"event": "result", "step": 2, "stopped": False, "checkpoint": None, "metrics": {}}
        ),
    )
    job = queued_job(project, tmp_path=tmp_path)
    assert job_run.run(job.pk) == Job.Status.SUCCEEDED
    job.refresh_from_db()
    points = MetricPoint.objects.filter(job=job).order_by("step")
    assert [(p.step, p.key, p.value) for p in points] == [
        (1, "loss/sft", 2.0),
        (2, "loss/sft", 1.5),
    ]
    assert job.step == 2 and job.result["step"] == 2
    assert "rlhf.sft: training 6 rows" in job.log_tail
    assert "a stray print of some library" in job.log_tail
    engine_pid = int(job.log_tail.split("engine pid ")[1].split()[0])
    assert engine_pid != os.getpid()  # the engine ran in a child, not in the task's process


def test_an_engine_failure_fails_the_job_with_the_engines_reason(project, tmp_path, monkeypatch):
    reason = "Out of memory: out of GPU memory; reduce batch_size or max_seq_len"
    fake_engine(
        monkeypatch,
        events(
            {"event": "metrics", "step": 1, "metrics": {"loss/sft": 2.0}},
            {"event": "failed", "reason": reason, "expected": True},
        )
        + "raise SystemExit(1)",
    )
    job = queued_job(project, tmp_path=tmp_path)
    assert job_run.run(job.pk) == Job.Status.FAILED
    job.refresh_from_db()
    assert job.status == Job.Status.FAILED and job.error == reason
    assert job.finished_at is not None and job.run_token == ""


def test_an_unexpected_engine_error_shows_its_reason_and_keeps_the_traceback_for_the_operator(
    project, tmp_path, monkeypatch, caplog
):
    fake_engine(
        monkeypatch,
        events(
            {
                "event": "failed",
                "reason": "KeyError: 'adapter'",
                "expected": False,
                "traceback": 'Traceback (most recent call last):\n  File "x.py"\nKeyError',
            }
        ),
    )
    job = queued_job(project, tmp_path=tmp_path)
    assert job_run.run(job.pk) == Job.Status.FAILED
    job.refresh_from_db()
    assert job.error == "KeyError: 'adapter'"
    assert "Traceback" not in job.log_tail + job.error  # a person never sees one
    assert "Traceback" in caplog.text  # the worker's log keeps it


def test_an_engine_that_dies_without_a_word_fails_the_job_saying_how(
    project, tmp_path, monkeypatch
):
    fake_engine(
        monkeypatch,
        "import os, signal, sys\n"
        "print('CUDA error: an illegal memory access', file=sys.stderr, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)",
    )
    job = queued_job(project, tmp_path=tmp_path)
    assert job_run.run(job.pk) == Job.Status.FAILED
    job.refresh_from_db()
    assert job.error.startswith("The training process ended without a result (killed by SIGKILL")
    assert job.error.endswith("its last words: CUDA error: an illegal memory access")


def test_a_cancel_reaches_the_engine_as_sigint_and_an_engine_that_ignores_it_is_killed(
    project, tmp_path, monkeypatch
):
    from training import services
    from training.runtime import JobMonitor

    monkeypatch.setattr(JobMonitor, "STOP_CHECK_EVERY_S", 0.0)
    monkeypatch.setattr(services, "stop_grace_s", lambda: 1)
    marker = tmp_path / "engine-pid"
    fake_engine(
        monkeypatch,
        f"""
        import os, signal, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a run stuck in a step
        open({str(marker)!r}, "w").write(str(os.getpid()))
        {events({"event": "log", "line": "started"}).strip()}
        time.sleep(120)
        """,
    )
    job = queued_job(project, tmp_path=tmp_path)
    cancel_when_logged(monkeypatch, job, "started")
    assert job_run.run(job.pk) == Job.Status.CANCELLED
    job.refresh_from_db()
    assert "stop requested" in job.log_tail and "did not stop within 1 s: killed" in job.log_tail
    assert not os.path.exists(f"/proc/{marker.read_text()}")  # nothing left running


def test_a_cancel_that_ends_the_engine_before_it_can_report_still_ends_the_job_cancelled(
    project, tmp_path, monkeypatch
):
    """SIGINT while the engine still imports its libraries (before its handler is in place)
    ends it with a KeyboardInterrupt and no event: a stop was asked, so the job is cancelled,
    not failed."""
    from training.runtime import JobMonitor

    monkeypatch.setattr(JobMonitor, "STOP_CHECK_EVERY_S", 0.0)
    fake_engine(
        monkeypatch, events({"event": "log", "line": "started"}) + "import time\ntime.sleep(60)"
    )
    job = queued_job(project, tmp_path=tmp_path)
    cancel_when_logged(monkeypatch, job, "started")
    assert job_run.run(job.pk) == Job.Status.CANCELLED
    job.refresh_from_db()
    assert job.error == "" and "Traceback" not in job.log_tail


def test_a_rule_reward_reaches_the_engine_as_a_function_it_imports_without_django():
    from rlhf.runner import load_reward_fn
    from training.rewards import length
    from training.tasks import _reward_args

    spec = _reward_args(Job(reward_rule="length"))["reward_fn"]
    assert spec == "training.rewards:length" and load_reward_fn(spec) is length
    check = "import sys, training.rewards; assert 'django' not in sys.modules, sorted(sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_task_for_a_job_that_is_not_queued_does_nothing(project, tmp_path):
    job = queued_job(project, tmp_path=tmp_path)
    Job.objects.filter(pk=job.pk).update(status=Job.Status.CANCELLED)
    assert job_run.run(job.pk) == "not claimed"
    job.refresh_from_db()
    assert job.status == Job.Status.CANCELLED and job.attempts == 0


def test_a_cancel_while_the_model_loads_ends_the_job_before_any_training_work(
    project, tmp_path, monkeypatch, tiny_model
):
    """The cancel arrives through the service as soon as the engine child says it started
    (before it loads the model): the job ends cancelled with no step trained and no
    checkpoint (tests/rlhf/test_loop.py proves the engine stops before tokenizing)."""
    from rlhf.checkpoint import latest_checkpoint
    from training.models import Checkpoint
    from training.runtime import JobMonitor

    monkeypatch.setattr(JobMonitor, "STOP_CHECK_EVERY_S", 0.0)  # read the flag at every check
    config = {"model": tiny_model, "max_steps": 100_000, "max_seq_len": 48, "eval_fraction": 0.0}
    job = queued_job(project, config=config, tmp_path=tmp_path)
    cancel_when_logged(monkeypatch, job, " in process ")  # the engine's first words
    assert job_run.run(job.pk) == Job.Status.CANCELLED
    job.refresh_from_db()
    assert job.status == Job.Status.CANCELLED and not job.step and job.error == ""
    assert not MetricPoint.objects.filter(job=job).exists()
    assert not Checkpoint.objects.filter(job=job).exists()
    assert latest_checkpoint(job.output_dir) is None


def test_an_engine_dies_with_its_worker_even_in_the_middle_of_a_long_step(tmp_path):
    """kill -9 of the supervising process: the engine child gets SIGKILL from the kernel
    (PR_SET_PDEATHSIG) at once, not only when it next writes an event to the closed pipe."""
    supervisor = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path

        import django

        django.setup()
        from training import runtime

        class Monitor:
            job_id = 0
            log = staticmethod(lambda line: print(line, flush=True))
            should_stop = staticmethod(lambda: False)
            flush = on_step = check_checkpoints = staticmethod(lambda *a: None)

        step = "import os, time; print('engine', os.getpid(), flush=True); time.sleep(60)"
        runtime.engine_run(
            [sys.executable, "-c", step],
            monitor=Monitor(),
            log_path=Path({str(tmp_path / "engine.log")!r}),
            stop_grace_s=1,
        )
        """
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings"}
    proc = subprocess.Popen(
        [sys.executable, "-c", supervisor], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("engine "), line
        engine = int(line.split()[1])
        assert os.path.exists(f"/proc/{engine}")
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 3
        while _running(engine) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(engine), "the engine outlived its worker"
    finally:
        if proc.poll() is None:
            proc.kill()


def _running(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# --------------------------------------------------------------------------- devices and queues


def test_a_job_is_sent_to_the_queue_of_its_device_count_also_when_it_is_requeued(
    project, admin_user, monkeypatch
):
    from training import services

    sent = []
    monkeypatch.setattr(
        "training.services.current_app.send_task",
        lambda name, args, queue: name == "training.job_run" and sent.append((args[0], queue)),
    )
    config = {"max_steps": 2}
    one = services.job_launch(
        kind="reward", project=project, config=config, user=admin_user, base_model="tiny"
    )
    two = services.job_launch(
        kind="reward", project=project, config=config, user=admin_user, base_model="tiny", devices=2
    )
    assert two.devices == 2 and one.devices == 1
    services.job_enqueue(job=Job(pk=two.pk))  # recovery re-sends with the id alone
    assert sent == [(one.pk, "gpu"), (two.pk, "gpu-2"), (two.pk, "gpu-2")]


@pytest.mark.parametrize(
    "kind, devices, message",
    [
        ("reward", 0, "devices must be between 1 and 64"),
        ("reward", 65, "devices must be between 1 and 64"),
        ("sample", 2, "A sample job runs on one device"),
    ],
)
def test_a_launch_asking_for_devices_it_cannot_have_is_refused(
    project, admin_user, kind, devices, message
):
    from training import services

    with pytest.raises(services.JobLaunchError) as refused:
        services.job_launch(
            kind=kind,
            project=project,
            config={"num_completions": project.k} if kind == "sample" else {},
            user=admin_user,
            base_model="tiny",
            devices=devices,
        )
    assert refused.value.field == "devices" and message in refused.value.text
    assert not Job.objects.exists()


def test_a_worker_consumes_the_queues_of_the_job_sizes_it_can_hold(monkeypatch):
    from training.worker import device_queues, worker_devices

    assert device_queues(1) == ["gpu"] and device_queues(3) == ["gpu", "gpu-2", "gpu-3"]
    monkeypatch.setenv("WORKER_DEVICES", "4")
    assert worker_devices() == 4
    monkeypatch.delenv("WORKER_DEVICES")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert worker_devices() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU visible: the CPU
    assert worker_devices() == 1
    monkeypatch.setenv("WORKER_DEVICES", "two")
    with pytest.raises(ValueError, match="WORKER_DEVICES='two'"):
        worker_devices()


def test_a_job_on_several_devices_runs_the_engine_under_torchrun():
    from pathlib import Path

    from training.runtime import engine_command

    one = engine_command("sft", run_dir=Path("/r"), output_dir="/o")
    two = engine_command(
        "sft", run_dir=Path("/r"), output_dir="/o", devices=2, resume=True, stop_grace_s=45
    )
    assert one[1:4] == ["-m", "rlhf", "sft"] and one[-2:] == ["--events", "-"]
    # torchrun gives its ranks our grace period to stop before it kills them
    assert two[1:7] == [
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "--shutdown-timeout=45", "-m",
    ]  # fmt: skip
    assert two[7:] == [*one[2:-2], "--resume", "--events", "-"]


def test_an_evaluation_counts_a_tie_as_half_a_win_along_its_curve():
    from training.evaluation import compare

    summary, points = compare([1.0, 0.5, 0.0], [0.0, 0.5, 1.0])
    assert (summary["wins"], summary["ties"], summary["losses"]) == (1, 1, 1)
    assert summary["win_rate"] == 0.5 and summary["mean_reward_a"] == 0.5
    curve = [v for _, key, v in points if key == "eval/win_rate"]
    assert curve == [1.0, 0.75, 0.5]


def test_a_database_blip_keeps_the_points_and_the_engine_running(project, monkeypatch):
    from django.db import OperationalError

    from training import runtime, services

    job = services.job_launch(
        kind="reward",
        project=project,
        config={"max_steps": 4, "batch_size": 2},
        user=None,
        base_model="tiny",
    )
    token = services.job_claim(job_id=job.pk, worker="w:1")
    monitor = runtime.JobMonitor(job_id=job.pk, token=token)
    real_write, real_flags = services.metric_points_write, services.job_stop_requested

    def blip(**kw):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(services, "metric_points_write", blip)
    monkeypatch.setattr(services, "job_stop_requested", blip)
    monitor.on_step(1, {"loss/reward": 0.5})
    monitor.flush()
    assert monitor.should_stop() is False and monitor.lost is False  # training goes on
    monkeypatch.setattr(services, "metric_points_write", real_write)
    monkeypatch.setattr(services, "job_stop_requested", real_flags)
    monitor.on_step(2, {"loss/reward": 0.4})
    monitor.flush()
    assert list(
        MetricPoint.objects.filter(job=job).order_by("step").values_list("step", flat=True)
    ) == [1, 2]  # the point of step 1 was kept for the next flush
