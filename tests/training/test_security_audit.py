"""Security audit regressions for the training app: scoping of jobs, checkpoints and metrics,
checkpoints of another project refused at launch, and the base model path confined to the
model directories (never another project's checkpoint folder or an arbitrary server path)."""

from __future__ import annotations

import json

import pytest
from django.test import Client
from django.urls import reverse

from labeling.models import Membership
from training import services
from training.models import Checkpoint, Job, MetricPoint

pytestmark = pytest.mark.django_db

SMALL = {"max_steps": 4, "batch_size": 2}


def _job(project, user, **kw):
    return services.job_launch(
        kind="reward", project=project, config=dict(SMALL), user=user, base_model="tiny", **kw
    )


def _ckpt(project, role="policy", path=None):
    return Checkpoint.objects.create(
        project=project, role=role, path=path or f"/ckpt/{project.pk}-{role}", base_model="tiny"
    )


@pytest.fixture
def foreign(other_project, outsider):
    job = _job(other_project, outsider)
    MetricPoint.objects.create(job=job, step=1, key="loss/reward", value=0.5)
    return job, _ckpt(other_project), _ckpt(other_project, role="reward")


def test_a_labeler_of_a_project_gets_404_on_its_jobs_checkpoints_and_metrics(
    client, project, admin_user, labeler
):
    job = _job(project, admin_user)
    ckpt = _ckpt(project)
    client.force_login(labeler)
    for url in (
        reverse("training:job_detail", args=[job.pk]),
        reverse("training:job_metrics", args=[job.pk]),
        reverse("training:checkpoint_detail", args=[ckpt.pk]),
        f"/api/training/jobs/{job.pk}",
        f"/api/training/jobs/{job.pk}/metrics",
        f"/api/training/checkpoints/{ckpt.pk}",
    ):
        assert client.get(url).status_code == 404, url
    assert client.get("/api/training/jobs").json() == []
    assert client.get("/api/training/checkpoints").json() == []


def test_a_labeler_cannot_launch_or_cancel_in_their_own_project(
    client, project, admin_user, labeler
):
    job = _job(project, admin_user)
    client.force_login(labeler)
    r = client.post(
        "/api/training/jobs",
        json.dumps({"kind": "reward", "project_id": project.pk, "config": SMALL}),
        content_type="application/json",
    )
    assert r.status_code == 404
    assert client.post(reverse("training:job_cancel", args=[job.pk])).status_code == 404
    assert client.post(f"/api/training/jobs/{job.pk}/cancel").status_code == 404
    r = client.post(
        reverse("training:job_launch", args=["reward"]),
        {"project": project.pk, "config": json.dumps(SMALL)},
    )
    assert r.status_code == 403
    job.refresh_from_db()
    assert not job.cancel_requested and Job.objects.count() == 1


def test_an_admin_gets_404_on_another_projects_jobs_checkpoints_and_metrics(admin_client, foreign):
    job, ckpt, _ = foreign
    for url in (
        reverse("training:job_metrics", args=[job.pk]),
        f"/api/training/jobs/{job.pk}/metrics",
        f"/api/training/checkpoints/{ckpt.pk}",
    ):
        assert admin_client.get(url).status_code == 404, url
    assert admin_client.get(f"/api/training/jobs?project_id={job.project_id}").json() == []
    r = admin_client.get(reverse("training:job_compare") + f"?ids={job.pk}")
    assert f"#{job.pk}" not in r.content.decode()


def test_checkpoints_of_a_project_i_do_not_admin_cannot_be_used_in_a_launch(
    admin_client, project, foreign
):
    _, policy, reward = foreign
    for body in (
        {"kind": "reward", "parent_checkpoint_id": policy.pk},
        {"kind": "ppo", "reward_checkpoint_id": reward.pk},
        {"kind": "eval", "parent_checkpoint_id": policy.pk, "reward_rule": "length"},
    ):
        r = admin_client.post(
            "/api/training/jobs",
            json.dumps({"project_id": project.pk, "config": SMALL, **body}),
            content_type="application/json",
        )
        assert r.status_code == 404, body
    r = admin_client.post(
        reverse("training:job_launch", args=["ppo"]),
        {
            "project": project.pk,
            "base_model": "tiny",
            "config": json.dumps(SMALL),
            "reward": f"checkpoint:{reward.pk}",
            "parent_checkpoint": policy.pk,
        },
    )
    assert r.status_code == 200 and Job.objects.filter(project=project).count() == 0


