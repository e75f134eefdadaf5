"""End to end with a real Celery worker process, real Redis and PostgreSQL, on the tiny model.

Each test launches jobs through training.services.job_launch (as the pages and the API do);
the job's task goes through Redis to the worker subprocess, which starts the engine as its
child process group (``python -m rlhf ... --events``) and writes its metric points,
heartbeats and checkpoints into the test database.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from django.db import transaction

from labeling.models import Completion, Item, ItemScore
from tests.training.worker_fixtures import STALE_AFTER_S, wait_for
from training import services
from training.models import Checkpoint, Job, MetricPoint
from training.tasks import job_run

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

TINY = {"max_seq_len": 96, "batch_size": 4}
# A run long enough to observe, cancel or kill mid-way; checkpoints every 5 steps.
ENDLESS = {**TINY, "max_steps": 100_000, "save_every": 5, "eval_fraction": 0.0}


def launch(project, user, kind, config, **kw) -> Job:
    return services.job_launch(kind=kind, project=project, config=config, user=user, **kw)


def job_state(job_id: int) -> Job:
    return Job.objects.get(pk=job_id)


def running(job_id: int) -> Job:
    """The job, failing the test at once if it already ended (instead of waiting it out)."""
    job = job_state(job_id)
    if job.status in (Job.Status.FAILED, Job.Status.SUCCEEDED):
        pytest.fail(f"job {job_id} ended early:\n{_details(job_id)}")
    return job


def finished(job_id: int, timeout: float = 90) -> Job:
    return wait_for(
        lambda: (j := job_state(job_id)).status in Job.FINAL_STATUSES and j,
        timeout=timeout,
        message=f"job {job_id} to finish",
        details=lambda: _details(job_id),
    )


def _details(job_id: int) -> str:
    from tests.training.worker_fixtures import WorkerProcess

    job = job_state(job_id)
    logs = "\n".join(w.log() for w in WorkerProcess.instances)
    return f"job {job_id}: {job.status} step {job.step} error {job.error!r}\nlog tail:\n{job.log_tail}\nworker:\n{logs}"


def engine_processes(output_dir: str) -> list[int]:
    """Pids of the running processes whose command line names ``output_dir`` (the engine)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # gone meanwhile, or not a process
        if output_dir in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


def engine_pid(job: Job) -> int:
    """The pid the engine reported in its first log line ("sft in process N ...")."""
    return int(job.log_tail.split(" in process ")[1].split()[0])


def assert_succeeded(job: Job, worker) -> None:
    assert job.status == Job.Status.SUCCEEDED, (
        f"{job.status}: {job.error}\n{job.log_tail}\n{worker.log()}"
    )


def test_sft_job_streams_metric_points_while_it_runs_and_registers_a_checkpoint(
    worker, project, admin_user, tiny_model
):
    job = launch(project, admin_user, "sft", {**TINY, "max_steps": 120, "eval_fraction": 0.0})
    points_then = wait_for(
        lambda: (
            running(job.pk).status == Job.Status.RUNNING
            and MetricPoint.objects.filter(job=job).count()
        ),
        timeout=90,
        interval=0.1,
        message="metric points of the running SFT job",
        details=lambda: _details(job.pk),
    )
    during = job_state(job.pk)
    assert (
        during.status == Job.Status.RUNNING and 0 < during.step < 120
    )  # progress moves as it runs
    job = finished(job.pk)
    assert_succeeded(job, worker)
    assert job.step == job.total_steps == 120 and job.progress_percent == 100
    assert MetricPoint.objects.filter(job=job).count() > points_then
    steps = list(
        MetricPoint.objects.filter(job=job, key="loss/sft")
        .order_by("step")
        .values_list("step", flat=True)
    )
    assert steps == list(range(1, 121))  # one point per step, none twice
    ckpt = Checkpoint.objects.get(job=job)
    assert (
        ckpt.role == Checkpoint.Role.POLICY and ckpt.step == 120 and ckpt.base_model == tiny_model
    )
    assert ckpt.path.startswith(job.output_dir) and "loss/sft" in ckpt.metrics
    assert job.attempts == 1 and job.heartbeat_at is not None and job.worker
    assert "attempt 1 of" in job.log_tail and "step 120/120" in job.log_tail, job.log_tail
    # it trained in a child process, neither the worker nor its pool process
    task_pid = int(job.worker.rsplit(":", 1)[1])
    assert engine_pid(job) not in (task_pid, worker.proc.pid)
    assert not engine_processes(job.output_dir)  # and nothing is left running


