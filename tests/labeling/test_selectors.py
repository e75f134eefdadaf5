"""Selectors: scoping to the user's projects, progress, labeler stats, agreement, flags, rankings."""

import pytest
from django.http import Http404

from labeling import selectors, services
from labeling.models import Membership, Ranking

pytestmark = pytest.mark.django_db


def _rank_as(user, project, order_of_keys):
    """Lease the next item and rank its display order permuted by `order_of_keys` (0-based)."""
    lease = services.assignment_next(project=project, user=user)
    shown = lease.display_order
    groups = [[shown[i] for i in group] for group in order_of_keys]
    return services.ranking_submit(
        user=user, item_id=lease.item_id, groups=groups, seconds_spent=10
    )


@pytest.fixture
def two_labelers(project, make_user):
    project.annotations_per_item = 2
    project.save()
    a, b = make_user("ann"), make_user("ben")
    for u in (a, b):
        services.membership_set(project=project, user=u, role=Membership.Role.LABELER)
    return a, b


def test_project_list_shows_only_the_users_projects_with_progress(
    project, labeler, admin_user, make_items
):
    other = services.project_create(name="Secret", created_by=admin_user)
    make_items(project, 2)
    lease = services.assignment_next(project=project, user=labeler)
    services.ranking_submit(
        user=labeler, item_id=lease.item_id, groups=[[c] for c in lease.display_order]
    )
    rows = list(selectors.project_list_for_user(user=labeler))
    assert [p.pk for p in rows] == [project.pk]
    assert (rows[0].role, rows[0].total_items, rows[0].complete_items, rows[0].my_done) == (
        "labeler",
        2,
        1,
        1,
    )
    assert other.pk in {p.pk for p in selectors.project_list_for_user(user=admin_user)}


def test_a_superuser_administers_every_project_in_the_list(project, labeler, make_user):
    boss = make_user("root", is_superuser=True)
    services.membership_set(project=project, user=boss, role=Membership.Role.LABELER)
    other = services.project_create(name="Not a member", created_by=labeler)
    roles = {p.pk: p.role for p in selectors.project_list_for_user(user=boss)}
    assert roles == {project.pk: "labeler", other.pk: "admin"}  # a membership says what it is
    assert selectors.project_get_for_user(user=boss, project_id=other.pk).role == "admin"


def test_project_get_for_user_raises_404_for_a_non_member(project, make_user):
    with pytest.raises(Http404):
        selectors.project_get_for_user(user=make_user("eve"), project_id=project.pk)


def test_project_get_for_user_raises_404_for_a_labeler_asking_for_admin(project, labeler):
    assert selectors.project_get_for_user(user=labeler, project_id=project.pk).role == "labeler"
    with pytest.raises(Http404):
        selectors.project_get_for_user(user=labeler, project_id=project.pk, admin=True)


def test_a_superuser_is_admin_of_every_project(project, make_user):
    root = make_user("root", is_superuser=True, is_staff=True)
    assert selectors.project_get_for_user(user=root, project_id=project.pk, admin=True).is_admin


def test_project_progress_counts_complete_items_and_open_flags(project, labeler, make_items):
    make_items(project, 3)
    lease = services.assignment_next(project=project, user=labeler)
    services.ranking_submit(
        user=labeler, item_id=lease.item_id, groups=[[c] for c in lease.display_order]
    )
    lease = services.assignment_next(project=project, user=labeler)
    services.item_flag(user=labeler, item_id=lease.item_id, reason="garbled")
    progress = selectors.project_progress(project=project)
    assert {k: progress[k] for k in ("total", "complete", "remaining", "rankings", "flags")} == {
        "total": 3,
        "complete": 1,
        "remaining": 2,
        "rankings": 1,
        "flags": 1,
    }
    assert progress["percent"] == pytest.approx(33.3)


def test_agreement_and_labeler_stats_on_shared_items(project, two_labelers, make_items):
    a, b = two_labelers
    make_items(project, 2)
    # Item 1: same order for both (6/6 pairs, tau 1). Item 2: b swaps the top two (5/6, tau 2/3).
    # Both labelers see the same item first (FIFO) but in different random display orders, so
    # rank by completion id rather than by screen position.
    for user, swap in ((a, False), (b, False), (a, False), (b, True)):
        lease = services.assignment_next(project=project, user=user)
        ids = sorted(lease.display_order)
        if swap:
            ids[0], ids[1] = ids[1], ids[0]
        services.ranking_submit(
            user=user,
            item_id=lease.item_id,
            groups=[[c] for c in ids],
            seconds_spent=4 if user == a else 8,
        )
    agreement = selectors.project_agreement(project=project)
    assert agreement["shared_items"] == 2 and agreement["comparisons"] == 2
    assert agreement["pairwise_agreement"] == pytest.approx(11 / 12)
    assert agreement["mean_kendall_tau"] == pytest.approx((1 + 2 / 3) / 2)
    stats = {row["username"]: row for row in selectors.labeler_stats(project=project)}
    assert stats["ann"]["count"] == stats["ben"]["count"] == 2
    assert stats["ann"]["median_seconds"] == 4 and stats["ben"]["median_seconds"] == 8
    assert stats["ann"]["agreement"] == pytest.approx(11 / 12)
    assert stats["ben"]["mean_kendall_tau"] == pytest.approx(5 / 6)


