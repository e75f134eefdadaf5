"""Browser test: an admin launches a reward-model job from the launch form and watches it run:
the progress bar advances and the uPlot chart draws from the polled metrics, with a real
Celery worker training on the tiny model behind pytest-django's live server."""

from __future__ import annotations

import json
import time

import pytest
from django.conf import settings
from django.test import Client
from django.utils import timezone

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
    page.wait_for_selector("#charts .chart[data-group=loss] canvas", timeout=30_000)
    page.wait_for_function(
        "() => Number(document.getElementById('charts').dataset.points) > 5", timeout=30_000
    )
    assert page.locator("#charts .chart").count() >= 2  # loss, reward, perf, optim ...

    page.wait_for_function(
        "() => document.getElementById('job').dataset.status === 'succeeded'", timeout=120_000
    )
    assert page.evaluate(progress) == 100
    assert page.locator("#job-status .badge").inner_text().strip() == "succeeded"
    assert "step 200/200" in page.locator("#job-log").inner_text()
    page.wait_for_selector("#job-checkpoints tr[data-checkpoint-id]", timeout=15_000)
    assert "reward" in page.locator("#job-checkpoints").inner_text()
    # the page, opened while the job ran, reloads once at its end to show what the server
    # draws (the result, the checkpoint actions); the cancel control is gone
    page.wait_for_selector("#job-result", timeout=30_000)
    assert '"checkpoint_id"' in page.locator("#job-result").inner_text()
    assert page.locator("#cancel-form").count() == 0
    page.wait_for_function(
        "() => Number(document.getElementById('charts').dataset.points) > 5", timeout=30_000
    )
    drawn = int(page.evaluate("() => document.getElementById('charts').dataset.points"))
    assert drawn == MetricPoint.objects.filter(job=job).count()  # every stored point is on a chart


# --------------------------------------------------------------------------- no worker needed


def a_queued_job(project, user, **fields) -> Job:
    """A job row as a launch leaves it, without sending a task (no worker runs these tests)."""
    return Job.objects.create(
        kind="reward",
        project=project,
        launched_by=user,
        config={"max_steps": 40},
        input_kind=Job.Input.RANKINGS,
        base_model="tiny",
        total_steps=40,
        **fields,
    )


@pytest.fixture
def admin_and_project(page, live_server, django_user_model):
    admin = django_user_model.objects.create_user(username="ui-admin", password="pw-ui-admin-1")
    project = make_project(user=admin)
    login(page, live_server, admin)
    return admin, project


HIDDEN_SWITCH = """
Object.defineProperty(Document.prototype, "hidden", {
  configurable: true, get() { return !!window.__hidden; } });
"""


def set_hidden(page, hidden: bool) -> None:
    page.evaluate(
        "(h) => { window.__hidden = h; document.dispatchEvent(new Event('visibilitychange')); }",
        hidden,
    )


def test_the_job_list_updates_its_rows_in_place_and_announces_new_jobs(
    page, live_server, admin_and_project
):
    admin, project = admin_and_project
    job = a_queued_job(project, admin)
    page.goto(f"{live_server.url}/training/")
    row = page.locator(f'#job-table tr[data-job-id="{job.pk}"]')
    assert row.locator("[data-field=queue]").inner_text() == "#1 in the queue"
    page.evaluate("() => { window.__notReloaded = true; }")
    Job.objects.filter(pk=job.pk).update(
        status=Job.Status.RUNNING, worker="gpu-box:7", step=10, started_at=timezone.now()
    )
    page.wait_for_function(
        "(id) => document.querySelector(`tr[data-job-id='${id}'] [data-status]`)"
        ".dataset.status === 'running'",
        arg=job.pk,
    )
    assert "on gpu-box:7" in row.locator("[data-field=queue]").inner_text()
    assert row.locator("[data-field=step]").inner_text() == "10/40"
    a_queued_job(project, admin)
    page.wait_for_selector("#new-jobs:not([hidden])")
    assert "1 job launched since this page loaded" in page.inner_text("#new-jobs")
    assert page.evaluate("() => window.__notReloaded === true")  # updated, not reloaded


def test_cancel_asks_before_it_cancels(page, live_server, admin_and_project):
    admin, project = admin_and_project
    job = a_queued_job(project, admin)
    page.goto(f"{live_server.url}/training/jobs/{job.pk}/")
    confirm = page.get_by_role("button", name=f"Yes, cancel {job}")
    assert not confirm.is_visible()
    page.click("#cancel-button")
    job.refresh_from_db()
    assert job.status == Job.Status.QUEUED  # opening the question cancels nothing
    confirm.click()
    page.wait_for_url(f"**/training/jobs/{job.pk}/")
    page.wait_for_selector("#job[data-status=cancelled]")
    job.refresh_from_db()
    assert job.status == Job.Status.CANCELLED