def test_checkpoints_of_my_other_project_cannot_be_used_in_this_projects_launch(
    admin_client, admin_user, project, other_project
):
    Membership.objects.create(project=other_project, user=admin_user, role=Membership.Role.ADMIN)
    policy, reward = _ckpt(other_project), _ckpt(other_project, role="reward")
    for body, field in (
        ({"kind": "reward", "parent_checkpoint_id": policy.pk}, "parent_checkpoint"),
        ({"kind": "ppo", "reward_checkpoint_id": reward.pk}, "reward"),
    ):
        r = admin_client.post(
            "/api/training/jobs",
            json.dumps({"project_id": project.pk, "config": SMALL, **body}),
            content_type="application/json",
        )
        assert r.status_code == 400 and r.json()["field"] == field
    assert Job.objects.filter(project=project).count() == 0


@pytest.fixture
def model_dirs(tmp_path, settings):
    models = tmp_path / "models"
    (models / "base-lm").mkdir(parents=True)
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "job-7" / "policy-step-4").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    settings.BASE_MODEL_DIRS = [str(models)]
    settings.CHECKPOINT_DIR = str(checkpoints)
    return tmp_path


def test_a_base_model_folder_under_the_model_directories_is_accepted(
    project, admin_user, model_dirs
):
    base = str(model_dirs / "models" / "base-lm")
    job = services.job_launch(
        kind="reward", project=project, config=dict(SMALL), user=admin_user, base_model=base
    )
    assert job.base_model == base


@pytest.mark.parametrize(
    "relative",
    [
        "checkpoints/job-7/policy-step-4",  # another project's checkpoint folder
        "checkpoints",
        "secret",  # any folder on the server
        "models/../secret",  # a traversal out of the model directory
        "models/../checkpoints/job-7/policy-step-4",
    ],
)
def test_a_base_model_path_outside_the_model_directories_is_refused(
    project, admin_user, model_dirs, relative
):
    with pytest.raises(services.JobLaunchError) as err:
        services.job_launch(
            kind="reward",
            project=project,
            config=dict(SMALL),
            user=admin_user,
            base_model=str(model_dirs / relative),
        )
    assert err.value.field == "base_model"
    assert Job.objects.count() == 0


def test_a_symlink_in_the_model_directory_to_a_checkpoint_is_refused(
    project, admin_user, model_dirs
):
    link = model_dirs / "models" / "sneaky"
    link.symlink_to(model_dirs / "checkpoints" / "job-7" / "policy-step-4")
    with pytest.raises(services.JobLaunchError):
        services.job_launch(
            kind="reward",
            project=project,
            config=dict(SMALL),
            user=admin_user,
            base_model=str(link),
        )


def test_an_existing_and_a_missing_server_path_get_the_same_answer(project, admin_user, model_dirs):
    """No oracle: the refusal does not tell whether a folder exists on the server."""
    messages = []
    for path in (model_dirs / "secret", model_dirs / "no-such-folder"):
        with pytest.raises(services.JobLaunchError) as err:
            services.job_launch(
                kind="reward",
                project=project,
                config=dict(SMALL),
                user=admin_user,
                base_model=str(path),
            )
        messages.append(str(err.value).replace(str(path), "PATH"))
    assert messages[0] == messages[1]


def test_the_api_refuses_an_arbitrary_base_model_path(admin_client, project, model_dirs):
    r = admin_client.post(
        "/api/training/jobs",
        json.dumps(
            {
                "kind": "reward",
                "project_id": project.pk,
                "config": SMALL,
                "base_model": str(model_dirs / "checkpoints" / "job-7" / "policy-step-4"),
            }
        ),
        content_type="application/json",
    )
    assert r.status_code == 400 and r.json()["field"] == "base_model"


def test_job_errors_and_log_tails_are_escaped_on_the_pages(admin_client, admin_user, project):
    job = _job(project, admin_user)
    Job.objects.filter(pk=job.pk).update(
        status=Job.Status.FAILED,
        error="<script>alert('error')</script>",
        log_tail="<img src=x onerror=alert('log')>",
    )
    for url in (reverse("training:job_detail", args=[job.pk]), reverse("training:home")):
        page = admin_client.get(url).content.decode()
        assert "<script>alert('error')" not in page
        assert "<img src=x onerror" not in page


def test_training_writes_need_the_csrf_token(admin_user, project):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(admin_user)
    r = browser.post(
        "/api/training/jobs",
        json.dumps({"kind": "reward", "project_id": project.pk, "config": SMALL}),
        content_type="application/json",
    )
    assert r.status_code == 403
    r = browser.post(
        reverse("training:job_launch", args=["reward"]),
        {"project": project.pk, "config": json.dumps(SMALL)},
    )
    assert r.status_code == 403
    assert Job.objects.count() == 0
