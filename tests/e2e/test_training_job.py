"""Browser test: an admin launches a reward-model job from the launch form and watches it run:
the progress bar advances and the uPlot chart draws from the polled metrics, with a real
Celery worker training on the tiny model behind pytest-django's live server."""

from __future__ import annotations

import json

import pytest
from django.conf import settings
from django.test import Client

from tests.training.factories import make_project
from tests.training.worker_fixtures import (  # noqa: F401  (fixtures)
    celery_worker,
    checkpoint_dir,
    tiny_model,
    worker,
)
from training.models import Job, MetricPoint

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def login(page, live_server, user) -> None:
    client = Client()
    client.force_login(user)
    cookie = client.cookies[settings.SESSION_COOKIE_NAME]
    page.context.add_cookies([{"name": cookie.key, "value": cookie.value, "url": live_server.url}])


def test_admin_launches_a_reward_model_job_and_watches_progress_and_chart(
    page,
    live_server,
    worker,  # noqa: F811 (the fixture)
    django_user_model,
):
    admin = django_user_model.objects.create_user(username="rm-admin", password="pw-rm-admin-1")
    project = make_project(user=admin)
    login(page, live_server, admin)

    page.goto(f"{live_server.url}/training/")
    page.click("a[data-kind=reward]")
    page.wait_for_selector("#launch-form")
    config = json.loads(page.input_value("textarea[name=config]"))
    config.update(
        {
            "max_steps": 200,
            "batch_size": 4,
            "max_seq_len": 96,
            "save_every": 0,
            "eval_fraction": 0.0,
        }
    )
    page.fill("textarea[name=config]", json.dumps(config, indent=2))
    page.select_option("select[name=project]", str(project.pk))
    page.click("#launch-button")

    page.wait_for_url("**/training/jobs/*/", timeout=15_000)
    job = Job.objects.get(project=project)
    assert job.kind == "reward" and job.launched_by == admin and job.config["max_steps"] == 200

    # Functions, not expression strings: the page's CSP forbids eval, which Playwright uses
    # for a bare expression.
    progress = "() => document.getElementById('job-progress').value"
    page.wait_for_function(
        "() => document.getElementById('job-progress').value > 0", timeout=90_000
    )
    first = page.evaluate(progress)
    page.wait_for_function(
        "(first) => { const v = document.getElementById('job-progress').value;"
        " return v > first || v === 100; }",
        arg=first,
        timeout=90_000,
    )
    # The chart: a uPlot canvas in the "loss" group, fed by the polled points.
    page.wait_for_selector("#charts .tr-chart[data-group=loss] canvas", timeout=30_000)
    page.wait_for_function(
        "() => Number(document.getElementById('charts').dataset.points) > 5", timeout=30_000
    )
    assert page.locator("#charts .tr-chart").count() >= 2  # loss, reward, perf, optim ...

    page.wait_for_function(
        "() => document.getElementById('job').dataset.status === 'succeeded'", timeout=120_000
    )
    assert page.evaluate(progress) == 100
    assert page.locator("#job-status .tr-status").inner_text().strip() == "succeeded"
    assert "step 200/200" in page.locator("#job-log").inner_text()
    page.wait_for_selector("#job-checkpoints tr[data-checkpoint-id]", timeout=15_000)
    assert "reward" in page.locator("#job-checkpoints").inner_text()
    drawn = int(page.evaluate("() => document.getElementById('charts').dataset.points"))
    assert drawn == MetricPoint.objects.filter(job=job).count()  # every stored point is on a chart
