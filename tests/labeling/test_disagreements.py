"""Disagreement routing (labeling.routing, the queue's ordering in labeling.services) and the
page and API that list where the reward model and the labelers disagree."""

import json

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from labeling import routing, selectors, services
from labeling.auth import api_token_create
from labeling.models import Item, ItemScore, Membership
from training.models import Checkpoint

pytestmark = pytest.mark.django_db

# as tests/labeling/test_query_counts.py: own lease, SAVEPOINT, candidate, recount, INSERT,
# RELEASE
NEXT_NEW_LEASE = 6


# --------------------------------------------------------------------------- the maths


def test_reward_groups_rank_by_reward_and_tie_equal_rewards():
    assert routing.reward_groups({1: 0.5, 2: 2.0, 3: 0.5}) == [[2], [1, 3]]


def test_agreement_counts_the_pairs_the_consensus_orders():
    consensus = [[1], [2, 3], [4]]  # 5 strict pairs; (2, 3) is a tie and does not count
    rewards = {1: 4.0, 2: 3.0, 3: 1.0, 4: 2.0}  # 3 below 4: one of five against
    assert routing.reward_agreement(rewards, consensus) == pytest.approx(4 / 5)
    assert routing.reward_agreement({1: 1.0, 2: 1.0}, [[1], [2]]) == 0.0  # a reward tie
    assert routing.reward_agreement({1: 1.0, 2: 2.0}, [[1, 2]]) is None


def test_the_margin_is_the_smallest_gap():
    assert routing.reward_margin({1: 0.0, 2: 1.5, 3: 1.75}) == 0.25


# --------------------------------------------------------------------------- scoring


@pytest.fixture
def ranked(project, labeler, make_items):
    """Ten items of 2; the labeler ranked each, preferring the first completion (position 0).
    Returns [(item id, first completion id, second completion id)] in item order."""
    project.k = 2
    project.save()
    items = make_items(project, 10, k=2)
    out = []
    for item in items:
        lease = services.assignment_next(project=project, user=labeler)
        first, second = sorted(lease.display_order)
        services.ranking_submit(user=labeler, item_id=lease.item_id, groups=[[first], [second]])
        out.append((item.pk, first, second))
    return out


def _scores(ranked, against=(), margins=None):
    """The reward model agrees with the labeler (margin 1 + index / 10) except on `against`."""
    scores = {}
    for n, (item_id, first, second) in enumerate(ranked):
        gap = (margins or {}).get(n, 1 + n / 10)
        scores[item_id] = {first: gap, second: 0.0}
        if n in against:
            scores[item_id] = {first: 0.0, second: gap}
    return scores


def test_storing_scores_marks_disagreements_and_the_closest_call_routed(project, ranked):
    stored = routing.item_scores_store(
        project=project,
        scores=_scores(ranked, against={4}, margins={7: 0.05}),
        checkpoint_id=42,
    )
    assert stored == 10
    rows = {s.item_id: s for s in ItemScore.objects.all()}
    disagreeing, close = rows[ranked[4][0]], rows[ranked[7][0]]
    assert disagreeing.agreement == 0.0 and disagreeing.routed and disagreeing.priority == -1.0
    # 10% of 10 scored items: the one with the smallest margin, though the model agrees
    assert close.agreement == 1.0 and close.margin == 0.05 and close.routed
    assert 0 < close.priority < 1
    assert sorted(s.item_id for s in rows.values() if s.routed) == sorted(
        [ranked[4][0], ranked[7][0]]
    )
    assert {s.checkpoint_id for s in rows.values()} == {42}


def test_scores_are_refused_for_another_projects_item_or_a_missing_completion(
    project, ranked, admin_user
):
    other = services.project_create(name="Other", created_by=admin_user, k=2)
    item_id, first, second = ranked[0]
    with pytest.raises(services.LabelingError, match="each of its completions"):
        routing.item_scores_store(project=project, scores={item_id: {first: 1.0}})
    with pytest.raises(services.LabelingError, match="not in this project"):
        routing.item_scores_store(project=other, scores={item_id: {first: 1.0, second: 0.0}})
    with pytest.raises(services.LabelingError, match="finite"):
        routing.item_scores_store(
            project=project, scores={item_id: {first: float("nan"), second: 0.0}}
        )
    assert not ItemScore.objects.exists()