def test_a_job_on_two_devices_launched_through_the_api_trains_as_one_process_does(
    worker, project, admin_user, client
):
    """torchrun --nproc-per-node 2 on the CPU (gloo): the same config and data give the same
    training as one process (the engine shards the batch and all-reduces the gradients)."""
    client.force_login(admin_user)
    config = {**TINY, "max_steps": 3, "eval_fraction": 0.0}
    jobs = {}
    for devices in (1, 2):
        r = client.post(
            "/api/training/jobs",
            json.dumps(
                {"kind": "reward", "project_id": project.pk, "config": config, "devices": devices}
            ),
            content_type="application/json",
        )
        assert r.status_code == 201, r.content
        assert r.json()["devices"] == devices
        jobs[devices] = r.json()["id"]
    one, two = finished(jobs[1], timeout=120), finished(jobs[2], timeout=120)
    assert_succeeded(one, worker)
    assert_succeeded(two, worker)
    assert "2 devices (torchrun)" in two.log_tail and "(rank 0 of 2)" in two.log_tail
    losses = {
        n: list(
            MetricPoint.objects.filter(job=job, key="loss/reward")
            .order_by("step")
            .values_list("value", flat=True)
        )
        for n, job in ((1, one), (2, two))
    }
    assert len(losses[1]) == len(losses[2]) == 3
    assert losses[2] == pytest.approx(losses[1], rel=1e-4, abs=1e-5)


def test_closed_loop_reward_model_then_ppo_then_sampling_then_evaluation(
    worker, project, admin_user
):
    """Rankings -> reward model -> PPO against it -> sample K completions into the labeling
    queue -> evaluate the PPO policy against the base model, sending A-vs-B pairs to labelers."""
    reward_job = finished(launch(project, admin_user, "reward", {**TINY, "max_steps": 12}).pk)
    assert_succeeded(reward_job, worker)
    keys = set(MetricPoint.objects.filter(job=reward_job).values_list("key", flat=True))
    assert {"loss/reward", "reward/accuracy"} <= keys
    reward_ckpt = Checkpoint.objects.get(job=reward_job, role=Checkpoint.Role.REWARD)
    # the finished reward model scores the project's items for the disagreements page
    wait_for(
        lambda: (
            ItemScore.objects.filter(project=project, checkpoint_id=reward_ckpt.pk).count() == 6
        ),
        timeout=60,
        message="the project's items scored by the new reward model",
        details=lambda: _details(reward_job.pk),
    )

    ppo_config = {
        "max_steps": 2,
        "batch_size": 4,
        "num_minibatches": 2,
        "ppo_epochs": 1,
        "max_new_tokens": 12,
        "max_seq_len": 96,
    }
    ppo_job = finished(
        launch(project, admin_user, "ppo", ppo_config, reward_checkpoint=reward_ckpt).pk
    )
    assert_succeeded(ppo_job, worker)
    assert MetricPoint.objects.filter(job=ppo_job, key="objective/reward").count() == 2
    assert MetricPoint.objects.filter(job=ppo_job, key="objective/kl").exists()
    policy = Checkpoint.objects.get(job=ppo_job, role=Checkpoint.Role.POLICY)
    assert policy.job.reward_checkpoint == reward_ckpt
    value = Checkpoint.objects.get(job=ppo_job, role=Checkpoint.Role.VALUE)
    assert value.parent == policy and value.path == policy.path

    sample_job = launch(
        project,
        admin_user,
        "sample",
        {"num_completions": 4, "max_new_tokens": 8, "batch_size": 2},
        parent_checkpoint=policy,
        options={"max_prompts": 2},
    )
    sample_job = finished(sample_job.pk)
    assert_succeeded(sample_job, worker)
    sampled = Completion.objects.filter(source=Completion.Source.MODEL, checkpoint_id=policy.pk)
    assert sampled.count() == 8 and sample_job.result["items"] == 2
    new_items = Item.objects.filter(project=project, source=Item.Source.QUEUE).order_by("id")
    assert new_items.count() == 2  # the fixture's own items are imports
    assert all(item.completions.count() == 4 for item in new_items)

    eval_job = launch(
        project,
        admin_user,
        "eval",
        {"num_completions": 1, "max_new_tokens": 8, "batch_size": 3},
        parent_checkpoint=policy,
        reward_rule="length",
        options={"max_prompts": 3, "send_to_labelers": True},
    )
    eval_job = finished(eval_job.pk)
    assert_succeeded(eval_job, worker)
    result = eval_job.result
    assert result["n"] == 3 and 0.0 <= result["win_rate"] <= 1.0
    assert result["wins"] + result["ties"] + result["losses"] == 3
    assert MetricPoint.objects.filter(job=eval_job, key="eval/win_rate").count() == 3
    eval_items = Item.objects.filter(project=project, source=Item.Source.EVAL)
    assert eval_items.count() == result["items_sent"] and all(
        i.completions.count() == 2 for i in eval_items
    )


