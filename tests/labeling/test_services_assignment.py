"""assignment_next (leases), item_skip and item_flag."""

from datetime import timedelta

import pytest
from django.utils import timezone

from labeling import services
from labeling.models import Assignment, Flag, Item, Membership
from labeling.services import LabelingError, NotAssigned

pytestmark = pytest.mark.django_db


@pytest.fixture
def labelers(project, make_user):
    users = [make_user(f"l{i}") for i in range(3)]
    for u in users:
        services.membership_set(project=project, user=u, role=Membership.Role.LABELER)
    return users


def _rank(user, lease):
    return services.ranking_submit(
        user=user, item_id=lease.item_id, groups=[[c] for c in lease.display_order]
    )


def test_a_live_lease_is_returned_again_instead_of_a_new_one(project, labeler, make_items):
    make_items(project, 3)
    first = services.assignment_next(project=project, user=labeler)
    again = services.assignment_next(project=project, user=labeler)
    assert again.pk == first.pk
    assert Assignment.objects.filter(user=labeler).count() == 1


def test_the_display_order_is_a_permutation_of_the_item_stored_on_the_lease(
    project, labeler, make_items
):
    (item,) = make_items(project, 1)
    lease = services.assignment_next(project=project, user=labeler)
    shown = [ic.completion_id for ic in item.item_completions.all()]
    assert sorted(lease.display_order) == sorted(shown)
    assert Assignment.objects.get(pk=lease.pk).display_order == lease.display_order


def test_display_orders_differ_between_labelers(project, make_user, make_items):
    project.annotations_per_item = 40
    project.save()
    (item,) = make_items(project, 1)
    orders = set()
    for i in range(30):
        user = make_user(f"u{i}")
        services.membership_set(project=project, user=user, role="labeler")
        orders.add(tuple(services.assignment_next(project=project, user=user).display_order))
    assert len(orders) > 1  # 30 draws of 24 permutations all equal: probability 24**-29


def test_an_item_gets_no_more_labelers_than_wanted(project, labelers, make_items):
    project.annotations_per_item = 2
    project.save()
    (item,) = make_items(project, 1)
    a = services.assignment_next(project=project, user=labelers[0])
    b = services.assignment_next(project=project, user=labelers[1])
    assert a.item_id == b.item_id == item.pk
    assert services.assignment_next(project=project, user=labelers[2]) is None


def test_a_submitted_ranking_keeps_its_slot(project, labelers, make_items):
    make_items(project, 1)
    lease = services.assignment_next(project=project, user=labelers[0])
    _rank(labelers[0], lease)
    assert Item.objects.get().is_complete
    assert services.assignment_next(project=project, user=labelers[1]) is None


def test_an_expired_lease_is_reclaimed_for_another_labeler(project, labelers, make_items):
    make_items(project, 1)
    lease = services.assignment_next(project=project, user=labelers[0])
    Assignment.objects.filter(pk=lease.pk).update(expires_at=timezone.now() - timedelta(seconds=5))
    other = services.assignment_next(project=project, user=labelers[1])
    assert other.item_id == lease.item_id
    assert Assignment.objects.get(pk=lease.pk).status == Assignment.Status.EXPIRED


def test_a_labeler_never_gets_the_same_item_twice(project, labeler, make_items):
    project.annotations_per_item = 3
    project.save()
    make_items(project, 2)
    seen = []
    for _ in range(2):
        lease = services.assignment_next(project=project, user=labeler)
        seen.append(lease.item_id)
        _rank(labeler, lease)
    assert len(set(seen)) == 2
    assert services.assignment_next(project=project, user=labeler) is None


def test_a_labeler_whose_lease_expired_does_not_get_that_item_again(project, labeler, make_items):
    project.annotations_per_item = 3
    project.save()
    (item,) = make_items(project, 1)
    lease = services.assignment_next(project=project, user=labeler)
    Assignment.objects.filter(pk=lease.pk).update(expires_at=timezone.now() - timedelta(seconds=5))
    assert services.assignment_next(project=project, user=labeler) is None


