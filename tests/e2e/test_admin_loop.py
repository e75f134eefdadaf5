"""The admin's side of the human loop in a browser: the per-labeler report on the dashboard,
the page of items where the reward model and the labelers disagree (and turning routing on),
and an evaluation's human win rate beside the reward model's."""

from __future__ import annotations

import pytest

from labeling import routing
from labeling import services as labeling_services
from labeling.models import Item, Membership, Project
from tests.e2e.test_training_job import login
from tests.training.factories import make_project
from tests.training.test_human_eval import _eval_job

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def ranked(admin_user, labeler):
    """A project of 3 items of K = 3, each ranked by the labeler (best first: "good")."""
    project = labeling_services.project_create(name="Loop", created_by=admin_user, k=3)
    labeling_services.membership_set(project=project, user=labeler, role=Membership.Role.LABELER)
    for i in range(3):
        prompt = labeling_services.prompt_create(project=project, text=f"Question {i}?")
        for text in ("good", "fine", "bad"):
            labeling_services.completion_create(prompt=prompt, text=f"{text} answer {i}")
        labeling_services.items_create_for_prompt(project=project, prompt=prompt)
    while (lease := labeling_services.assignment_next(project=project, user=labeler)) is not None:
        by_text = {
            c.text.split()[0]: c.pk for c in Item.objects.get(pk=lease.item_id).completions.all()
        }
        labeling_services.ranking_submit(
            user=labeler,
            item_id=lease.item_id,
            groups=[[by_text["good"]], [by_text["fine"]], [by_text["bad"]]],
        )
    return project


def test_the_admin_sees_the_labeler_report_and_adjudicates_disagreements(
    page, live_server, admin_user, labeler, ranked
):
    # the reward model reverses the labelers on the first item and agrees on the others
    items = list(Item.objects.filter(project=ranked).order_by("id"))
    scores = {}
    for n, item in enumerate(items):
        by_text = {c.text.split()[0]: c.pk for c in item.completions.all()}
        order = ("bad", "fine", "good") if n == 0 else ("good", "fine", "bad")
        scores[item.pk] = {by_text[t]: 3.0 - r for r, t in enumerate(order)}
    routing.item_scores_store(project=ranked, scores=scores)
    login(page, live_server, admin_user)

    page.goto(f"{live_server.url}/projects/{ranked.pk}/")
    report = page.locator("#labeler-report")
    assert "bob-labeler" in report.inner_text()
    assert report.locator(f'tr[data-user-id="{labeler.pk}"]').count() == 1

    page.goto(f"{live_server.url}/projects/{ranked.pk}/disagreements/")
    assert "1 / 3" in page.locator("#disagreement-counts").inner_text()  # 1 of 3 disputed
    disputed = page.locator("#disagreements li[data-item-id]")
    assert disputed.count() == 1 and disputed.get_attribute("data-item-id") == str(items[0].pk)
    page.check("#routing-form input[name=route_disagreements]")
    page.click("#routing-form button[type=submit]")
    page.wait_for_load_state()
    assert Project.objects.get(pk=ranked.pk).route_disagreements is True


def test_an_evaluation_page_shows_the_human_win_rate_beside_the_reward_models(
    page, live_server, admin_user, labeler
):
    project = make_project(user=admin_user)
    labeling_services.membership_set(project=project, user=labeler, role=Membership.Role.LABELER)
    job = _eval_job(project, admin_user)
    # the labeler prefers A on every sent item
    while (lease := labeling_services.assignment_next(project=project, user=labeler)) is not None:
        item = Item.objects.get(pk=lease.item_id)
        if item.source != Item.Source.EVAL:
            labeling_services.item_skip(user=labeler, item_id=item.pk)
            continue
        a, b = sorted(item.completions.all(), key=lambda c: not c.text.startswith("A"))
        labeling_services.ranking_submit(user=labeler, item_id=item.pk, groups=[[a.pk], [b.pk]])
    login(page, live_server, admin_user)
    page.goto(f"{live_server.url}/training/jobs/{job.pk}/")
    table = page.locator("#eval-win-rates").inner_text()
    assert "Reward model" in table and "0.667" in table  # 2 of 3 by the reward model
    human = page.locator("#eval-human").inner_text()
    assert "1.000" in human and "3 of 3 items ranked" in human
    assert "pick the same side in 0.67" in page.locator("#eval-agreement").inner_text()


def test_a_labeler_sees_a_long_conversation_folded_to_its_latest_exchange(
    page, live_server, admin_user, labeler
):
    project = labeling_services.project_create(name="Chats", created_by=admin_user, k=2)
    labeling_services.membership_set(project=project, user=labeler, role=Membership.Role.LABELER)
    turns = [{"role": "system", "content": "Be kind."}]
    for i in range(4):
        turns += [
            {"role": "user", "content": f"question {i}"},
            {"role": "assistant", "content": f"answer {i}"},
        ]
    turns.append({"role": "user", "content": "the **latest** question"})
    prompt = labeling_services.prompt_create(project=project, text="chat", messages=turns)
    for text in ("reply one", "reply two"):
        labeling_services.completion_create(prompt=prompt, text=text)
    labeling_services.items_create_for_prompt(project=project, prompt=prompt)
    login(page, live_server, labeler)

    page.goto(f"{live_server.url}/projects/{project.pk}/label/")
    page.wait_for_selector("#item[data-item-id] .response")
    fold = page.locator("details.earlier-turns")
    assert fold.count() == 1 and not fold.evaluate("d => d.open")
    assert page.locator(".turn-system").first.is_visible()  # the system turn stays in view
    latest = page.locator(".turn-user").last
    assert latest.is_visible() and latest.locator("strong").inner_text() == "latest"
    assert not page.get_by_text("question 0", exact=True).is_visible()
    page.click("details.earlier-turns > summary")
    assert page.get_by_text("question 0", exact=True).is_visible()
