"""training.services without a worker: launch rules, the input snapshot, claims, ownership,
cancel and stale-job recovery, on the real database."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from labeling.models import Ranking
from training import selectors, services
from training.models import Checkpoint, Job, MetricPoint

pytestmark = pytest.mark.django_db

SMALL = {"max_steps": 5, "batch_size": 4, "max_seq_len": 128}


def launch(project, user, kind="reward", config=None, **kw) -> Job:
    config = dict(SMALL if config is None else config)
    return services.job_launch(
        kind=kind, project=project, config=config, user=user, base_model="tiny", **kw
    )


def make_checkpoint(project, role=Checkpoint.Role.POLICY, base="tiny", path=None) -> Checkpoint:
    n = Checkpoint.objects.count()
    return Checkpoint.objects.create(
        project=project, role=role, path=path or f"/ckpt/{role}-{n}", base_model=base
    )


def test_launch_snapshots_the_rankings_with_count_and_hash(project, admin_user):
    job = launch(project, admin_user)
    ranking_ids = list(
        Ranking.objects.filter(item__project=project).order_by("id").values_list("id", flat=True)
    )
    assert job.status == Job.Status.QUEUED
    assert job.input_kind == Job.Input.RANKINGS
    assert job.input_ids == ranking_ids and job.input_count == 6
    rows = selectors.preference_rows(ranking_ids=ranking_ids)
    assert job.input_hash == selectors.rows_hash(rows) and len(job.input_hash) == 64
    assert rows[0]["ranking"] == [[0], [1], [2], [3]] and len(rows[0]["completions"]) == 4
    assert job.config["max_steps"] == 5 and job.config["model"] == "tiny"
    assert job.total_steps == 5
    assert job.output_dir.endswith(f"job-{job.pk}")


def test_launch_refuses_an_unknown_config_field_with_a_suggestion(project, admin_user):
    with pytest.raises(services.JobLaunchError) as err:
        launch(project, admin_user, config={"lr": 0.1})
    assert err.value.field == "config"
    assert "learning_rate" in str(err.value)
    assert Job.objects.count() == 0


@pytest.mark.parametrize("base", ["/nonexistent/model-folder", "./missing", "a/b/c", "no spaces"])
def test_launch_refuses_a_base_model_that_is_neither_a_folder_nor_a_hub_id(
    project, admin_user, base
):
    with pytest.raises(services.JobLaunchError) as err:
        services.job_launch(
            kind="reward", project=project, config=dict(SMALL), user=admin_user, base_model=base
        )
    assert err.value.field == "base_model" and "hub id" in str(err.value)
    assert Job.objects.count() == 0


def test_launch_accepts_an_existing_folder_or_a_hub_id(project, admin_user, tmp_path, settings):
    settings.BASE_MODEL_DIRS = [str(tmp_path)]  # local folders only under the model directories
    for base in (str(tmp_path), "Qwen/Qwen2.5-0.5B-Instruct", "gpt2"):
        job = services.job_launch(
            kind="reward", project=project, config=dict(SMALL), user=admin_user, base_model=base
        )
        assert job.base_model == base


def test_launch_refuses_a_value_out_of_range(project, admin_user):
    with pytest.raises(services.JobLaunchError, match="max_steps must be > 0"):
        launch(project, admin_user, config={"max_steps": 0})
    assert Job.objects.count() == 0


def test_launch_refuses_the_model_inside_the_config(project, admin_user):
    with pytest.raises(services.JobLaunchError, match="base model"):
        launch(project, admin_user, config={"model": "gpt2"})


def test_ppo_needs_a_reward_and_takes_only_one(project, admin_user):
    with pytest.raises(services.JobLaunchError, match="Choose a reward") as err:
        launch(project, admin_user, kind="ppo")
    assert err.value.field == "reward"
    reward = make_checkpoint(project, role=Checkpoint.Role.REWARD)
    with pytest.raises(services.JobLaunchError, match="not both"):
        launch(project, admin_user, kind="ppo", reward_checkpoint=reward, reward_rule="length")
    with pytest.raises(services.JobLaunchError, match="Unknown reward rule"):
        launch(project, admin_user, kind="ppo", reward_rule="kindness")
    job = launch(project, admin_user, kind="ppo", reward_rule="length")
    assert job.input_kind == Job.Input.PROMPTS and job.input_count == 6


def test_a_checkpoint_of_another_project_or_role_is_refused(project, other_project, admin_user):
    foreign = make_checkpoint(other_project)
    with pytest.raises(services.JobLaunchError, match="another project") as err:
        launch(project, admin_user, kind="sft", parent_checkpoint=foreign)
    assert err.value.field == "parent_checkpoint"
    reward = make_checkpoint(project, role=Checkpoint.Role.REWARD)
    with pytest.raises(services.JobLaunchError, match="not a policy one"):
        launch(project, admin_user, kind="sft", parent_checkpoint=reward)
    assert Job.objects.count() == 0


def test_a_parent_checkpoint_sets_the_base_model_and_the_adapter(project, admin_user):
    parent = make_checkpoint(project, base="some/base")
    job = launch(
        project, admin_user, kind="ppo", parent_checkpoint=parent, reward_rule="politeness"
    )
    assert job.base_model == "some/base"
    assert job.config["init_adapter"] == parent.path


def test_sft_demonstrations_are_each_rankings_single_best_completion(project, admin_user):
    job = launch(project, admin_user, kind="sft")
    rows = selectors.demonstration_rows(completion_ids=job.input_ids)
    assert job.input_kind == Job.Input.DEMONSTRATIONS and len(rows) == 6
    assert rows[0] == {
        "prompt": "What is the capital of France?",
        "completion": "Paris. Glad to help, thank you for asking!",
    }


def test_launch_without_data_says_what_is_missing(admin_user, django_user_model):
    from labeling.models import Project

    empty = Project.objects.create(name="Empty", created_by=admin_user)
    with pytest.raises(services.JobLaunchError, match="no rankings"):
        launch(empty, admin_user)


def test_an_all_ties_ranking_is_left_out_of_the_snapshot(project, admin_user):
    ranking = Ranking.objects.filter(item__project=project).first()
    ranking.groups = [[cid for group in ranking.groups for cid in group]]
    ranking.save()
    job = launch(project, admin_user)
    assert ranking.pk not in job.input_ids and job.input_count == 5


def test_evaluation_needs_checkpoint_a_of_the_same_base_as_b(project, admin_user):
    with pytest.raises(services.JobLaunchError, match="checkpoint A"):
        launch(project, admin_user, kind="eval", config={}, reward_rule="length")
    a = make_checkpoint(project, base="tiny")
    b = make_checkpoint(project, base="other")
    with pytest.raises(services.JobLaunchError, match="same base model"):
        launch(
            project,
            admin_user,
            kind="eval",
            config={},
            reward_rule="length",
            parent_checkpoint=a,
            compare_checkpoint=b,
        )
    job = launch(
        project,
        admin_user,
        kind="eval",
        config={"num_completions": 1},
        reward_rule="length",
        parent_checkpoint=a,
    )
    assert job.config["init_adapter"] is None and job.parent_checkpoint == a


def _queued_job(project, user) -> Job:
    return launch(project, user)


def test_claim_is_compare_and_set_and_counts_the_attempt(project, admin_user):
    job = _queued_job(project, admin_user)
    token = services.job_claim(job_id=job.pk, worker="w1:1")
    assert token
    assert services.job_claim(job_id=job.pk, worker="w2:2") is None
    job.refresh_from_db()
    assert job.status == Job.Status.RUNNING and job.run_token == token
    assert job.attempts == 1 and job.worker == "w1:1" and job.heartbeat_at is not None


@pytest.mark.django_db(transaction=True)
def test_two_workers_claiming_at_once_get_one_winner(project):
    """Eight threads, eight database connections, one queued job: exactly one token. (The row
    is made directly, with no task message, so a worker running elsewhere stays out of it.)"""
    job = Job.objects.create(
        kind="reward", project=project, config={}, input_kind=Job.Input.RANKINGS, base_model="tiny"
    )
    barrier = threading.Barrier(8)
    tokens = []

    def claim(i):
        try:
            barrier.wait()
            tokens.append(services.job_claim(job_id=job.pk, worker=f"w{i}:1"))
        finally:
            connection.close()

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [t for t in tokens if t]
    assert len(tokens) == 8 and len(winners) == 1
    job.refresh_from_db()
    assert job.run_token == winners[0] and job.attempts == 1


def test_metric_points_are_written_in_a_batch_only_by_the_owner(project, admin_user):
    job = _queued_job(project, admin_user)
    token = services.job_claim(job_id=job.pk, worker="w:1")
    assert services.metric_points_write(
        job_id=job.pk,
        token=token,
        points=[(1, "loss/reward", 0.7), (1, "loss/nan", float("nan")), (2, "loss/reward", 0.6)],
        step=2,
        total_steps=5,
        log_lines=["step 2/5"],
    )
    assert list(MetricPoint.objects.filter(job=job).values_list("step", "key", "value")) == [
        (1, "loss/reward", 0.7),
        (2, "loss/reward", 0.6),
    ]
    assert not services.metric_points_write(
        job_id=job.pk, token="not-the-owner", points=[(3, "loss/reward", 0.5)], step=3
    )
    job.refresh_from_db()
    assert job.step == 2 and "step 2/5" in job.log_tail
    assert MetricPoint.objects.filter(job=job).count() == 2


def test_a_worker_that_lost_its_job_to_recovery_can_no_longer_write_or_finish_it(
    project, admin_user
):
    """A frozen worker (not dead) whose heartbeat went stale: recovery requeues the job, a new
    worker claims it, and the old one's writes all bounce: the job never runs twice."""
    job = _queued_job(project, admin_user)
    old = services.job_claim(job_id=job.pk, worker="frozen:1")
    Job.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=600))
    report = services.jobs_recover_stale(stale_after_s=60)
    assert report.requeued == [job.pk]
    new = services.job_claim(job_id=job.pk, worker="fresh:2")
    assert new and new != old
    assert services.job_heartbeat(job_id=job.pk, token=old).owned is False
    assert services.job_stop_requested(job_id=job.pk, token=old).owned is False
    assert not services.metric_points_write(job_id=job.pk, token=old, points=[(1, "x", 1.0)])
    assert not services.job_finish(job_id=job.pk, token=old, status=Job.Status.SUCCEEDED)
    assert services.job_heartbeat(job_id=job.pk, token=new).owned is True
    job.refresh_from_db()
    assert job.status == Job.Status.RUNNING and job.attempts == 2 and job.worker == "fresh:2"