def _wait_for(page, condition, what: str, seconds: float = 5.0) -> None:
    """Let the page run until ``condition()`` holds (the test's own request log), or fail."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        page.wait_for_timeout(50)


def test_the_job_page_polls_slower_in_a_hidden_tab_and_at_once_when_it_shows(
    page, live_server, admin_and_project
):
    admin, project = admin_and_project
    job = a_queued_job(project, admin)  # active: its page keeps polling
    polls = []
    page.on("request", lambda r: "/metrics?after=" in r.url and polls.append(time.monotonic()))
    page.add_init_script(HIDDEN_SWITCH)
    page.goto(f"{live_server.url}/training/jobs/{job.pk}/")
    _wait_for(page, lambda: len(polls) >= 2, "two polls")  # at once, then every 1.5 s
    assert polls[1] - polls[0] < 2.5
    set_hidden(page, True)
    hidden_at = time.monotonic()
    page.wait_for_timeout(3_500)
    # a poll already scheduled may still come; after it, nothing for 15 s (visible: 2 more)
    assert len([t for t in polls if t > hidden_at + 1.6]) == 0
    shown = time.monotonic()
    set_hidden(page, False)
    _wait_for(page, lambda: polls[-1] >= shown, "a poll as soon as the tab shows", seconds=1.0)


def test_pollers_back_off_after_errors(page, live_server, admin_and_project):
    admin, project = admin_and_project
    job = a_queued_job(project, admin)
    polls = []
    page.route(
        "**/metrics?after=*",
        lambda route: (polls.append(time.monotonic()), route.fulfill(status=503, body="busy")),
    )
    page.goto(f"{live_server.url}/training/jobs/{job.pk}/")
    _wait_for(page, lambda: len(polls) >= 2, "a second poll after an error", seconds=6.0)
    assert polls[1] - polls[0] > 2.5  # 3 s after one failure, not the usual 1.5 s
    delays = page.evaluate(
        """() => {
          const o = {fastMs: 1000, hiddenMs: 15000, maxMs: 60000};
          return [[false, 0], [true, 0], [false, 1], [false, 3], [true, 3], [false, 9]]
            .map(([hidden, failures]) => window.Poll.delay({hidden, failures}, o));
        }"""
    )
    assert delays == [1000, 15000, 2000, 8000, 15000, 60000]


def test_the_job_page_leads_with_reward_kl_and_loss_and_folds_perf_and_optim(
    page, live_server, admin_and_project
):
    admin, project = admin_and_project
    job = a_queued_job(project, admin, status=Job.Status.SUCCEEDED, step=3)
    keys = ["perf/tokens_per_s", "optim/lr", "loss/policy", "objective/kl", "objective/reward"]
    MetricPoint.objects.bulk_create(
        MetricPoint(job=job, step=step, key=key, value=0.1 * step)
        for step in (1, 2, 3)
        for key in keys
    )
    page.goto(f"{live_server.url}/training/jobs/{job.pk}/")
    page.wait_for_function("() => document.getElementById('charts').dataset.points === '15'")
    lead = page.eval_on_selector_all("#charts .chart", "els => els.map(e => e.dataset.key)")
    assert lead == ["objective/reward", "objective/kl", "loss/policy"]
    folded = page.eval_on_selector_all(
        "#charts-folded .chart", "els => els.map(e => e.dataset.key)"
    )
    assert sorted(folded) == ["optim/lr", "perf/tokens_per_s"]
    assert page.inner_text("#charts-more-count") == "2"
    assert not page.locator("#charts-folded").is_visible()  # folded until asked
    page.click("#charts-more summary")
    page.wait_for_selector("#charts-folded .chart canvas", state="visible")
    width = page.eval_on_selector("#charts-folded .chart canvas", "c => c.clientWidth")
    assert width > 200  # sized when the <details> opened, not drawn 0 px wide


def test_compare_overlays_the_runs_beside_final_values_and_the_settings_that_differ(
    page, live_server, admin_and_project
):
    admin, project = admin_and_project
    done = a_queued_job(project, admin, status=Job.Status.SUCCEEDED, step=2)
    live = a_queued_job(project, admin, status=Job.Status.RUNNING, step=1)
    Job.objects.filter(pk=live.pk).update(config={"max_steps": 40, "learning_rate": 0.01})
    MetricPoint.objects.bulk_create(
        [
            MetricPoint(job=done, step=1, key="loss/reward", value=0.9),
            MetricPoint(job=done, step=2, key="loss/reward", value=0.5),
            MetricPoint(job=live, step=1, key="loss/reward", value=0.8),
        ]
    )
    page.goto(f"{live_server.url}/training/compare/?jobs={done.pk}&jobs={live.pk}")
    page.wait_for_selector("#compare-chart canvas")
    assert page.input_value("#compare-key") == "loss/reward"
    final = page.locator('#compare-final tr[data-key="loss/reward"] td')
    assert final.all_inner_texts() == ["0.5", "0.8"]
    assert page.locator("#compare-config tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.key)"
    ) == ["learning_rate"]
    chart = page.locator("#compare-chart").bounding_box()
    table = page.locator("#compare-final").bounding_box()
    assert table["x"] > chart["x"] + chart["width"] - 5  # beside the curves, not below
    MetricPoint.objects.create(job=live, step=2, key="loss/reward", value=0.25)
    page.wait_for_function(
        '() => document.querySelector(\'#compare-final tr[data-key="loss/reward"] '
        "td[data-job=\"1\"]').textContent === '0.25'"
    )
