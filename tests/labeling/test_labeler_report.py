"""The per-labeler report (labeling.selectors.labeler_report, GET /api/projects/{id}/labelers
and the dashboard): rankings made with known patterns give known numbers and flags.

The items: K = 3 responses of 10, 20 and 30 characters (positions 0, 1, 2). Item i's quality
order is the (i mod 6)-th permutation of the positions, and the labeler sees the positions
rotated by (i div 6) mod 3. Over 36 items every (quality order, rotation) pair occurs twice,
so quality is independent of length and of the order shown: an honest labeler puts the
first-shown response first in exactly 12 of 36 rankings (chance 1/3) and prefers the longer
response in exactly 54 of 108 pairs."""

from itertools import permutations

import pytest
from django.test import Client

from labeling import selectors, services
from labeling.agreement import exact_test_p_value, first_shown_is_best, longer_preferred
from labeling.auth import api_token_create
from labeling.models import Membership

pytestmark = pytest.mark.django_db

QUALITY = list(permutations(range(3)))  # positions, best first


def _honest(i, ids, shown):
    return [[ids[p]] for p in QUALITY[i % 6]]


def _positional(i, ids, shown):  # the response shown first is always best
    return [[shown[0]]] + [g for g in _honest(i, ids, shown) if g[0] != shown[0]]


def _longest(i, ids, shown):  # the longest first, whatever it says
    return [[ids[2]], [ids[1]], [ids[0]]]


def _contrarian(i, ids, shown):
    return _honest(i, ids, shown)[::-1]