def test_recovery_leaves_fresh_heartbeats_alone(project, admin_user):
    job = _queued_job(project, admin_user)
    services.job_claim(job_id=job.pk, worker="w:1")
    assert services.jobs_recover_stale(stale_after_s=60).requeued == []
    job.refresh_from_db()
    assert job.status == Job.Status.RUNNING


def test_recovery_fails_the_job_with_its_reason_when_attempts_are_spent(project, admin_user):
    job = launch(project, admin_user, max_attempts=2)
    for attempt in (1, 2):
        assert services.job_claim(job_id=job.pk, worker=f"doomed:{attempt}")
        Job.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=300))
        report = services.jobs_recover_stale(stale_after_s=30)
    assert report.failed == [job.pk]
    job.refresh_from_db()
    assert job.status == Job.Status.FAILED and job.finished_at is not None
    assert (
        "Worker lost" in job.error and "after 2 attempts" in job.error and "doomed:2" in job.error
    )


def test_cancelling_a_queued_job_ends_it_before_any_worker_claims_it(project, admin_user):
    job = _queued_job(project, admin_user)
    services.job_cancel(job=job)
    job.refresh_from_db()
    assert job.status == Job.Status.CANCELLED
    assert services.job_claim(job_id=job.pk, worker="w:1") is None


