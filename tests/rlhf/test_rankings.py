"""rlhf.rankings: the torch-free ranking maths shared by the web apps and the engine."""

import math
import subprocess
import sys

import pytest

from rlhf.rankings import (
    EXACTLY_ONCE,
    MAX_K,
    MIN_K,
    RankingError,
    ids_to_indices,
    indices_to_ids,
    k_in_range,
    ranking_check,
    ranking_pairs,
)


def test_importing_the_module_does_not_import_torch_or_django():
    code = (
        "import sys, rlhf.rankings; "
        "print(sorted(m for m in ('torch', 'django') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_ranking_pairs_expand_groups_best_first_and_skip_ties():
    assert ranking_pairs([[0], [1, 2], [3]]) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    assert ranking_pairs([[0, 1, 2]]) == []
    for k in range(MIN_K, MAX_K + 1):
        assert len(ranking_pairs([[i] for i in range(k)])) == math.comb(k, 2)


def test_it_accepts_a_ranking_that_covers_each_completion_once_ties_included():
    assert ranking_check([[2], (0, 3), [1]], range(4)) == [[2], [0, 3], [1]]
    assert ranking_check([[12, 13]], [12, 13], noun="id") == [[12, 13]]


@pytest.mark.parametrize(
    ("groups", "words"),
    [
        ([], "must be a non-empty list of groups of completion indexes"),
        ("[[0], [1]]", "must be a non-empty list of groups"),
        ([[0], []], "ranking[1] must be a non-empty list"),
        ([[0], 1], "ranking[1] must be a non-empty list"),
        ([[0], [5]], "ranking[1] holds 5, which is not one of the completion indexes (0, 1)"),
        ([[0], [True]], "ranking[1] holds True"),
        ([[0], ["1"]], "ranking[1] holds '1'"),
        ([[0], [0, 1]], f"completion(s) 0 appear more than once: {EXACTLY_ONCE}"),
        ([[1]], f"the ranking leaves out completion(s) 0: {EXACTLY_ONCE}"),
    ],
)
def test_it_rejects_a_ranking_that_does_not_cover_each_completion_exactly_once(groups, words):
    with pytest.raises(RankingError) as err:
        ranking_check(groups, range(2))
    assert words in str(err.value)


def test_messages_about_ids_say_ids():
    with pytest.raises(RankingError, match=r"holds 99, which is not one of the completion ids"):
        ranking_check([[12], [99]], [12, 13], noun="id")


def test_ids_and_indices_convert_both_ways():
    ids = [40, 41, 42]
    assert ids_to_indices([[42], [40, 41]], ids) == [[2], [0, 1]]
    assert indices_to_ids([[2], [0, 1]], ids) == [[42], [40, 41]]
    with pytest.raises(RankingError, match="holds 7"):
        ids_to_indices([[7], [40, 41, 42]], ids)
    with pytest.raises(RankingError, match="holds 3"):
        indices_to_ids([[3], [0, 1, 2]], ids)


def test_k_runs_from_2_to_9():
    assert (MIN_K, MAX_K) == (2, 9)
    assert [k for k in range(12) if k_in_range(k)] == list(range(2, 10))
    assert not k_in_range(True) and not k_in_range(2.0)
