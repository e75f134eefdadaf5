"""A labeler revises their own recent ranking: the Ranking row (same id) holds the latest
version, which counts everywhere, training snapshots included; the replaced version is kept
as a RankingRevision. Pages and API, scoped and CSRF-protected."""

import json
from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from labeling import services
from labeling.auth import api_token_create
from labeling.models import Membership, Ranking, RankingRevision
from training import selectors as training_selectors

pytestmark = pytest.mark.django_db


@pytest.fixture
def ranked(project, labeler, make_items):
    """The labeler's ranking of the first item: display order, best first."""
    make_items(project, 2)
    lease = services.assignment_next(project=project, user=labeler)
    return services.ranking_submit(
        user=labeler,
        item_id=lease.item_id,
        groups=[[c] for c in lease.display_order],
        rationale="first thoughts",
        seconds_spent=10,
        display_order=lease.display_order,
    )


def _reversed(ranking):
    return [list(g) for g in reversed(ranking.groups)]


def test_a_revision_replaces_the_ranking_and_keeps_the_old_one_as_history(ranked, labeler):
    old_groups = ranked.groups
    revised = services.ranking_revise(
        user=labeler,
        item_id=ranked.item_id,
        groups=_reversed(ranked),
        rationale="on second thoughts",
        seconds_spent=5,
    )
    assert revised.pk == ranked.pk
    row = Ranking.objects.get(item_id=ranked.item_id, user=labeler)  # still one row
    assert row.groups == old_groups[::-1] and row.rationale == "on second thoughts"
    assert row.revised_at is not None and row.seconds_spent == 15
    history = RankingRevision.objects.get(ranking=row)
    assert history.groups == old_groups and history.rationale == "first thoughts"
    assert history.submitted_at == ranked.created_at


def test_the_next_training_snapshot_takes_the_latest_ranking(project, ranked, labeler):
    services.ranking_revise(user=labeler, item_id=ranked.item_id, groups=_reversed(ranked))
    ids = training_selectors.ranking_ids_for_project(project=project)
    assert ids == [ranked.pk]
    (row,) = training_selectors.preference_rows(ranking_ids=ids)
    order = Ranking.objects.get(pk=ranked.pk).display_order
    positions = sorted(order)  # preference rows index completions in item position order
    best = ranked.groups[-1][0]
    assert row["ranking"][0] == [positions.index(best)]


def test_the_same_ranking_again_changes_nothing(ranked, labeler):
    services.ranking_revise(
        user=labeler, item_id=ranked.item_id, groups=ranked.groups, rationale="first thoughts"
    )
    assert not RankingRevision.objects.exists()
    assert Ranking.objects.get(pk=ranked.pk).revised_at is None


def test_a_tie_in_another_order_or_other_line_ends_are_the_same_ranking(
    project, labeler, make_items
):
    make_items(project, 1)
    lease = services.assignment_next(project=project, user=labeler)
    a, b, c, d = lease.display_order
    ranked = services.ranking_submit(
        user=labeler, item_id=lease.item_id, groups=[[a], [b, c], [d]], rationale="x\r\ny"
    )
    again = services.ranking_revise(
        user=labeler,
        item_id=ranked.item_id,
        groups=[[a], [c, b], [d]],
        rationale="x\ny",
        seconds_spent=4,
    )
    assert again.changed is False
    row = Ranking.objects.get(pk=ranked.pk)
    assert row.groups == [[a], [b, c], [d]] and row.revised_at is None
    assert not RankingRevision.objects.exists()


def test_a_new_rationale_alone_is_a_revision(ranked, labeler):
    revised = services.ranking_revise(
        user=labeler, item_id=ranked.item_id, groups=ranked.groups, rationale="second thoughts"
    )
    assert revised.changed is True
    assert RankingRevision.objects.get(ranking=ranked).rationale == "first thoughts"
    assert Ranking.objects.get(pk=ranked.pk).rationale == "second thoughts"


def test_the_page_says_when_a_revision_changes_nothing(project, ranked, labeler):
    client = Client()
    client.force_login(labeler)
    url = reverse("labeling:ranking_revise", args=[project.pk, ranked.item_id])
    body = {"groups": ranked.groups, "rationale": "first thoughts", "seconds_spent": 3}
    same = client.post(url, json.dumps(body), content_type="application/json")
    assert same.status_code == 200 and same.json()["changed"] is False
    listing = client.get(reverse("labeling:my_rankings", args=[project.pk]))
    assert b"No change: your ranking is as it was" in listing.content
    assert b"this ranking" in listing.content and not RankingRevision.objects.exists()
    body["rationale"] = "second thoughts"
    changed = client.post(url, json.dumps(body), content_type="application/json")
    assert changed.status_code == 200 and changed.json()["changed"] is True
    listing = client.get(reverse("labeling:my_rankings", args=[project.pk]))
    assert b"No change" not in listing.content and b"1 earlier version kept" in listing.content


def test_a_bad_revision_is_refused_and_changes_nothing(project, ranked, labeler):
    with pytest.raises(services.InvalidRanking, match="exactly once"):
        services.ranking_revise(user=labeler, item_id=ranked.item_id, groups=ranked.groups[:2])
    project.allow_ties = False
    project.save()
    ids = [c for g in ranked.groups for c in g]
    with pytest.raises(services.InvalidRanking, match="does not allow ties"):
        services.ranking_revise(user=labeler, item_id=ranked.item_id, groups=[ids])
    assert Ranking.objects.get(pk=ranked.pk).groups == ranked.groups
    assert not RankingRevision.objects.exists()