def test_cancelling_a_running_job_sets_the_flag_its_worker_reads(project, admin_user):
    job = _queued_job(project, admin_user)
    token = services.job_claim(job_id=job.pk, worker="w:1")
    assert services.job_stop_requested(job_id=job.pk, token=token).cancel_requested is False
    services.job_cancel(job=job)
    job.refresh_from_db()
    assert job.status == Job.Status.RUNNING and job.cancel_requested
    assert services.job_stop_requested(job_id=job.pk, token=token).cancel_requested is True
    assert services.job_finish(job_id=job.pk, token=token, status=Job.Status.CANCELLED)
    job.refresh_from_db()
    assert job.status == Job.Status.CANCELLED and job.run_token == ""


def test_resume_discards_the_points_a_lost_attempt_wrote_past_the_checkpoint(project, admin_user):
    job = _queued_job(project, admin_user)
    token = services.job_claim(job_id=job.pk, worker="w:1")
    services.metric_points_write(
        job_id=job.pk, token=token, points=[(s, "loss", 1.0 / s) for s in range(1, 8)]
    )
    assert services.metric_points_discard_after(job_id=job.pk, token=token, step=5) == 2
    assert sorted(MetricPoint.objects.filter(job=job).values_list("step", flat=True)) == [
        1,
        2,
        3,
        4,
        5,
    ]


