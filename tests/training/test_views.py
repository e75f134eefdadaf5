"""Training pages and the training JSON API: admin-only, scoped, CSRF on writes, and the launch
form refusing bad input without creating a job. No worker: tasks are only sent on commit, and
these tests run inside a transaction that never commits."""

from __future__ import annotations

import json

import pytest
from django.test import Client
from django.urls import reverse

from labeling.models import Membership
from training import services
from training.models import Checkpoint, Job, MetricPoint

pytestmark = pytest.mark.django_db


def launch_url(kind: str) -> str:
    return reverse("training:job_launch", args=[kind])


def a_job(project, user, kind="reward") -> Job:
    return services.job_launch(
        kind=kind,
        project=project,
        config={"max_steps": 4, "batch_size": 2},
        user=user,
        base_model="tiny",
    )


def post_launch(client, kind, project, config, **extra):
    data = {
        "project": project.pk,
        "base_model": "tiny",
        "config": json.dumps(config) if not isinstance(config, str) else config,
    }
    data.update(extra)
    return client.post(launch_url(kind), data)


def test_the_launch_form_is_prefilled_with_defaults_the_engine_accepts(admin_client, project):
    response = admin_client.get(launch_url("reward"))
    assert response.status_code == 200
    form = response.context["form"]
    prefilled = json.loads(form.initial["config"])
    assert prefilled["max_steps"] > 0 and "model" not in prefilled
    from rlhf.config import config_from_dict

    config_from_dict("reward", {**prefilled, "model": "tiny"})  # valid as shown


@pytest.mark.parametrize("kind", ["sft", "reward", "dpo", "ppo", "grpo", "sample"])
def test_every_kind_prefills_a_config_that_launches(admin_client, project, kind):
    if kind == "grpo":
        pytest.importorskip("rlhf.grpo", reason="engine-rl has not shipped rlhf/grpo.py yet")
    form = admin_client.get(launch_url(kind)).context["form"]
    extra = {"reward": "rule:length"} if kind in ("ppo", "grpo") else {}
    response = post_launch(admin_client, kind, project, form.initial["config"], **extra)
    assert response.status_code == 302, response.context["form"].errors
    job = Job.objects.get()
    assert (
        response["Location"] == reverse("training:job_detail", args=[job.pk]) and job.kind == kind
    )


def test_sampling_defaults_to_the_projects_k_completions_per_prompt(admin_client, project):
    form = admin_client.get(launch_url("sample")).context["form"]
    config = json.loads(form.initial["config"])
    assert config["num_completions"] == project.k
    assert "learning_rate" not in config and "max_steps" not in config  # training-only fields


def test_a_bad_config_is_refused_on_the_form_and_creates_no_job(admin_client, project):
    response = post_launch(admin_client, "reward", project, {"lr": 0.1})
    assert response.status_code == 200
    assert Job.objects.count() == 0
    errors = response.context["form"].errors["config"]
    assert any("did you mean 'learning_rate'" in e for e in errors)
    assert "learning_rate" in response.content.decode()


def test_invalid_json_is_refused_on_the_form(admin_client, project):
    response = post_launch(admin_client, "sft", project, "{not json")
    assert response.status_code == 200 and Job.objects.count() == 0
    assert "Not valid JSON" in str(response.context["form"].errors["config"])


def test_ppo_without_a_reward_choice_is_refused(admin_client, project):
    response = post_launch(admin_client, "ppo", project, {"max_steps": 2, "batch_size": 4})
    assert response.status_code == 200 and Job.objects.count() == 0
    assert response.context["form"].errors["reward"]


def test_only_project_admins_see_the_training_link_and_others_get_a_page_saying_why(
    client, project, labeler, admin_user
):
    training_link = f'href="{reverse("training:home")}"'
    client.force_login(labeler)
    assert training_link not in client.get(reverse("labeling:home")).content.decode()
    denied = client.get(reverse("training:home"))
    assert denied.status_code == 403 and "for project admins" in denied.content.decode()
    client.force_login(admin_user)
    assert training_link in client.get(reverse("labeling:home")).content.decode()