def test_a_rationale_the_database_cannot_store_is_refused_by_name(ranked, labeler):
    with pytest.raises(services.LabelingError, match="NUL") as refused:
        services.ranking_revise(
            user=labeler, item_id=ranked.item_id, groups=_reversed(ranked), rationale="a\x00b"
        )
    assert refused.value.field == "rationale"


def test_only_your_own_recent_ranking_of_a_project_you_are_in_can_be_revised(
    project, ranked, labeler, admin_user, outsider
):
    for user in (admin_user, outsider):  # the admin never ranked it; the outsider sees nothing
        with pytest.raises(services.ItemNotFound):
            services.ranking_revise(user=user, item_id=ranked.item_id, groups=_reversed(ranked))
    Ranking.objects.filter(pk=ranked.pk).update(created_at=timezone.now() - timedelta(days=8))
    with pytest.raises(services.RevisionClosed):
        services.ranking_revise(user=labeler, item_id=ranked.item_id, groups=_reversed(ranked))
    Ranking.objects.filter(pk=ranked.pk).update(created_at=timezone.now())
    Membership.objects.filter(project=project, user=labeler).delete()
    with pytest.raises(services.ItemNotFound):
        services.ranking_revise(user=labeler, item_id=ranked.item_id, groups=_reversed(ranked))
    assert Ranking.objects.get(pk=ranked.pk).groups == ranked.groups


def test_the_pages_list_recent_rankings_and_revise_one(project, ranked, labeler):
    client = Client(enforce_csrf_checks=True)
    client.force_login(labeler)
    listing = client.get(reverse("labeling:my_rankings", args=[project.pk]))
    assert listing.status_code == 200
    assert b"is the one that counts" in listing.content and b"this ranking" in listing.content
    url = reverse("labeling:ranking_revise", args=[project.pk, ranked.item_id])
    assert url.encode() in listing.content
    page = client.get(url)
    assert page.status_code == 200
    escaped = json.dumps(ranked.groups).replace('"', "&quot;")
    assert f'data-initial-groups="{escaped}"'.encode() in page.content
    assert b'data-mode="revise"' in page.content and b'id="skip-item"' not in page.content
    body = json.dumps({"groups": _reversed(ranked), "rationale": "better"})
    assert client.post(url, body, content_type="application/json").status_code == 403
    token = page.cookies["csrftoken"].value if "csrftoken" in page.cookies else None
    token = token or client.cookies["csrftoken"].value
    ok = client.post(url, body, content_type="application/json", headers={"X-CSRFToken": token})
    assert ok.status_code == 200 and ok.json()["groups"] == _reversed(ranked)
    listing = client.get(reverse("labeling:my_rankings", args=[project.pk]))
    assert b"your revision of" in listing.content and b"1 earlier version kept" in listing.content
    bad = client.post(
        url,
        json.dumps({"groups": [[1]]}),
        content_type="application/json",
        headers={"X-CSRFToken": token},
    )
    assert bad.status_code == 400 and "not one of the completion ids" in bad.json()["error"]


def test_pages_of_an_item_you_did_not_rank_are_404(project, ranked, admin_user, outsider):
    url = reverse("labeling:ranking_revise", args=[project.pk, ranked.item_id])
    for user in (admin_user, outsider):
        client = Client()
        client.force_login(user)
        assert client.get(url).status_code == 404
        body = json.dumps({"groups": _reversed(ranked)})
        assert client.post(url, body, content_type="application/json").status_code == 404
    client = Client()
    client.force_login(outsider)
    assert client.get(reverse("labeling:my_rankings", args=[project.pk])).status_code == 404


def test_the_api_lists_and_revises_your_rankings(project, ranked, labeler, outsider):
    headers = {"Authorization": f"Bearer {api_token_create(user=labeler)}"}
    client = Client()
    mine = client.get(f"/api/projects/{project.pk}/my-rankings", headers=headers).json()
    assert [(r["id"], r["revisable"], r["earlier_versions"]) for r in mine] == [
        (ranked.pk, True, 0)
    ]
    body = json.dumps({"groups": _reversed(ranked)})
    put = client.put(
        f"/api/items/{ranked.item_id}/ranking",
        body,
        content_type="application/json",
        headers=headers,
    )
    assert put.status_code == 200 and put.json()["revised_at"] and put.json()["id"] == ranked.pk
    Ranking.objects.filter(pk=ranked.pk).update(created_at=timezone.now() - timedelta(days=8))
    closed = client.put(
        f"/api/items/{ranked.item_id}/ranking",
        body,
        content_type="application/json",
        headers=headers,
    )
    assert closed.status_code == 409 and closed.json()["code"] == "revision_closed"
    other = {"Authorization": f"Bearer {api_token_create(user=outsider)}"}
    assert (
        client.put(
            f"/api/items/{ranked.item_id}/ranking",
            body,
            content_type="application/json",
            headers=other,
        ).status_code
        == 404
    )