def test_compute_scores_each_completion_with_the_scorer(project, ranked):
    calls = []

    def scorer(prompts, completions):  # prefers the longer completion text
        calls.append(len(prompts))
        return [float(len(c)) for c in completions]

    assert routing.item_scores_compute(project=project, checkpoint_path="unused", scorer=scorer)
    assert sum(calls) == 20
    item_id, first, second = ranked[0]
    assert ItemScore.objects.get(item_id=item_id).scores == {
        str(first): float(len("Answer 0 to prompt 0")),
        str(second): float(len("Answer 1 to prompt 0")),
    }


def test_the_command_scores_with_a_reward_checkpoint_of_the_project(
    project, ranked, monkeypatch, capsys
):
    ckpt = Checkpoint.objects.create(
        project=project, role=Checkpoint.Role.REWARD, path="/ckpt/rm", base_model="tiny"
    )
    seen = []

    def load(path):
        seen.append(path)
        return lambda prompts, completions: [0.0 if "Answer 0" in c else 1.0 for c in completions]

    monkeypatch.setattr(routing, "_load_scorer", load)
    call_command("score_items", str(project.pk), "--checkpoint", str(ckpt.pk))
    assert seen == ["/ckpt/rm"]
    assert "10 items scored, 10 where the reward model disagrees" in capsys.readouterr().out
    assert set(ItemScore.objects.values_list("checkpoint_id", flat=True)) == {ckpt.pk}
    with pytest.raises(CommandError, match="no reward checkpoint"):
        call_command("score_items", str(project.pk), "--checkpoint", str(ckpt.pk + 1))


# --------------------------------------------------------------------------- the queue


@pytest.fixture
def queue(project, make_user, make_items):
    """Six unranked items of 2; the model disagrees with the consensus of 3 rankings on item
    4 (now complete; 1 labeler per item) and is least sure on item 0. Returns the items."""
    project.k = 2
    project.save()
    items = make_items(project, 6, k=2)
    scores = {}
    for n, item in enumerate(items):
        first, second = sorted(item.item_completions.values_list("completion_id", flat=True))
        scores[item.pk] = {first: 1.0 + n, second: 0.0}
    routing.item_scores_store(project=project, scores=scores)
    # item 4 ranked by someone else against the model; item 0 has the smallest margin (1.0)
    rater = make_user("rater")
    services.membership_set(project=project, user=rater, role=Membership.Role.LABELER)
    first, second = sorted(scores[items[4].pk])
    for _ in range(4):  # the rater is handed the items in id order: skip the first four
        lease = services.assignment_next(project=project, user=rater)
        services.item_skip(user=rater, item_id=lease.item_id)
    lease = services.assignment_next(project=project, user=rater)
    assert lease.item_id == items[4].pk
    services.ranking_submit(user=rater, item_id=items[4].pk, groups=[[second], [first]])
    routing.item_scores_refresh(project=project)
    assert Item.objects.get(pk=items[4].pk).is_complete
    return items


def test_with_routing_off_the_queue_keeps_its_order(project, labeler, queue):
    lease = services.assignment_next(project=project, user=labeler)
    assert lease.item_id == queue[0].pk


def test_with_routing_on_disagreements_then_close_calls_go_first_to_more_labelers(
    project, labeler, make_user, queue
):
    routing.project_routing_set(
        project=project, route_disagreements=True, routed_annotations_per_item=2
    )
    routing.item_scores_refresh(project=project)
    # item 4 is complete (1 labeler per item) but routed: it goes to one more labeler
    lease = services.assignment_next(project=project, user=labeler)
    assert lease.item_id == queue[4].pk
    second = make_user("second")
    services.membership_set(project=project, user=second, role=Membership.Role.LABELER)
    # item 4 has its 2 routed labelers (a ranking and a live lease): the closest call next
    # (margin 1.0 on item 0 is the smallest: 10% of 6 items rounds up to one item)
    lease = services.assignment_next(project=project, user=second)
    assert lease.item_id == queue[0].pk
    third = make_user("third")
    services.membership_set(project=project, user=third, role=Membership.Role.LABELER)
    # item 0 is leased by `second`, but routed items take 2 labelers: the third gets it too
    assert services.assignment_next(project=project, user=third).item_id == queue[0].pk
    fourth = make_user("fourth")
    services.membership_set(project=project, user=fourth, role=Membership.Role.LABELER)
    # nothing routed has room: the usual order (item 0 has live leases of 2 > 1, so item 1)
    assert services.assignment_next(project=project, user=fourth).item_id == queue[1].pk