def test_a_labeler_cannot_reach_training(client, project, labeler):
    client.force_login(labeler)
    job = a_job(project, project.created_by)
    assert client.get(reverse("training:home")).status_code == 403
    assert client.get(launch_url("sft")).status_code == 403
    assert client.get(reverse("training:job_detail", args=[job.pk])).status_code == 404
    assert client.get(reverse("training:job_metrics", args=[job.pk])).status_code == 404
    assert client.post(reverse("training:job_cancel", args=[job.pk])).status_code == 404
    job.refresh_from_db()
    assert not job.cancel_requested and job.status == Job.Status.QUEUED


def test_an_admin_cannot_see_or_use_another_projects_jobs(
    admin_client, admin_user, project, other_project
):
    foreign = a_job(other_project, other_project.created_by)
    assert admin_client.get(reverse("training:job_detail", args=[foreign.pk])).status_code == 404
    assert admin_client.post(reverse("training:job_cancel", args=[foreign.pk])).status_code == 404
    # nor launch into it, nor start from its checkpoints
    response = post_launch(admin_client, "sft", other_project, {"max_steps": 2})
    assert response.status_code == 200 and "project" in response.context["form"].errors
    ckpt = Checkpoint.objects.create(
        project=other_project, role="policy", path="/x", base_model="tiny"
    )
    response = post_launch(
        admin_client, "sft", project, {"max_steps": 2}, parent_checkpoint=ckpt.pk
    )
    assert "parent_checkpoint" in response.context["form"].errors
    assert Job.objects.filter(project=project).count() == 0
    listed = admin_client.get(reverse("training:home")).context["jobs"]
    assert foreign not in list(listed)


def test_cancel_needs_a_csrf_token(admin_user, project):
    job = a_job(project, admin_user)
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    assert client.post(reverse("training:job_cancel", args=[job.pk])).status_code == 403
    job.refresh_from_db()
    assert job.status == Job.Status.QUEUED
    page = client.get(reverse("training:job_detail", args=[job.pk]))
    token = page.context["csrf_token"]
    response = client.post(
        reverse("training:job_cancel", args=[job.pk]), {"csrfmiddlewaretoken": str(token)}
    )
    assert response.status_code == 302
    job.refresh_from_db()
    assert job.status == Job.Status.CANCELLED


def test_metrics_endpoint_returns_only_points_after_the_cursor(admin_client, admin_user, project):
    job = a_job(project, admin_user)
    token = services.job_claim(job_id=job.pk, worker="w:1")
    services.metric_points_write(
        job_id=job.pk,
        token=token,
        points=[(1, "loss/reward", 0.9), (1, "reward/accuracy", 0.5)],
        step=1,
    )
    url = reverse("training:job_metrics", args=[job.pk])
    first = admin_client.get(url, {"after": 0}).json()
    assert first["series"] == {"loss/reward": [[1, 0.9]], "reward/accuracy": [[1, 0.5]]}
    assert (
        first["job"]["status"] == "running"
        and first["job"]["step"] == 1
        and first["job"]["progress"] == 25
    )
    services.metric_points_write(
        job_id=job.pk, token=token, points=[(2, "loss/reward", 0.8)], step=2
    )
    second = admin_client.get(url, {"after": first["cursor"]}).json()
    assert second["series"] == {"loss/reward": [[2, 0.8]]}
    assert second["cursor"] > first["cursor"]
    third = admin_client.get(url, {"after": second["cursor"]}).json()
    assert third["series"] == {} and third["cursor"] == second["cursor"]
    assert admin_client.get(url, {"after": "x"}).status_code == 400


