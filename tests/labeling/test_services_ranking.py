"""ranking_submit: validation of the groups, leases, double submits, counts."""

from datetime import timedelta

import pytest
from django.utils import timezone

from labeling import services
from labeling.models import Assignment, Item, Membership, Ranking
from labeling.services import InvalidRanking, ItemNotFound, LeaseExpired, NotAssigned

pytestmark = pytest.mark.django_db


def _leased(project, user, make_items, n=1):
    make_items(project, n)
    lease = services.assignment_next(project=project, user=user)
    return lease, list(lease.display_order)


def test_it_stores_a_ranking_and_marks_the_item_complete(project, labeler, make_items):
    lease, ids = _leased(project, labeler, make_items)
    ranking = services.ranking_submit(
        user=labeler,
        item_id=lease.item_id,
        groups=[[i] for i in ids],
        rationale=" ok ",
        seconds_spent=3.5,
    )
    assert ranking.groups == [[i] for i in ids]
    assert ranking.display_order == ids
    assert ranking.rationale == "ok"
    item = Item.objects.get(pk=lease.item_id)
    assert (item.ranking_count, item.is_complete) == (1, True)
    assert Assignment.objects.get(pk=lease.pk).status == Assignment.Status.SUBMITTED


def test_it_rejects_a_ranking_with_a_missing_completion(project, labeler, make_items):
    lease, ids = _leased(project, labeler, make_items)
    with pytest.raises(InvalidRanking, match=rf"leaves out completion\(s\) {ids[3]}"):
        services.ranking_submit(user=labeler, item_id=lease.item_id, groups=[[i] for i in ids[:3]])
    assert not Ranking.objects.exists()


def test_it_rejects_a_ranking_with_a_duplicate_completion(project, labeler, make_items):
    lease, ids = _leased(project, labeler, make_items)
    with pytest.raises(InvalidRanking, match="more than once"):
        services.ranking_submit(
            user=labeler,
            item_id=lease.item_id,
            groups=[[ids[0]], [ids[1], ids[0]], [ids[2]], [ids[3]]],
        )


def test_it_rejects_a_ranking_with_a_foreign_completion(project, labeler, make_items):
    lease, ids = _leased(project, labeler, make_items, n=2)
    other_item = Item.objects.exclude(pk=lease.item_id).get()
    foreign = other_item.item_completions.first().completion_id
    with pytest.raises(
        InvalidRanking,
        match=f"Item {lease.item_id}: ranking\\[4\\] holds {foreign}, which is not one of",
    ):
        services.ranking_submit(
            user=labeler, item_id=lease.item_id, groups=[[i] for i in ids] + [[foreign]]
        )


def test_it_rejects_ties_when_the_project_does_not_allow_them(project, labeler, make_items):
    project.allow_ties = False
    project.save()
    lease, ids = _leased(project, labeler, make_items)
    with pytest.raises(InvalidRanking, match="does not allow ties"):
        services.ranking_submit(
            user=labeler, item_id=lease.item_id, groups=[ids[:2], [ids[2]], [ids[3]]]
        )


def test_it_accepts_ties_when_allowed(project, labeler, make_items):
    lease, ids = _leased(project, labeler, make_items)
    ranking = services.ranking_submit(
        user=labeler, item_id=lease.item_id, groups=[ids[:2], ids[2:]]
    )
    assert ranking.groups == [ids[:2], ids[2:]]


def test_a_double_submit_stores_one_ranking(project, labeler, make_items):
    lease, ids = _leased(project, labeler, make_items)
    first = services.ranking_submit(user=labeler, item_id=lease.item_id, groups=[[i] for i in ids])
    second = services.ranking_submit(
        user=labeler, item_id=lease.item_id, groups=[[i] for i in reversed(ids)]
    )
    assert second.pk == first.pk
    assert Ranking.objects.count() == 1
    assert Item.objects.get(pk=lease.item_id).ranking_count == 1


def test_an_unknown_item_id_gives_a_clear_not_found_error(project, labeler):
    with pytest.raises(
        ItemNotFound, match="Item 987654 does not exist or is not in one of your projects"
    ):
        services.ranking_submit(user=labeler, item_id=987654, groups=[[1], [2]])


