"""The labeling hot path stays cheap: upper bounds on the SQL statements of handing out an
item and storing a ranking (counted with CaptureQueriesContext; savepoints count, as the
tests run inside a transaction where a real request sends BEGIN/COMMIT instead). A new query
in these paths shows up here; if it is really needed, raise the bound on purpose."""

import json
import threading
from datetime import timedelta

import pytest
from django.db import connection, connections
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from labeling import services
from labeling.auth import api_token_create
from labeling.models import Assignment, Item, Ranking

pytestmark = pytest.mark.django_db

# own-lease lookup; SAVEPOINT; find and lock a candidate; recount + completion ids; INSERT;
# RELEASE
NEXT_NEW_LEASE = 6
# SAVEPOINT; lock the item and read the lease; compare-and-set the lease; INSERT ranking;
# UPDATE the item's counter; RELEASE
SUBMIT = 6
# the token's user; the project with the caller's role; then the service; then the item's
# completions with its prompt
API_NEXT = 2 + NEXT_NEW_LEASE + 1
API_SUBMIT = 1 + SUBMIT


def _count(fn):
    with CaptureQueriesContext(connection) as queries:
        result = fn()
    return result, len(queries), [q["sql"] for q in queries.captured_queries]


def test_leasing_a_new_item_takes_at_most_six_statements(project, labeler, make_items):
    make_items(project, 30)
    lease, n, sql = _count(lambda: services.assignment_next(project=project, user=labeler))
    assert lease is not None
    assert n <= NEXT_NEW_LEASE, sql


def test_a_lease_the_user_holds_comes_back_in_one_statement(project, labeler, make_items):
    make_items(project, 3)
    first = services.assignment_next(project=project, user=labeler)
    again, n, sql = _count(lambda: services.assignment_next(project=project, user=labeler))
    assert again.pk == first.pk
    assert n == 1, sql


def test_the_statement_count_does_not_grow_with_the_queue(project, labeler, make_user, make_items):
    project.annotations_per_item = 2
    project.save()
    make_items(project, 40)
    other = make_user("other-labeler")
    services.membership_set(project=project, user=other, role="labeler")
    for _ in range(15):  # a history of leases and rankings in front of the next free item
        for user in (labeler, other):
            lease = services.assignment_next(project=project, user=user)
            services.ranking_submit(
                user=user, item_id=lease.item_id, groups=[[c] for c in lease.display_order]
            )
    lease, n, sql = _count(lambda: services.assignment_next(project=project, user=labeler))
    assert lease is not None and n <= NEXT_NEW_LEASE, sql


def test_an_expired_lease_costs_one_more_statement_to_reclaim(
    project, labeler, make_user, make_items
):
    make_items(project, 1)
    old = services.assignment_next(project=project, user=labeler)
    Assignment.objects.filter(pk=old.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    other = make_user("next-labeler")
    services.membership_set(project=project, user=other, role="labeler")
    lease, n, sql = _count(lambda: services.assignment_next(project=project, user=other))
    assert lease.item_id == old.item_id
    assert n <= NEXT_NEW_LEASE + 1, sql
    assert Assignment.objects.get(pk=old.pk).status == Assignment.Status.EXPIRED


def test_submitting_a_ranking_takes_at_most_six_statements(project, labeler, make_items):
    make_items(project, 2)
    lease = services.assignment_next(project=project, user=labeler)
    groups = [[c] for c in lease.display_order]
    ranking, n, sql = _count(
        lambda: services.ranking_submit(user=labeler, item_id=lease.item_id, groups=groups)
    )
    assert ranking.pk
    assert n <= SUBMIT, sql
    again, n, sql = _count(
        lambda: services.ranking_submit(user=labeler, item_id=lease.item_id, groups=groups)
    )
    assert again.pk == ranking.pk
    assert n <= SUBMIT, sql


def test_the_api_cycle_stays_within_its_statement_budget(project, labeler, make_items):
    make_items(project, 5)
    client = Client(headers={"Authorization": f"Bearer {api_token_create(user=labeler)}"})
    client.get("/api/projects")  # the token's once-a-minute last_used_at write happens here

    def post(path, body):
        return client.post(path, json.dumps(body), content_type="application/json")

    response, n, sql = _count(lambda: post(f"/api/projects/{project.pk}/next", {}))
    assert response.status_code == 200
    assert n <= API_NEXT, sql
    item = response.json()["item"]
    assert [c["id"] for c in item["completions"]] == item["display_order"]
    body = {"groups": [[c] for c in item["display_order"]]}
    response, n, sql = _count(lambda: post(f"/api/items/{item['id']}/ranking", body))
    assert response.status_code == 200
    assert n <= API_SUBMIT, sql
    assert Ranking.objects.get().groups == body["groups"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(
    connection.vendor != "postgresql", reason="concurrent transactions need PostgreSQL"
)
def test_two_concurrent_submits_of_one_item_store_one_ranking(project, labeler, make_items):
    make_items(project, 1)
    lease = services.assignment_next(project=project, user=labeler)
    groups = [[c] for c in lease.display_order]
    barrier = threading.Barrier(4)
    results, errors = [], []

    def submit():
        try:
            barrier.wait(timeout=30)
            results.append(
                services.ranking_submit(user=labeler, item_id=lease.item_id, groups=groups).pk
            )
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert len(results) == 4 and len(set(results)) == 1
    assert Ranking.objects.count() == 1
    item = Item.objects.get()
    assert (item.ranking_count, item.is_complete) == (1, True)


def test_showing_a_long_conversation_costs_the_one_statement_a_plain_prompt_does(
    project, labeler, make_items
):
    from django.template.loader import render_to_string

    from labeling import selectors

    make_items(project, 1)
    turns = [{"role": ("user", "assistant")[i % 2], "content": f"turn {i}"} for i in range(9)]
    prompt = services.prompt_create(project=project, text="", messages=turns)
    for i in range(project.k):
        services.completion_create(prompt=prompt, text=f"reply {i}")
    services.items_create_for_prompt(project=project, prompt=prompt)

    def show(lease):
        view = selectors.assignment_view(assignment=lease)
        return render_to_string("labeling/_item.html", {"project": project, **view})

    counts = []
    for _ in range(2):
        lease = services.assignment_next(project=project, user=labeler)
        html, n, sql = _count(lambda lease=lease: show(lease))
        counts.append(n)
        services.item_skip(user=labeler, item_id=lease.item_id)
    assert "Show 7 earlier turns" in html  # the second item is the conversation
    assert counts == [1, 1], sql