def test_job_page_shows_progress_charts_log_and_cancel(admin_client, admin_user, project):
    job = a_job(project, admin_user)
    page = admin_client.get(reverse("training:job_detail", args=[job.pk])).content.decode()
    assert 'id="job-progress"' in page and 'id="charts"' in page and 'id="job-log"' in page
    assert 'id="cancel-button"' in page and "csrfmiddlewaretoken" in page
    assert "vendor/uplot/uPlot.iife.min.js" in page and "js/training_job.js" in page
    assert job.input_hash in page


def test_failed_job_page_says_why(admin_client, admin_user, project):
    job = a_job(project, admin_user)
    token = services.job_claim(job_id=job.pk, worker="w:1")
    services.job_finish(
        job_id=job.pk,
        token=token,
        status=Job.Status.FAILED,
        error="Training diverged: loss is nan at step 3",
    )
    page = admin_client.get(reverse("training:job_detail", args=[job.pk])).content.decode()
    assert "Training diverged: loss is nan at step 3" in page and 'id="cancel-button"' not in page


def test_checkpoint_registry_shows_lineage(admin_client, admin_user, project):
    sft_job = a_job(project, admin_user, kind="sft")
    sft = services.checkpoint_register(job=sft_job, path="/c/sft", role="policy", step=4)
    ppo_job = services.job_launch(
        kind="ppo",
        project=project,
        config={"max_steps": 2, "batch_size": 4},
        user=admin_user,
        parent_checkpoint=sft,
        reward_rule="politeness",
    )
    ppo = services.checkpoint_register(
        job=ppo_job, path="/c/ppo", role="policy", step=2, parent=sft
    )
    listing = admin_client.get(reverse("training:checkpoint_list")).content.decode()
    assert f"#{ppo.pk}" in listing and f"#{sft.pk}" in listing
    detail = admin_client.get(reverse("training:checkpoint_detail", args=[ppo.pk]))
    assert detail.context["lineage"] == [ppo, sft]
    html = detail.content.decode()
    assert "rule: politeness" in html and sft_job.input_hash[:12] in html


def test_compare_page_lists_the_selected_runs(admin_client, admin_user, project):
    jobs = [a_job(project, admin_user) for _ in range(2)]
    response = admin_client.get(reverse("training:job_compare"), {"jobs": [j.pk for j in jobs]})
    assert response.status_code == 200
    assert {c["id"] for c in response.context["compare"]} == {j.pk for j in jobs}
    assert 'id="compare-data"' in response.content.decode()


# --------------------------------------------------------------------------- JSON API


def test_api_launch_status_metrics_and_cancel(admin_client, admin_user, project):
    response = admin_client.post(
        "/api/training/jobs",
        {
            "kind": "reward",
            "project_id": project.pk,
            "base_model": "tiny",
            "config": {"max_steps": 3, "batch_size": 2},
        },
        content_type="application/json",
    )
    assert response.status_code == 201, response.content
    job = response.json()
    assert job["status"] == "queued" and job["input_count"] == 6 and len(job["input_hash"]) == 64
    assert admin_client.get(f"/api/training/jobs/{job['id']}").json()["kind"] == "reward"
    token = services.job_claim(job_id=job["id"], worker="w:1")
    services.metric_points_write(
        job_id=job["id"], token=token, points=[(1, "loss/reward", 0.7)], step=1
    )
    metrics = admin_client.get(f"/api/training/jobs/{job['id']}/metrics?after=0").json()
    assert metrics["series"] == {"loss/reward": [[1.0, 0.7]]} and metrics["status"] == "running"
    cancelled = admin_client.post(f"/api/training/jobs/{job['id']}/cancel").json()
    assert cancelled["cancel_requested"] is True
    assert [j["id"] for j in admin_client.get("/api/training/jobs").json()] == [job["id"]]


def test_api_refuses_a_bad_config_with_the_reason_and_creates_no_job(admin_client, project):
    response = admin_client.post(
        "/api/training/jobs",
        {"kind": "sft", "project_id": project.pk, "config": {"steps": 3}},
        content_type="application/json",
    )
    assert response.status_code == 400
    assert response.json()["field"] == "config" and "max_steps" in response.json()["detail"]
    assert Job.objects.count() == 0


