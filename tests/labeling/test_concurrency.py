"""20 labelers at once on PostgreSQL: no item gets more labelers than wanted, nobody gets an
item twice, every submit is stored exactly once."""

import threading
from collections import Counter

import pytest
from django.db import connection, connections

from labeling import services
from labeling.models import Assignment, Item, Membership, Ranking

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        connection.vendor != "postgresql", reason="SELECT ... SKIP LOCKED races need PostgreSQL"
    ),
]

THREADS = 20


def _run_threads(target, users):
    barrier = threading.Barrier(len(users))
    errors = []

    def run(user):
        try:
            barrier.wait(timeout=30)
            target(user)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))
        finally:
            connections.close_all()  # each thread had its own connection

    threads = [threading.Thread(target=run, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    return errors


@pytest.fixture
def crowd(project, make_user):
    users = [make_user(f"crowd{i}") for i in range(THREADS)]
    for u in users:
        services.membership_set(project=project, user=u, role=Membership.Role.LABELER)
    return users


def test_twenty_labelers_leasing_at_once_never_over_assign_an_item(project, crowd, make_items):
    project.annotations_per_item = 2
    project.save()
    make_items(project, 5)  # 10 slots for 20 labelers
    leases = []

    def lease(user):
        leases.append(services.assignment_next(project=project, user=user))

    assert _run_threads(lease, crowd) == []
    granted = [a for a in leases if a is not None]
    assert len(granted) == 10
    per_item = Counter(a.item_id for a in granted)
    assert set(per_item.values()) == {2}
    assert Assignment.objects.count() == 10


def test_twenty_labelers_ranking_until_the_queue_is_empty(project, crowd, make_items):
    project.annotations_per_item = 3
    project.save()
    make_items(project, 12)  # 36 rankings wanted
    submitted = Counter()

    def label(user):
        while True:
            lease = services.assignment_next(project=project, user=user)
            if lease is None:
                return
            ranking = services.ranking_submit(
                user=user, item_id=lease.item_id, groups=[[c] for c in lease.display_order]
            )
            # and a double submit, as a double click would send it
            again = services.ranking_submit(
                user=user, item_id=lease.item_id, groups=[[c] for c in lease.display_order]
            )
            assert again.pk == ranking.pk
            submitted[user.pk] += 1

    assert _run_threads(label, crowd) == []
    assert Ranking.objects.count() == sum(submitted.values()) == 36
    pairs = list(Assignment.objects.values_list("item_id", "user_id"))
    assert len(pairs) == len(set(pairs))  # nobody got an item twice
    for item in Item.objects.all():
        assert item.rankings.count() == item.ranking_count == 3
        assert item.is_complete
        assert item.assignments.count() == 3