def test_ppo_with_a_rule_reward_runs_end_to_end(worker, project, admin_user):
    config = {
        "max_steps": 3,
        "batch_size": 4,
        "num_minibatches": 2,
        "ppo_epochs": 1,
        "max_new_tokens": 12,
        "max_seq_len": 96,
    }
    job = finished(launch(project, admin_user, "ppo", config, reward_rule="length").pk)
    assert_succeeded(job, worker)
    rewards = list(
        MetricPoint.objects.filter(job=job, key="objective/reward").values_list("value", flat=True)
    )
    assert len(rewards) == 3 and all(0.0 <= r <= 1.0 for r in rewards)  # the length rule's range


def test_grpo_with_a_rule_reward_runs_end_to_end(worker, project, admin_user):
    pytest.importorskip("rlhf.grpo")
    config = {
        "max_steps": 3,
        "batch_size": 2,
        "num_generations": 4,
        "max_new_tokens": 8,
        "max_seq_len": 96,
    }
    job = finished(launch(project, admin_user, "grpo", config, reward_rule="politeness").pk)
    assert_succeeded(job, worker)
    assert MetricPoint.objects.filter(job=job, key="objective/reward").count() == 3
    assert Checkpoint.objects.get(job=job).role == Checkpoint.Role.POLICY


def test_dpo_job_trains_a_policy_on_the_rankings(worker, project, admin_user):
    job = finished(launch(project, admin_user, "dpo", {**TINY, "max_steps": 6}).pk)
    assert_succeeded(job, worker)
    assert MetricPoint.objects.filter(job=job, key__startswith="loss/").exists()
    ckpt = Checkpoint.objects.get(job=job)
    assert ckpt.role == Checkpoint.Role.POLICY and job.input_kind == Job.Input.RANKINGS