def test_api_is_scoped_to_the_users_admin_projects(client, labeler, project, other_project):
    job = a_job(other_project, other_project.created_by)
    client.force_login(labeler)
    assert client.get(f"/api/training/jobs/{job.pk}").status_code == 404
    assert client.get("/api/training/jobs").json() == []
    response = client.post(
        "/api/training/jobs",
        {"kind": "sft", "project_id": project.pk, "config": {}},
        content_type="application/json",
    )
    assert response.status_code == 404
    assert MetricPoint.objects.count() == 0 and Job.objects.filter(project=project).count() == 0


def test_api_checkpoints_carry_their_lineage(admin_client, admin_user, project):
    job = a_job(project, admin_user)
    ckpt = services.checkpoint_register(
        job=job, path="/c/rm", role="reward", step=4, metrics={"reward/accuracy": 0.8}
    )
    rows = admin_client.get("/api/training/checkpoints").json()
    assert (
        rows[0]["id"] == ckpt.pk
        and rows[0]["job_id"] == job.pk
        and rows[0]["input_hash"] == job.input_hash
    )
    assert rows[0]["metrics"] == {"reward/accuracy": 0.8}


@pytest.mark.parametrize("kind", ["reward", "ppo", "grpo"])
def test_on_the_tiny_demo_model_rl_forms_prefill_the_settings_that_learn_fast(kind, tiny_model):
    from labeling.demo_data import DEMO_PROMPTS
    from rlhf.config import config_from_dict
    from training.forms import TINY_DEMO_OVERRIDES, config_defaults

    pytest.importorskip(f"rlhf.{kind}")
    demo = config_defaults(kind, base_model=tiny_model)
    assert demo["learning_rate"] == TINY_DEMO_OVERRIDES[kind]["learning_rate"]
    config_from_dict(kind, {**demo, "model": tiny_model})  # the engine accepts them
    other = config_defaults(kind, base_model="Qwen/Qwen2.5-0.5B-Instruct")
    assert other["learning_rate"] != demo["learning_rate"]  # real models keep the literature rate
    if kind != "reward":
        # every RL step sees every demo prompt, so the reward curve is not prompt-mix noise
        assert demo["batch_size"] % len(DEMO_PROMPTS) == 0


def test_api_launch_refuses_unknown_options_and_ids_beyond_64_bits(admin_client, project):
    def launch(**body):
        return admin_client.post(
            "/api/training/jobs",
            {"kind": "reward", "project_id": project.pk, "config": {}, **body},
            content_type="application/json",
        )

    assert launch(max_prompt=5).status_code == 422  # a misspelt option is not ignored
    assert launch(project_id=10**20).status_code == 422
    assert launch(reward_checkpoint_id=True).status_code == 422
    assert launch(max_prompts=True).status_code == 422
    assert launch(max_attempts=10**9).status_code == 422
    response = launch(send_to_labelers=True)
    assert response.status_code == 400 and response.json()["field"] == "send_to_labelers"
    assert Job.objects.count() == 0
    assert admin_client.get("/api/training/jobs", {"project_id": 10**20}).status_code == 422
    assert admin_client.get(f"/api/training/jobs/{10**20}").status_code == 404
    assert admin_client.get(f"/training/jobs/{10**20}/").status_code == 404
    assert admin_client.get("/training/compare/", {"ids": f"{10**20},x"}).status_code == 200


def test_a_sampling_job_draws_the_projects_k_completions_per_prompt(admin_client, project):
    def launch(config):
        return admin_client.post(
            "/api/training/jobs",
            {"kind": "sample", "project_id": project.pk, "base_model": "tiny", "config": config},
            content_type="application/json",
        )

    response = launch({"num_completions": project.k + 1})
    assert response.status_code == 400 and f"K = {project.k}" in response.json()["detail"]
    response = launch({"max_new_tokens": 4})
    assert response.status_code == 201, response.content
    assert response.json()["config"]["num_completions"] == project.k