def test_exclude_item_id_leases_the_next_item_for_preloading(project, labeler, make_items):
    make_items(project, 3)
    current = services.assignment_next(project=project, user=labeler)
    preloaded = services.assignment_next(
        project=project, user=labeler, exclude_item_id=current.item_id
    )
    assert preloaded.item_id != current.item_id
    # Asking again with the same item on screen gives the same preloaded lease, not a third.
    again = services.assignment_next(project=project, user=labeler, exclude_item_id=current.item_id)
    assert again.pk == preloaded.pk
    assert Assignment.objects.filter(user=labeler, status="active").count() == 2
    # A reload shows the oldest live lease first.
    assert services.assignment_next(project=project, user=labeler).pk == current.pk


def test_imported_items_are_not_handed_out(project, labeler, make_items):
    (item,) = make_items(project, 1)
    Item.objects.filter(pk=item.pk).update(source=Item.Source.IMPORT)
    assert services.assignment_next(project=project, user=labeler) is None


def test_items_of_another_project_are_never_handed_out(project, labeler, admin_user, make_items):
    other = services.project_create(name="Other", created_by=admin_user)
    make_items(other, 2)
    assert services.assignment_next(project=project, user=labeler) is None


def test_skip_frees_the_slot_and_the_user_does_not_see_the_item_again(
    project, labelers, make_items
):
    make_items(project, 1)
    lease = services.assignment_next(project=project, user=labelers[0])
    services.item_skip(user=labelers[0], item_id=lease.item_id)
    assert services.assignment_next(project=project, user=labelers[0]) is None
    assert services.assignment_next(project=project, user=labelers[1]).item_id == lease.item_id


def test_skip_without_a_lease_is_refused(project, labeler, make_items):
    (item,) = make_items(project, 1)
    with pytest.raises(NotAssigned):
        services.item_skip(user=labeler, item_id=item.pk)


def test_flag_stores_the_reason_and_gives_the_item_back(project, labeler, make_items):
    make_items(project, 1)
    lease = services.assignment_next(project=project, user=labeler)
    flag = services.item_flag(user=labeler, item_id=lease.item_id, reason=" responses are empty ")
    assert Flag.objects.get(pk=flag.pk).reason == "responses are empty"
    assert Assignment.objects.get(pk=lease.pk).status == Assignment.Status.SKIPPED


def test_only_items_handed_to_a_labeler_can_be_flagged_by_them(project, labeler, make_items):
    first, second = make_items(project, 2)
    lease = services.assignment_next(project=project, user=labeler)
    other = second if lease.item_id == first.pk else first
    with pytest.raises(NotAssigned, match="was not handed to you"):
        services.item_flag(user=labeler, item_id=other.pk, reason="guessing ids")
    assert not Flag.objects.exists()
    admin = project.memberships.get(role=Membership.Role.ADMIN).user
    assert services.item_flag(user=admin, item_id=other.pk, reason="duplicate prompt").item == other


def test_flagging_an_item_twice_keeps_one_open_flag(project, labeler, make_items):
    make_items(project, 1)
    lease = services.assignment_next(project=project, user=labeler)
    first = services.item_flag(user=labeler, item_id=lease.item_id, reason="empty answers")
    again = services.item_flag(user=labeler, item_id=lease.item_id, reason="empty answers!")
    assert again.pk == first.pk and Flag.objects.count() == 1
    services.flag_resolve(project=project, flag_id=first.pk)
    later = services.item_flag(user=labeler, item_id=lease.item_id, reason="still empty")
    assert later.pk != first.pk and Flag.objects.filter(resolved=False).count() == 1


def test_flag_needs_a_reason(project, labeler, make_items):
    (item,) = make_items(project, 1)
    with pytest.raises(LabelingError, match="Say what is wrong"):
        services.item_flag(user=labeler, item_id=item.pk, reason="   ")