def test_checkpoints_are_usable_while_the_job_runs_and_cancel_stops_it_within_a_step_or_two(
    worker, project, admin_user
):
    job = launch(project, admin_user, "sft", ENDLESS)
    # live checkpoints: each one the engine completes (every 5 steps) is registered at the
    # next heartbeat, while the job still runs, with its step and metrics
    live = wait_for(
        lambda: running(job.pk) and Checkpoint.objects.filter(job=job).first(),
        timeout=90,
        message="a checkpoint registered while the job runs",
        details=lambda: _details(job.pk),
    )
    assert job_state(job.pk).status == Job.Status.RUNNING
    assert live.step % 5 == 0 and live.role == Checkpoint.Role.POLICY and "loss/sft" in live.metrics
    assert live.name == f"sft #{job.pk} step {live.step}"
    services.job_cancel(job=job_state(job.pk))
    asked_at = time.monotonic()
    job = finished(job.pk, timeout=30)
    assert job.status == Job.Status.CANCELLED, job.error
    assert time.monotonic() - asked_at < 15
    assert job.step < 100_000
    ckpt = Checkpoint.objects.filter(job=job).order_by("-step").first()  # saved where it stopped
    assert "(cancelled)" in ckpt.name and ckpt.step == job.step
    assert Checkpoint.objects.filter(job=job, name__endswith="(cancelled)").count() == 1


def test_a_job_whose_worker_is_killed_resumes_from_its_last_checkpoint(worker, project, admin_user):
    from rlhf.checkpoint import latest_checkpoint, read_state

    job = launch(project, admin_user, "sft", ENDLESS)
    wait_for(
        lambda: running(job.pk).step >= 12 and latest_checkpoint(job.output_dir) is not None,
        timeout=90,
        message="a checkpoint of the running job",
    )
    assert engine_processes(job.output_dir)  # the engine child, in its own process group
    worker.kill9()
    killed_at = time.monotonic()
    saved_step = int(read_state(latest_checkpoint(job.output_dir))["step"])
    # it died with the worker (PR_SET_PDEATHSIG): no orphan keeps training or writing
    wait_for(lambda: not engine_processes(job.output_dir), timeout=5, message="no orphan engine")
    assert job_state(job.pk).status == Job.Status.RUNNING  # nobody knows yet
    worker.start()
    resumed = wait_for(
        lambda: (
            (j := job_state(job.pk)).attempts == 2 and "resuming from step-" in j.log_tail and j
        ),
        timeout=STALE_AFTER_S + 60,
        message="the job to be recovered and resumed",
        details=lambda: _details(job.pk),
    )
    assert time.monotonic() - killed_at < STALE_AFTER_S + 60
    assert "lost (no heartbeat" in resumed.log_tail
    resumed_from = int(resumed.log_tail.split("resuming from step-")[1].split(" ")[0])
    assert resumed_from >= saved_step
    wait_for(
        lambda: (j := running(job.pk)).step > resumed_from and j.status == Job.Status.RUNNING,
        timeout=60,
        message="the resumed job to train past its checkpoint",
    )
    services.job_cancel(job=resumed)
    job = finished(job.pk, timeout=30)
    assert job.status == Job.Status.CANCELLED
    steps = list(MetricPoint.objects.filter(job=job, key="loss/sft").values_list("step", flat=True))
    assert len(steps) == len(set(steps)), "a step was recorded twice"
    assert sorted(steps) == list(range(1, max(steps) + 1))


def test_a_stopped_worker_checkpoints_its_job_at_the_next_step_and_the_next_worker_resumes(
    worker, project, admin_user
):
    from rlhf.checkpoint import latest_checkpoint, read_state

    job = launch(project, admin_user, "sft", ENDLESS)
    wait_for(lambda: running(job.pk).step >= 7, timeout=90, message="the job to run a few steps")
    worker.terminate(timeout=60)  # SIGTERM to the worker only: a warm shutdown
    released = job_state(job.pk)
    assert released.status == Job.Status.QUEUED and released.attempts == 0, _details(job.pk)
    assert "worker shutting down: stopped at step" in released.log_tail
    stopped_at = int(released.log_tail.split("stopped at step ")[1].split(";")[0])
    assert stopped_at >= 7
    assert int(read_state(latest_checkpoint(job.output_dir))["step"]) == stopped_at
    # its checkpoints are usable (registered live), none of them marked as where a run ended
    steps = set(Checkpoint.objects.filter(job=job).values_list("step", flat=True))
    assert stopped_at in steps and max(steps) == stopped_at
    assert not Checkpoint.objects.filter(job=job, name__contains="cancelled").exists()
    worker.start()
    wait_for(
        lambda: (j := running(job.pk)).step > stopped_at and j.status == Job.Status.RUNNING,
        timeout=60,
        message="the next worker to resume the job past the step it stopped at",
        details=lambda: _details(job.pk),
    )
    assert f"resuming from step-{stopped_at:07d}" in job_state(job.pk).log_tail
    assert job_state(job.pk).attempts == 1
    services.job_cancel(job=job_state(job.pk))
    job = finished(job.pk, timeout=30)
    steps = list(MetricPoint.objects.filter(job=job, key="loss/sft").values_list("step", flat=True))
    assert sorted(steps) == list(range(1, max(steps) + 1)), "a step missing or recorded twice"


