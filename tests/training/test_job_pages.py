"""The training pages an admin runs a team with: the job queue (place in the queue, which
worker runs what, steps/s and ETA) on the job list, the job page and the API; cancel behind a
confirm step; the compare page's final values and config diff; the folded perf/optim charts;
one stylesheet; one poller."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from training import services
from training.models import Job
from training.views import duration_text

pytestmark = pytest.mark.django_db


def a_job(project, user, kind="reward", **config) -> Job:
    return services.job_launch(
        kind=kind,
        project=project,
        config={"max_steps": 40, "batch_size": 2, **config},
        user=user,
        base_model="tiny",
    )


def running(job: Job, *, step: int, seconds: float, worker="gpu-box:4242") -> Job:
    """Claim the job as a worker and report `step` done `seconds` after it started."""
    token = services.job_claim(job_id=job.pk, worker=worker)
    services.metric_points_write(
        job_id=job.pk, token=token, points=[(step, "loss/reward", 0.5)], step=step
    )
    Job.objects.filter(pk=job.pk).update(started_at=timezone.now() - timedelta(seconds=seconds))
    job.refresh_from_db()
    return job


# --------------------------------------------------------------------------- the queue


def test_a_queued_job_shows_its_place_counting_other_projects_jobs_ahead(
    admin_client, admin_user, project, other_project
):
    ahead = a_job(other_project, other_project.created_by)  # someone else's, first in line
    mine = a_job(project, admin_user)
    page = admin_client.get(reverse("training:home")).content.decode()
    assert "#2 in the queue" in page
    assert f"/training/jobs/{ahead.pk}/" not in page  # their job's place counts, not its row
    detail = admin_client.get(reverse("training:job_detail", args=[mine.pk])).content.decode()
    assert 'id="job-queue">#2 in the queue<' in detail
    api = admin_client.get("/api/training/jobs").json()
    assert [(j["id"], j["queue_position"]) for j in api] == [(mine.pk, 2)]
    assert admin_client.get(f"/api/training/jobs/{mine.pk}").json()["queue_position"] == 2
    services.job_cancel(job=ahead)
    assert admin_client.get(f"/api/training/jobs/{mine.pk}").json()["queue_position"] == 1


def test_a_running_job_shows_its_worker_steps_per_second_and_eta(admin_client, admin_user, project):
    job = running(a_job(project, admin_user), step=10, seconds=20)  # 0.5 steps/s, 30 left
    api = admin_client.get(f"/api/training/jobs/{job.pk}").json()
    assert api["queue_position"] is None and api["worker"] == "gpu-box:4242"
    assert api["steps_per_s"] == pytest.approx(0.5, rel=0.05)
    assert api["eta_s"] == pytest.approx(60, abs=3)
    listing = admin_client.get(reverse("training:home")).content.decode()
    assert 'id="queue-summary"' in listing and "1 running" in listing
    assert "on gpu-box:4242 · 0.5 steps/s · about 1 min" in listing
    polled = admin_client.get(reverse("training:job_metrics", args=[job.pk])).json()["job"]
    assert polled["eta_s"] == api["eta_s"] and "steps/s" in polled["queue_note"]
    page = admin_client.get(reverse("training:job_detail", args=[job.pk])).content.decode()
    assert "on gpu-box:4242" in page and "left</span>" in page


def test_a_finished_job_keeps_its_pace_but_no_eta(admin_client, admin_user, project):
    job = running(a_job(project, admin_user), step=40, seconds=8)
    services.job_finish(job_id=job.pk, token=job.run_token, status=Job.Status.SUCCEEDED)
    api = admin_client.get(f"/api/training/jobs/{job.pk}").json()
    assert api["eta_s"] is None and api["steps_per_s"] > 0 and api["queue_position"] is None


def test_a_job_that_has_not_stepped_has_no_pace(admin_client, admin_user, project):
    job = a_job(project, admin_user)
    services.job_claim(job_id=job.pk, worker="w:1")
    api = admin_client.get(f"/api/training/jobs/{job.pk}").json()
    assert api["steps_per_s"] is None and api["eta_s"] is None


def test_durations_read_as_a_person_says_them():
    assert [duration_text(s) for s in (0, 45, 185, 7800)] == [
        "0 s",
        "45 s",
        "3 min 5 s",
        "2 h 10 min",
    ]


# --------------------------------------------------------------------------- cancel


def test_cancel_asks_first_with_a_form_that_needs_no_script(admin_client, admin_user, project):
    job = a_job(project, admin_user)
    page = admin_client.get(reverse("training:job_detail", args=[job.pk])).content.decode()
    confirm = page[page.index('<details class="confirm" id="cancel-form">') :]
    confirm = confirm[: confirm.index("</details>")]
    assert "Cancel job…</summary>" in confirm and "Take " in confirm
    assert 'method="post"' in confirm and "csrfmiddlewaretoken" in confirm
    assert "onclick" not in page and "<script>" not in page
    job.refresh_from_db()
    assert job.status == Job.Status.QUEUED  # showing the question cancels nothing


def test_a_job_being_cancelled_offers_no_second_cancel(admin_client, admin_user, project):
    job = running(a_job(project, admin_user), step=1, seconds=1)
    services.job_cancel(job=job)
    page = admin_client.get(reverse("training:job_detail", args=[job.pk])).content.decode()
    assert "Cancelling…" in page and "Cancel job…" not in page


def test_cancelling_from_the_list_asks_there_and_returns_to_the_list(
    admin_client, admin_user, project
):
    job = a_job(project, admin_user)
    done = running(a_job(project, admin_user), step=40, seconds=4)
    services.job_finish(job_id=done.pk, token=done.run_token, status=Job.Status.SUCCEEDED)
    list_url = reverse("training:home") + f"?project={project.pk}"
    page = admin_client.get(list_url).content.decode()
    assert page.count('<details class="confirm"') == 1  # only the active job
    assert f'data-cancel="{job.pk}"' in page and f'data-cancel="{done.pk}"' not in page
    assert 'form="compare-form"' in page  # no form nested in another
    response = admin_client.post(reverse("training:job_cancel", args=[job.pk]), {"next": list_url})
    assert response.status_code == 302 and response["Location"] == list_url
    job.refresh_from_db()
    assert job.status == Job.Status.CANCELLED


def test_cancel_never_redirects_off_site(admin_client, admin_user, project):
    job = a_job(project, admin_user)
    response = admin_client.post(
        reverse("training:job_cancel", args=[job.pk]), {"next": "https://evil.example/x"}
    )
    assert response["Location"] == reverse("training:job_detail", args=[job.pk])


def test_another_projects_admin_cannot_cancel_or_see_the_queue_rows(
    client, outsider, admin_user, project, other_project
):
    job = a_job(project, admin_user)
    client.force_login(outsider)
    assert client.post(reverse("training:job_cancel", args=[job.pk])).status_code == 404
    assert client.get(f"/api/training/jobs/{job.pk}").status_code == 404
    assert client.get("/api/training/jobs").json() == []
    job.refresh_from_db()
    assert job.status == Job.Status.QUEUED


# --------------------------------------------------------------------------- one poller


def test_the_job_list_polls_its_active_rows_and_counts_jobs_launched_since(
    admin_client, admin_user, project, other_project
):
    queued = a_job(project, admin_user)
    page = admin_client.get(reverse("training:home")).content.decode()
    assert f'data-cursor="{queued.pk}"' in page and 'data-active="1"' in page
    assert "js/poll.js" in page and page.index("js/poll.js") < page.index("js/training_list.js")
    url = reverse("training:job_list_poll")
    first = admin_client.get(url, {"after": queued.pk, "ids": str(queued.pk)}).json()
    assert first["cursor"] == queued.pk and first["new_jobs"] == 0
    assert [j["queue_note"] for j in first["jobs"]] == ["#1 in the queue"]
    a_job(other_project, other_project.created_by)  # not the admin's: neither shown nor counted
    newer = a_job(project, admin_user)
    running(queued, step=4, seconds=8)
    second = admin_client.get(url, {"after": queued.pk, "ids": str(queued.pk)}).json()
    assert second["cursor"] == newer.pk and second["new_jobs"] == 1
    (row,) = second["jobs"]
    assert (
        row["status"] == "running" and row["step"] == 4 and "on gpu-box:4242" in row["queue_note"]
    )
    assert admin_client.get(url, {"after": "x"}).status_code == 400


def test_the_job_list_poll_answers_only_for_the_users_jobs(
    admin_client, client, outsider, admin_user, project, other_project
):
    foreign = a_job(other_project, other_project.created_by)
    url = reverse("training:job_list_poll")
    assert admin_client.get(url, {"after": 0, "ids": str(foreign.pk)}).json()["jobs"] == []
    mine = admin_client.get(url, {"after": 0, "project": other_project.pk}).json()
    assert mine["new_jobs"] == 0 and mine["cursor"] == 0
    client.force_login(outsider)
    own = client.get(url, {"after": 0, "ids": f"{foreign.pk},x,{10**20}"}).json()
    assert [j["id"] for j in own["jobs"]] == [foreign.pk] and own["new_jobs"] == 1


def test_every_poller_loads_the_one_shared_helper(admin_client, admin_user, project):
    jobs = [a_job(project, admin_user) for _ in range(2)]
    pages = [
        admin_client.get(reverse("training:home")),
        admin_client.get(reverse("training:job_detail", args=[jobs[0].pk])),
        admin_client.get(reverse("training:job_compare"), {"jobs": [j.pk for j in jobs]}),
    ]
    for page in pages:
        assert "js/poll.js" in page.content.decode()
    from django.conf import settings

    static = settings.BASE_DIR / "static" / "js"
    for name in ("training_job.js", "training_list.js", "training_compare.js"):
        source = (static / name).read_text()
        assert "Poll.start(" in source and "setTimeout" not in source and "fetch(" not in source


# --------------------------------------------------------------------------- charts


def test_the_job_page_has_a_closed_fold_for_the_perf_and_optim_charts(
    admin_client, admin_user, project
):
    job = a_job(project, admin_user)
    page = admin_client.get(reverse("training:job_detail", args=[job.pk])).content.decode()
    fold = page[page.index('<details id="charts-more"') :]
    assert page.index('id="charts"') < page.index('id="charts-more"')
    assert 'id="charts-folded"' in fold[: fold.index("</details>")]
    assert '<details id="charts-more" hidden>' in page  # shown once a folded chart exists


# --------------------------------------------------------------------------- compare


def test_compare_shows_final_values_and_only_the_settings_that_differ(
    admin_client, admin_user, project
):
    slow = a_job(project, admin_user, learning_rate=1e-4)
    fast = a_job(project, admin_user, learning_rate=1e-3)
    for job, values in ((slow, [0.9, 0.7]), (fast, [0.8, 0.4])):
        token = services.job_claim(job_id=job.pk, worker="w:1")
        for step, value in enumerate(values, start=1):
            services.metric_points_write(
                job_id=job.pk, token=token, points=[(step, "loss/reward", value)], step=step
            )
    services.metric_points_write(
        job_id=fast.pk,
        token=Job.objects.get(pk=fast.pk).run_token,
        points=[(2, "reward/accuracy", 0.75)],
        step=2,
    )
    response = admin_client.get(reverse("training:job_compare"), {"jobs": [fast.pk, slow.pk]})
    assert [j.pk for j in response.context["jobs"]] == [slow.pk, fast.pk]
    assert response.context["final"] == [
        ("loss/reward", [0.7, 0.4]),
        ("reward/accuracy", [None, 0.75]),
    ]
    assert response.context["config"] == [("learning_rate", ["0.0001", "0.001"])]
    html = response.content.decode()
    assert 'id="compare-final"' in html and 'id="compare-config"' in html
    assert '<tr data-key="learning_rate">' in html and '<tr data-key="batch_size">' not in html


def test_config_diff_dots_nested_keys_and_names_missing_ones():
    from training.selectors import config_diff

    rows = config_diff(
        [{"lora": {"r": 8, "alpha": 16}, "beta": 0.1}, {"lora": {"r": 16, "alpha": 16}}]
    )
    assert rows == [("beta", [0.1, None]), ("lora.r", [8, 16])]
    assert config_diff([]) == [] and config_diff([{"a": 1}, {"a": 1}]) == []


def test_compare_leaves_out_runs_of_projects_the_user_does_not_run(
    admin_client, admin_user, project, other_project
):
    mine = a_job(project, admin_user)
    foreign = a_job(other_project, other_project.created_by, learning_rate=0.5)
    response = admin_client.get(reverse("training:job_compare"), {"jobs": [mine.pk, foreign.pk]})
    assert [j.pk for j in response.context["jobs"]] == [mine.pk]
    assert response.context["config"] == []


# --------------------------------------------------------------------------- one design


def test_training_pages_use_the_sites_stylesheet_and_no_styles_of_their_own(
    admin_client, admin_user, project
):
    from django.conf import settings

    job = a_job(project, admin_user)
    ckpt = services.checkpoint_register(job=job, path="/c/rm", role="reward", step=4)
    folder = settings.BASE_DIR / "templates" / "training"
    assert not (folder / "_styles.html").exists()
    for template in folder.glob("*.html"):
        text = template.read_text()
        assert "<style" not in text and "tr-" not in text.replace('class="tr-warnings"', "")
    css = (settings.BASE_DIR / "static" / "css" / "app.css").read_text()
    for url in (
        reverse("training:home"),
        reverse("training:job_launch", args=["reward"]),
        reverse("training:job_detail", args=[job.pk]),
        reverse("training:job_compare") + f"?jobs={job.pk}",
        reverse("training:checkpoint_list"),
        reverse("training:checkpoint_detail", args=[ckpt.pk]),
    ):
        page = admin_client.get(url).content.decode()
        assert "css/app.css" in page and "<style" not in page, url
    for rule in (".badge[data-status=running]", ".chart-grid", "pre.log", "details.confirm"):
        assert rule in css