def test_a_reward_checkpoints_ppo_link_preselects_it_on_the_launch_form(
    admin_client, admin_user, project, other_project
):
    # a newer reward model in another project the admin also runs must not be preselected
    Membership.objects.create(project=other_project, user=admin_user, role=Membership.Role.ADMIN)
    own = services.checkpoint_register(
        job=a_job(project, admin_user), path="/c/own-rm", role="reward", step=4
    )
    services.checkpoint_register(
        job=a_job(other_project, admin_user), path="/c/other-rm", role="reward", step=4
    )
    job_page = admin_client.get(reverse("training:job_detail", args=[own.job_id])).content.decode()
    link = f"{launch_url('ppo')}?project={project.pk}&amp;reward=checkpoint%3A{own.pk}"
    assert f'<a href="{link}">PPO with it</a>' in job_page
    metrics = admin_client.get(reverse("training:job_metrics", args=[own.job_id])).json()
    assert metrics["checkpoints"][0]["actions"] == [
        {"label": "PPO with it", "url": link.replace("&amp;", "&")}
    ]
    form = admin_client.get(link.replace("&amp;", "&")).content.decode()
    assert f'<option value="checkpoint:{own.pk}" selected>' in form
    plain = admin_client.get(f"{launch_url('ppo')}?project={project.pk}").content.decode()
    assert f'<option value="checkpoint:{own.pk}" selected>' in plain  # the project's own RM


def test_the_job_list_filter_has_no_inline_script(admin_client, project):
    page = admin_client.get(reverse("training:home")).content.decode()
    assert 'id="project-filter"' in page and "onchange" not in page
    assert 'id="project-filter-go"' in page and "js/training_list.js" in page


def test_the_launch_form_sets_max_attempts_as_the_api_does(admin_client, project):
    response = post_launch(admin_client, "reward", project, {"max_steps": 3}, max_attempts=5)
    assert response.status_code == 302, response.content
    assert Job.objects.get().max_attempts == 5
    refused = post_launch(admin_client, "reward", project, {"max_steps": 3}, max_attempts=21)
    assert refused.status_code == 200 and "max_attempts" in refused.context["form"].errors
    assert Job.objects.count() == 1


def test_checkpoint_pickers_offer_the_newest_jobs_latest_step_first(admin_user, project):
    from training.forms import JobLaunchForm

    job = a_job(project, admin_user, kind="sft")
    # live registration can register a job's final checkpoint before an earlier one
    services.checkpoint_register(job=job, path="/c/40", role="policy", step=40)
    services.checkpoint_register(job=job, path="/c/20", role="policy", step=20)
    later = a_job(project, admin_user, kind="sft")
    services.checkpoint_register(job=later, path="/c/later-10", role="policy", step=10)
    form = JobLaunchForm(kind="eval", user=admin_user)
    steps = [c.step for c in form.fields["parent_checkpoint"].queryset]
    assert steps == [10, 40, 20]


def test_the_job_page_shows_the_devices_and_processes_the_job_uses(
    admin_client, admin_user, project
):
    one = a_job(project, admin_user)
    page = admin_client.get(reverse("training:job_detail", args=[one.pk])).content.decode()
    assert "1 device, 1 process" in page
    two = services.job_launch(
        kind="reward",
        project=project,
        config={"max_steps": 4, "batch_size": 2},
        user=admin_user,
        base_model="tiny",
        devices=2,
    )
    page = admin_client.get(reverse("training:job_detail", args=[two.pk])).content.decode()
    assert "2 devices, one process each (torchrun)" in page
    assert (
        admin_client.get(reverse("training:job_metrics", args=[two.pk])).json()["job"]["devices"]
        == 2
    )