def test_a_redelivered_task_does_not_run_a_job_that_is_already_running(worker, project, admin_user):
    """What the broker does after its visibility timeout: deliver the same message again while
    the job runs. The second delivery's claim fails and it leaves the job alone."""
    job = launch(project, admin_user, "sft", ENDLESS)
    wait_for(lambda: running(job.pk).step >= 2, timeout=90, message="the job to start")
    before = job_state(job.pk)
    assert job_run.run(job.pk) == "not claimed"  # the task body, as a second worker runs it
    job_run.apply_async(args=[job.pk], queue="gpu")  # and a real duplicate message
    time.sleep(1.5)
    after = job_state(job.pk)
    assert after.attempts == before.attempts == 1
    assert after.run_token == before.run_token and after.worker == before.worker
    assert after.step >= before.step


def test_a_nan_loss_fails_the_job_with_its_reason(worker, project, admin_user):
    job = launch(
        project,
        admin_user,
        "sft",
        {**TINY, "max_steps": 30, "learning_rate": 1e30, "warmup_ratio": 0.0},
    )
    job = finished(job.pk)
    assert job.status == Job.Status.FAILED
    assert "Training diverged" in job.error and ("nan" in job.error or "inf" in job.error)
    assert "learning_rate" in job.error
    assert not Checkpoint.objects.filter(job=job).exists()


def test_a_job_whose_data_changed_after_launch_fails_with_the_reason(worker, project, admin_user):
    from labeling.models import Ranking

    with transaction.atomic():  # the task is sent when this commits, after the delete
        job = services.job_launch(
            kind="reward", project=project, config={**TINY, "max_steps": 3}, user=admin_user
        )
        Ranking.objects.filter(pk=job.input_ids[0]).delete()
    job = finished(job.pk)
    assert job.status == Job.Status.FAILED and "changed" in job.error


def test_a_two_process_job_stops_with_a_checkpoint_on_cancel(worker, project, admin_user):
    """SIGINT to the group reaches torchrun and both ranks: they stop at the same step, rank 0
    saves it, and no process of the group is left."""
    job = launch(project, admin_user, "sft", ENDLESS, devices=2)
    wait_for(lambda: running(job.pk).step >= 3, timeout=90, message="the 2-process job to run")
    assert len(engine_processes(job.output_dir)) >= 3  # torchrun and its two ranks
    services.job_cancel(job=job_state(job.pk))
    job = finished(job.pk, timeout=60)
    assert job.status == Job.Status.CANCELLED, _details(job.pk)
    ckpt = Checkpoint.objects.get(job=job, name__endswith="(cancelled)")
    assert ckpt.step == job.step >= 3
    wait_for(lambda: not engine_processes(job.output_dir), timeout=10, message="no engine left")


def test_a_killed_worker_leaves_no_process_of_a_two_process_job(worker, project, admin_user):
    """kill -9 of the worker: torchrun dies with it, and its ranks with torchrun."""
    job = launch(project, admin_user, "sft", ENDLESS, devices=2)
    wait_for(lambda: running(job.pk).step >= 2, timeout=90, message="the 2-process job to run")
    assert len(engine_processes(job.output_dir)) >= 3
    worker.kill9()
    wait_for(lambda: not engine_processes(job.output_dir), timeout=5, message="no orphan rank")