def test_an_item_of_a_project_the_user_is_not_in_is_not_found(
    project, labeler, make_user, make_items
):
    outsider = make_user("mallory")
    lease, ids = _leased(project, labeler, make_items)
    with pytest.raises(ItemNotFound):
        services.ranking_submit(user=outsider, item_id=lease.item_id, groups=[[i] for i in ids])


def test_an_item_never_handed_to_the_user_is_refused_as_stale(
    project, labeler, make_user, make_items
):
    other = make_user("carol")
    services.membership_set(project=project, user=other, role=Membership.Role.LABELER)
    lease, ids = _leased(project, labeler, make_items)
    with pytest.raises(NotAssigned, match="was not handed to you"):
        services.ranking_submit(user=other, item_id=lease.item_id, groups=[[i] for i in ids])


def test_a_skipped_item_cannot_be_ranked(project, labeler, make_items):
    lease, ids = _leased(project, labeler, make_items)
    services.item_skip(user=labeler, item_id=lease.item_id)
    with pytest.raises(NotAssigned, match="skipped"):
        services.ranking_submit(user=labeler, item_id=lease.item_id, groups=[[i] for i in ids])


def test_an_expired_lease_is_refused_once_the_item_went_to_someone_else(
    project, labeler, make_user, make_items
):
    other = make_user("carol")
    services.membership_set(project=project, user=other, role=Membership.Role.LABELER)
    lease, ids = _leased(project, labeler, make_items)
    Assignment.objects.filter(pk=lease.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    taken = services.assignment_next(project=project, user=other)
    assert taken.item_id == lease.item_id
    with pytest.raises(LeaseExpired, match="expired"):
        services.ranking_submit(user=labeler, item_id=lease.item_id, groups=[[i] for i in ids])


def test_an_expired_lease_is_still_accepted_while_the_item_has_room(project, labeler, make_items):
    lease, ids = _leased(project, labeler, make_items)
    Assignment.objects.filter(pk=lease.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    ranking = services.ranking_submit(
        user=labeler, item_id=lease.item_id, groups=[[i] for i in ids]
    )
    assert ranking.pk and Item.objects.get(pk=lease.item_id).is_complete


@pytest.mark.parametrize(
    "groups",
    [[], [[]], "1,2", [[True]], [["x"]], [1, 2]],
    ids=["empty", "empty-group", "string", "bool", "not-a-number", "flat-list"],
)
def test_it_rejects_malformed_groups(project, labeler, make_items, groups):
    lease, _ = _leased(project, labeler, make_items)
    with pytest.raises(InvalidRanking):
        services.ranking_submit(user=labeler, item_id=lease.item_id, groups=groups)


def test_a_client_display_order_that_is_not_a_permutation_is_ignored(project, labeler, make_items):
    lease, ids = _leased(project, labeler, make_items)
    ranking = services.ranking_submit(
        user=labeler, item_id=lease.item_id, groups=[[i] for i in ids], display_order=[1, 2, 3]
    )
    assert ranking.display_order == ids


@pytest.mark.parametrize(
    "bad",
    ["missing", "duplicate", "foreign"],
)
def test_the_database_refuses_a_ranking_that_does_not_cover_the_item(
    project, labeler, make_items, bad
):
    from django.db import IntegrityError, transaction

    from rlhf.rankings import EXACTLY_ONCE

    lease, ids = _leased(project, labeler, make_items, n=2)
    other = Item.objects.exclude(pk=lease.item_id).get().item_completions.first().completion_id
    groups = {
        "missing": [[i] for i in ids[:3]],
        "duplicate": [[i] for i in ids] + [[ids[0]]],
        "foreign": [[i] for i in ids[:3]] + [[other]],
    }[bad]
    with pytest.raises(IntegrityError, match=EXACTLY_ONCE), transaction.atomic():
        Ranking.objects.create(item_id=lease.item_id, user=labeler, groups=groups)
    ok = Ranking.objects.create(item_id=lease.item_id, user=labeler, groups=[ids[:2], ids[2:]])
    with pytest.raises(IntegrityError), transaction.atomic():
        Ranking.objects.filter(pk=ok.pk).update(groups=[ids[:2]])


def test_a_superuser_who_is_not_a_member_can_rank(project, make_user, make_items):
    root = make_user("root", is_superuser=True, is_staff=True)
    lease, ids = _leased(project, root, make_items)
    ranking = services.ranking_submit(user=root, item_id=lease.item_id, groups=[[i] for i in ids])
    assert ranking.user == root