def test_agreement_is_none_without_shared_items(project, labeler, make_items):
    make_items(project, 1)
    _rank_as(labeler, project, [[0], [1], [2], [3]])
    assert selectors.project_agreement(project=project) == {
        "shared_items": 0,
        "comparisons": 0,
        "pairwise_agreement": None,
        "mean_kendall_tau": None,
    }
    (row,) = selectors.labeler_stats(project=project)
    assert row["agreement"] is None and row["count"] == 1


def test_flagged_items_lists_open_flags_of_this_project_only(
    project, labeler, admin_user, make_items
):
    make_items(project, 2)
    lease = services.assignment_next(project=project, user=labeler)
    flag = services.item_flag(user=labeler, item_id=lease.item_id, reason="offensive")
    other = services.project_create(name="Other", created_by=admin_user)
    (other_item,) = make_items(other, 1)
    services.item_flag(user=admin_user, item_id=other_item.pk, reason="elsewhere")
    assert [f.pk for f in selectors.flagged_items(project=project)] == [flag.pk]
    services.flag_resolve(project=project, flag_id=flag.pk)
    assert list(selectors.flagged_items(project=project)) == []


def test_rankings_for_project_returns_this_projects_rankings_in_order(
    project, labeler, admin_user, make_items
):
    make_items(project, 2)
    r1 = _rank_as(labeler, project, [[0], [1], [2], [3]])
    r2 = _rank_as(labeler, project, [[3, 2], [1], [0]])
    other = services.project_create(name="Other", created_by=admin_user)
    make_items(other, 1)
    _rank_as(admin_user, other, [[0], [1], [2], [3]])
    rows = list(selectors.rankings_for_project(project=project))
    assert [r.pk for r in rows] == [r1.pk, r2.pk]
    assert rows[0].item.prompt.text.startswith("Prompt") and rows[0].user == labeler
    texts = selectors.item_completion_texts(item_ids=[r.item_id for r in rows])
    assert set(texts[r1.item_id]) == {c for g in r1.groups for c in g}
    assert Ranking.objects.count() == 3


def test_assignment_view_gives_the_prompt_and_completions_in_the_labelers_order(
    project, labeler, make_items
):
    turns = [
        {"role": "user", "content": "Hi **there**"},
        {"role": "assistant", "content": "Yo"},
        {"role": "user", "content": "And?"},
    ]
    prompt = services.prompt_create(project=project, text="", messages=turns)
    completions = [
        services.completion_create(prompt=prompt, text=f"reply {i}") for i in range(project.k)
    ]
    (item,) = services.items_create_for_prompt(project=project, prompt=prompt)
    lease = services.assignment_next(project=project, user=labeler)
    view = selectors.assignment_view(assignment=lease)
    assert view["item"].pk == item.pk and view["item"].project_id == project.pk
    assert view["prompt"].pk == prompt.pk and view["item"].prompt.pk == prompt.pk
    assert view["prompt"].messages == turns  # a list again, not JSON text
    assert view["prompt"].text == prompt.text
    assert view["conversation"] == {"system": None, "earlier": [], "latest": turns}
    assert view["display_order"] == lease.display_order
    by_id = {c.pk: c.text for c in completions}
    assert [c.text for c in view["completions"]] == [by_id[i] for i in lease.display_order]


def turns(n: int) -> list[dict]:
    return [{"role": ("user", "assistant")[i % 2], "content": f"turn {i}"} for i in range(n)]


def test_a_long_conversation_folds_all_but_its_last_two_turns_and_its_system_turn():
    system = {"role": "system", "content": "Be brief."}
    assert selectors.conversation_view(messages=None) is None
    assert selectors.conversation_view(messages=[system, *turns(3)]) == {
        "system": system,
        "earlier": [],
        "latest": turns(3),
    }
    long = turns(7)
    assert selectors.conversation_view(messages=[system, *long]) == {
        "system": system,
        "earlier": long[:5],
        "latest": long[5:],  # the last assistant reply and the latest user turn
    }
    assert selectors.conversation_view(messages=long)["system"] is None


def test_project_get_for_user_sets_the_role_and_hides_other_projects(
    project, labeler, admin_user, make_user
):
    mine = selectors.project_get_for_user(user=labeler, project_id=project.pk)
    assert (mine.role, mine.is_admin) == ("labeler", False)
    owner = selectors.project_get_for_user(user=admin_user, project_id=project.pk, admin=True)
    assert (owner.role, owner.is_admin) == ("admin", True)
    with pytest.raises(Http404):
        selectors.project_get_for_user(user=labeler, project_id=project.pk, admin=True)
    with pytest.raises(Http404):
        selectors.project_get_for_user(user=make_user("stranger"), project_id=project.pk)
    root = make_user("root", is_superuser=True)
    assert selectors.project_get_for_user(user=root, project_id=project.pk).is_admin