def _count(fn):
    with CaptureQueriesContext(connection) as queries:
        result = fn()
    return result, len(queries), [q["sql"] for q in queries.captured_queries]


def test_routing_costs_one_statement_more_only_when_no_routed_item_is_free(
    project, labeler, make_user, queue
):
    project.route_disagreements = True
    project.save()
    lease, n, sql = _count(lambda: services.assignment_next(project=project, user=labeler))
    assert lease.item_id == queue[4].pk and n <= NEXT_NEW_LEASE, sql
    ItemScore.objects.update(routed=False)
    other = make_user("other")
    services.membership_set(project=project, user=other, role=Membership.Role.LABELER)
    lease, n, sql = _count(lambda: services.assignment_next(project=project, user=other))
    assert lease.item_id == queue[0].pk and n <= NEXT_NEW_LEASE + 1, sql


# --------------------------------------------------------------------------- page and API


def test_the_page_lists_the_disagreements_to_admins_only(
    project, queue, admin_client, client, labeler, outsider
):
    url = f"/projects/{project.pk}/disagreements/"
    response = admin_client.get(url)
    assert response.status_code == 200
    html = response.content.decode()
    assert f'data-item-id="{queue[4].pk}"' in html
    assert html.count('class="flag" data-item-id') == 1  # only item 4 disagrees
    for user in (labeler, outsider):
        other = Client()
        other.force_login(user)
        assert other.get(url).status_code == 404
        assert other.post(f"/projects/{project.pk}/routing/", {}).status_code == 404


def test_the_routing_form_sets_the_option_with_csrf(project, queue, admin_user):
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    url = f"/projects/{project.pk}/routing/"
    data = {"route_disagreements": "on", "routed_annotations_per_item": "4"}
    assert client.post(url, data).status_code == 403  # no CSRF token
    client.get(f"/projects/{project.pk}/disagreements/")
    data["csrfmiddlewaretoken"] = client.cookies["csrftoken"].value
    response = client.post(url, data)
    assert response.status_code == 302
    project.refresh_from_db()
    assert project.route_disagreements and project.routed_annotations_per_item == 4
    data["routed_annotations_per_item"] = "x"
    response = client.post(url, data, follow=True)
    assert "between 1 and 50" in response.content.decode()
    project.refresh_from_db()
    assert project.routed_annotations_per_item == 4


def test_the_api_lists_disagreements_and_sets_routing_for_admins_only(
    project, queue, admin_user, labeler
):
    admin = Client(headers={"Authorization": f"Bearer {api_token_create(user=admin_user)}"})
    body = admin.get(f"/api/projects/{project.pk}/disagreements").json()
    assert (body["scored"], body["disagree"], body["route_disagreements"]) == (6, 1, False)
    (item,) = body["items"]
    assert item["item_id"] == queue[4].pk and item["agreement"] == 0.0
    assert [c["consensus_rank"] for c in item["completions"]] == [1, 2]
    assert [c["reward"] for c in item["completions"]] == [0.0, 5.0]
    response = admin.put(
        f"/api/projects/{project.pk}/routing",
        json.dumps({"route_disagreements": True, "routed_annotations_per_item": 3}),
        content_type="application/json",
    )
    assert response.status_code == 200 and response.json()["route_disagreements"] is True
    response = admin.put(
        f"/api/projects/{project.pk}/routing",
        json.dumps({"route_disagreements": True, "routed_annotations_per_item": 99}),
        content_type="application/json",
    )
    assert response.status_code == 400
    lab = Client(headers={"Authorization": f"Bearer {api_token_create(user=labeler)}"})
    assert lab.get(f"/api/projects/{project.pk}/disagreements").status_code == 404
    response = lab.put(
        f"/api/projects/{project.pk}/routing",
        json.dumps({"route_disagreements": False}),
        content_type="application/json",
    )
    assert response.status_code == 404
    assert selectors.project_get_for_user(
        user=admin_user, project_id=project.pk
    ).route_disagreements