class _Study:
    """rank(name, pattern, seconds=None, limit=None): a new labeler ranks the items (the first
    `limit` of them) with `pattern`."""

    def __init__(self, project, make_user, items):
        self.project, self._make_user = project, make_user
        self._index = {item.pk: i for i, item in enumerate(items)}

    def __call__(self, name, pattern, seconds=None, limit=None):
        user = self._make_user(name)
        services.membership_set(project=self.project, user=user, role=Membership.Role.LABELER)
        done = 0
        while limit is None or done < limit:
            lease = services.assignment_next(project=self.project, user=user)
            if lease is None:
                break
            i = self._index[lease.item_id]
            ids = sorted(lease.display_order)  # completion ids in position order
            r = (i // 6) % 3
            shown = ids[r:] + ids[:r]
            services.ranking_submit(
                user=user,
                item_id=lease.item_id,
                groups=pattern(i, ids, shown),
                display_order=shown,
                seconds_spent=seconds(i) if seconds else None,
            )
            done += 1
        return user


@pytest.fixture
def study(project, make_user, make_items):
    project.k = 3
    project.annotations_per_item = 4
    project.save()
    items = make_items(project, 36, k=3, texts=["a" * 10, "b" * 20, "c" * 30])
    return _Study(project, make_user, items)


def _by_name(report):
    return {row["username"]: row for row in report}


# --------------------------------------------------------------------------- the maths


def test_the_first_shown_chance_is_the_best_groups_share_of_the_responses():
    assert first_shown_is_best([[1], [2], [3]], [1, 2, 3]) == (True, pytest.approx(1 / 3))
    assert first_shown_is_best([[2, 3], [1]], [1, 2, 3]) == (False, pytest.approx(2 / 3))
    assert first_shown_is_best([[1, 2, 3]], [1, 2, 3]) is None  # all tied: nothing to learn
    assert first_shown_is_best([[1], [2]], []) is None  # the order shown is unknown


def test_length_preference_skips_tied_ranks_and_equal_lengths():
    lengths = {1: 30, 2: 20, 3: 20, 4: 10}
    # 1 > 2 = 3 > 4: pairs ranked apart with different lengths: (1,2) (1,3) (1,4) (2,4) (3,4)
    assert longer_preferred([[1], [2, 3], [4]], lengths) == (5, 5)
    assert longer_preferred([[4], [3], [2], [1]], lengths) == (0, 5)  # (2, 3): equal lengths


def test_the_exact_test_matches_the_binomial_test():
    # P(X = 36) for X ~ Bin(36, 1/3); nothing else is as unlikely (P(X = 0) = (2/3)^36).
    assert exact_test_p_value(36, {1 / 3: 36}) == pytest.approx((1 / 3) ** 36, rel=1e-9)
    assert exact_test_p_value(12, {1 / 3: 36}) == pytest.approx(1.0)
    # 3 of 10 at p = 1/4: scipy.stats.binomtest(3, 10, 0.25).pvalue
    assert exact_test_p_value(3, {0.25: 10}) == pytest.approx(0.7184324264526367, rel=1e-12)
    assert exact_test_p_value(0, {0.5: 5}) == pytest.approx(1 / 16)
    assert exact_test_p_value(0, {}) is None


def test_the_exact_test_takes_trials_of_different_chances():
    # one trial at 1/2 and one at 1/4: P(0) = 3/8, P(1) = 1/2, P(2) = 1/8
    assert exact_test_p_value(2, {0.5: 1, 0.25: 1}) == pytest.approx(1 / 8)
    assert exact_test_p_value(0, {0.5: 1, 0.25: 1}) == pytest.approx(1 / 2)


# --------------------------------------------------------------------------- the report


def test_the_report_finds_the_positional_and_the_length_labelers_and_not_the_honest(study):
    study("honest", _honest, seconds=lambda i: 10 + i % 3)
    study("honest2", _honest)
    study("positional", _positional)
    study("longest", _longest)
    report = _by_name(selectors.labeler_report(project=study.project))

    honest = report["honest"]
    assert honest["rankings"] == 36 and honest["median_seconds"] == 11
    assert honest["position_bias"] == {
        "rankings": 36,
        "first_ranked_best": 12,
        "rate": pytest.approx(1 / 3),
        "chance": pytest.approx(1 / 3),
        "p_value": pytest.approx(1.0),
    }
    assert honest["length_preference"] == {
        "pairs": 108,
        "longer_preferred": 54,
        "rate": 0.5,
        "p_value": pytest.approx(1.0),
    }
    peers = {o["username"]: o for o in honest["labelers"]}
    assert peers["honest2"] | {"user_id": 0} == {
        "user_id": 0,
        "username": "honest2",
        "items": 36,
        "agreement": 1.0,
        "kendall_tau": pytest.approx(1.0),
    }
    assert peers["longest"]["agreement"] == 0.5  # length says nothing of quality
    # the first-shown response moves up past the q better ones: 0, 1, 2 flips, 12 items each
    assert peers["positional"]["agreement"] == pytest.approx(72 / 108)
    assert honest["flagged"] is False and honest["reasons"] == []
    assert report["honest2"]["flagged"] is False

    positional = report["positional"]
    assert positional["position_bias"]["first_ranked_best"] == 36
    assert positional["position_bias"]["rate"] == 1.0
    assert positional["position_bias"]["p_value"] == pytest.approx((1 / 3) ** 36, rel=1e-9)
    # shown first: the longest in 12 items (30 of 36 pairs go to the longer), the middle one
    # (18 of 36), the shortest (6 of 36): an even split overall
    assert positional["length_preference"]["longer_preferred"] == 54
    assert positional["reasons"] == [
        "Ranks the response shown first as the best in 36 of 36 rankings (100%), where chance "
        "is 33% (p = 6.7e-18): the order is random, so this looks like ranking by position, "
        "not by reading."
    ]

    longest = report["longest"]
    assert longest["position_bias"]["first_ranked_best"] == 12
    assert longest["length_preference"] == {
        "pairs": 108,
        "longer_preferred": 108,
        "rate": 1.0,
        "p_value": pytest.approx(2 * 0.5**108, rel=1e-9),
    }
    # the others: 54 + 54 + 54 of 324 pairs; and ranking by length agrees with the others'
    # consensus on 48 of 108 pairs where the other three agree with theirs on 74% (median)
    assert longest["consensus"]["agreement"] == pytest.approx(48 / 108)
    assert [o["consensus"]["agreement"] for o in (honest, report["honest2"], positional)] == [
        pytest.approx(80 / 108),
        pytest.approx(80 / 108),
        pytest.approx(64 / 108),
    ]
    assert longest["reasons"] == [
        "Prefers the longer response in 108 of 108 pairs ranked apart (p = 6.2e-33 against an "
        "even split), where the other labelers prefer the longer in 50%.",
        "Agrees with the other labelers' consensus on 44% of response pairs over 36 shared "
        "items, where the others' median is 74%.",
    ]
    assert [r["username"] for r in selectors.labeler_report(project=study.project)] == [
        "honest",
        "honest2",
        "longest",
        "positional",
        "bob-labeler",  # a labeler of the project who has not ranked yet is listed too
    ]


def test_a_labeler_far_from_the_others_consensus_is_flagged(study):
    for name in ("h1", "h2", "h3"):
        study(name, _honest, limit=12)
    study("contrarian", _contrarian, limit=12)
    report = _by_name(selectors.labeler_report(project=study.project))
    # the other three always agree: Borda gives the honest order, the exact reverse
    assert report["contrarian"]["consensus"] == {
        "items": 12,
        "agreement": 0.0,
        "kendall_tau": pytest.approx(-1.0),
    }
    # an honest labeler's consensus: two honest rankings and the reverse still give honest
    assert report["h1"]["consensus"]["agreement"] == 1.0
    assert report["contrarian"]["reasons"] == [
        "Agrees with the other labelers' consensus on 0% of response pairs over 12 shared "
        "items, where the others' median is 100%."
    ]
    assert [r["username"] for r in report.values() if r["flagged"]] == ["contrarian"]


def test_a_pattern_needs_enough_rankings_to_be_flagged(study):
    study("positional", _positional, limit=6)
    row = selectors.labeler_report(project=study.project)[0]
    assert row["position_bias"]["first_ranked_best"] == 6
    assert row["position_bias"]["p_value"] < 0.01  # (1/3)^6, but only 6 rankings
    assert row["flagged"] is False


def test_skips_and_flags_are_counted_apart(project, labeler, make_items):
    make_items(project, 4)
    for _ in range(2):
        lease = services.assignment_next(project=project, user=labeler)
        services.item_skip(user=labeler, item_id=lease.item_id)
    lease = services.assignment_next(project=project, user=labeler)
    services.item_flag(user=labeler, item_id=lease.item_id, reason="broken")
    (row,) = selectors.labeler_report(project=project)
    assert (row["username"], row["rankings"], row["skips"], row["flags"]) == (
        "bob-labeler",
        0,
        2,
        1,
    )
    assert row["position_bias"]["rate"] is None and row["consensus"]["agreement"] is None


# --------------------------------------------------------------------------- API and page


def test_the_api_gives_the_report_to_project_admins_only(
    project, admin_user, labeler, outsider, make_items
):
    make_items(project, 1)
    lease = services.assignment_next(project=project, user=labeler)
    services.ranking_submit(
        user=labeler, item_id=lease.item_id, groups=[[c] for c in lease.display_order]
    )
    url = f"/api/projects/{project.pk}/labelers"
    for user, status in ((admin_user, 200), (labeler, 404), (outsider, 404)):
        client = Client(headers={"Authorization": f"Bearer {api_token_create(user=user)}"})
        response = client.get(url)
        assert response.status_code == status, user
    (row,) = response_rows = (
        Client(headers={"Authorization": f"Bearer {api_token_create(user=admin_user)}"})
        .get(url)
        .json()
    )
    assert len(response_rows) == 1
    assert row["username"] == "bob-labeler" and row["rankings"] == 1
    assert row["position_bias"]["first_ranked_best"] == 1
    assert row["flagged"] is False and row["reasons"] == []
    assert Client().get(url).status_code == 401


def test_the_dashboard_shows_the_report_with_the_reasons(study, admin_client):
    study("honest", _honest)
    study("positional", _positional)
    response = admin_client.get(f"/projects/{study.project.pk}/")
    html = response.content.decode()
    assert 'id="labeler-report"' in html
    assert "looks like ranking by position" in html
    assert html.count("flagged-labeler") == 1