def test_checkpoint_register_records_lineage(project, admin_user):
    parent = make_checkpoint(project)
    job = launch(project, admin_user, kind="ppo", parent_checkpoint=parent, reward_rule="length")
    ckpt = services.checkpoint_register(
        job=job,
        path="/ckpt/ppo/step-3",
        role=Checkpoint.Role.POLICY,
        step=3,
        metrics={"objective/reward": 0.5, "bad": float("inf")},
        parent=parent,
    )
    assert ckpt.parent == parent and ckpt.job == job and ckpt.base_model == job.base_model
    assert ckpt.metrics == {"objective/reward": 0.5}
    assert selectors.checkpoint_lineage(checkpoint=ckpt) == [ckpt, parent]


# --------------------------------------------------------------------------- worker stop


@pytest.fixture
def worker_stopping():
    from training.runtime import WORKER_STOPPING

    WORKER_STOPPING.set()
    yield
    WORKER_STOPPING.clear()


def test_a_worker_stop_releases_the_job_but_a_pending_cancel_wins(
    project, admin_user, worker_stopping, django_capture_on_commit_callbacks
):
    from training.runtime import JobMonitor

    job = launch(project, admin_user)
    token = services.job_claim(job_id=job.pk, worker="w:1")
    monitor = JobMonitor(job_id=job.pk, token=token)
    assert monitor.should_stop() and monitor.released and not monitor.cancelled
    with django_capture_on_commit_callbacks() as sent:
        assert services.job_release(job_id=job.pk, token=token, line="stopping")
    job.refresh_from_db()
    assert (job.status, job.attempts, len(sent)) == (Job.Status.QUEUED, 0, 1)  # task sent again

    token = services.job_claim(job_id=job.pk, worker="w:2")
    services.job_cancel(job=Job.objects.get(pk=job.pk))
    monitor = JobMonitor(job_id=job.pk, token=token)
    assert monitor.should_stop() and monitor.cancelled and not monitor.released
    assert not services.job_release(job_id=job.pk, token=token, line="stopping")


def test_a_stopped_hosts_cancel_requested_job_ends_cancelled_not_queued(project, admin_user):
    running, cancelling = launch(project, admin_user), launch(project, admin_user)
    for job in (running, cancelling):
        services.job_claim(job_id=job.pk, worker="laptop:1")
    services.job_cancel(job=Job.objects.get(pk=cancelling.pk))
    assert services.jobs_release_host(host="laptop") == [running.pk]
    assert Job.objects.get(pk=running.pk).status == Job.Status.QUEUED
    assert Job.objects.get(pk=cancelling.pk).status == Job.Status.CANCELLED


def test_a_max_attempts_setting_above_the_api_bound_still_launches(project, admin_user, settings):
    settings.TRAINING_MAX_ATTEMPTS = 50
    assert launch(project, admin_user).max_attempts == 50
    with pytest.raises(services.JobLaunchError, match="between 1 and 20"):
        launch(project, admin_user, max_attempts=21)


def test_a_launch_inserts_its_row_and_updates_it_once_for_the_folder_named_after_its_id(
    admin_user, project
):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as ctx:
        job = services.job_launch(
            kind="reward",
            project=project,
            config={"max_steps": 4, "batch_size": 2},
            user=admin_user,
            base_model="tiny",
        )
    writes = [
        q["sql"].split()[0]
        for q in ctx.captured_queries
        if '"training_job"' in q["sql"] and q["sql"].split()[0] in ("INSERT", "UPDATE")
    ]
    assert writes == ["INSERT", "UPDATE"]
    job.refresh_from_db()
    assert job.output_dir.endswith(f"job-{job.pk}") and job.enqueued_at is not None
    assert "launched by alice-admin" in job.log_tail
