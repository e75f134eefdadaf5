"""training.tasks.job_run in this process (no broker): how each failure ends the job.

The job rows are created directly as queued (no task message is sent), and the tests are
transactional because the task's heartbeat thread uses its own database connection."""

from __future__ import annotations

import pytest
import torch

from training import selectors
from training.models import Job
from training.tasks import job_run

pytestmark = pytest.mark.django_db(transaction=True)


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


def test_running_out_of_memory_fails_the_job_naming_what_to_reduce(project, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("rlhf.runner.run", out_of_memory)
    job = queued_job(project, tmp_path=tmp_path)
    assert job_run.run(job.pk) == Job.Status.FAILED
    job.refresh_from_db()
    assert job.error.startswith("Out of memory:") and "batch_size" in job.error


def test_the_engines_own_out_of_memory_error_keeps_its_advice(project, tmp_path, monkeypatch):
    from rlhf.errors import OutOfMemoryError

    def out_of_memory(*args, **kwargs):
        raise OutOfMemoryError("out of GPU memory; reduce batch_size or max_seq_len")

    monkeypatch.setattr("rlhf.runner.run", out_of_memory)
    job = queued_job(project, tmp_path=tmp_path)
    job_run.run(job.pk)
    job.refresh_from_db()
    assert job.status == Job.Status.FAILED
    assert job.error == "Out of memory: out of GPU memory; reduce batch_size or max_seq_len"


def test_a_task_for_a_job_that_is_not_queued_does_nothing(project, tmp_path):
    job = queued_job(project, tmp_path=tmp_path)
    Job.objects.filter(pk=job.pk).update(status=Job.Status.CANCELLED)
    assert job_run.run(job.pk) == "not claimed"
    job.refresh_from_db()
    assert job.status == Job.Status.CANCELLED and job.attempts == 0


def test_a_cancel_while_the_model_loads_ends_the_job_before_any_training_work(
    project, tmp_path, monkeypatch, tiny_model
):
    """The cancel arrives through the service while the engine loads the base model: the job
    ends cancelled without tokenizing its data, training or registering a checkpoint."""
    import rlhf.sft
    from rlhf.checkpoint import latest_checkpoint
    from rlhf.data import SFTCollator
    from training import services
    from training.models import Checkpoint
    from training.runtime import JobMonitor

    monkeypatch.setattr(JobMonitor, "STOP_CHECK_EVERY_S", 0.0)  # read the flag at every check
    config = {"model": tiny_model, "max_steps": 2, "max_seq_len": 48, "eval_fraction": 0.0}
    job = queued_job(project, config=config, tmp_path=tmp_path)
    real_load, real_encode = rlhf.sft.load_policy, SFTCollator.encode
    encoded = []

    def load_then_cancel(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        assert services.job_cancel(job=Job.objects.get(pk=job.pk)).cancel_requested
        return loaded

    def encode(self, row):
        encoded.append(row)
        return real_encode(self, row)

    monkeypatch.setattr("rlhf.sft.load_policy", load_then_cancel)
    monkeypatch.setattr(SFTCollator, "encode", encode)
    assert job_run.run(job.pk) == Job.Status.CANCELLED
    job.refresh_from_db()
    assert job.status == Job.Status.CANCELLED and not job.step and job.error == ""
    assert encoded == [], "the data were tokenized after the cancel"
    assert not Checkpoint.objects.filter(job=job).exists()
    assert latest_checkpoint(job.output_dir) is None
