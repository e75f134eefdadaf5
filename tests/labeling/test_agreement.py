"""Pairwise agreement and Kendall's tau-b, checked against numbers computed by hand."""

import pytest

from labeling.agreement import kendall_tau_b, pair_counts, pairwise_agreement, rank_positions


def test_rank_positions_give_tied_ids_the_same_rank():
    assert rank_positions([[7], [3, 9], [4]]) == {7: 0, 3: 1, 9: 1, 4: 2}


def test_identical_rankings_agree_fully_with_tau_one():
    a = [[1], [2], [3], [4]]
    assert pairwise_agreement(a, a) == (6, 6)
    assert kendall_tau_b(a, a) == pytest.approx(1.0)


def test_reversed_rankings_disagree_fully_with_tau_minus_one():
    a = [[1], [2], [3], [4]]
    b = [[4], [3], [2], [1]]
    assert pairwise_agreement(a, b) == (0, 6)
    assert kendall_tau_b(a, b) == pytest.approx(-1.0)


def test_one_swapped_neighbour_pair_gives_five_of_six_and_tau_two_thirds():
    # 6 pairs, only (1, 2) flips: C = 5, D = 1, tau = (5 - 1) / 6.
    a = [[1], [2], [3], [4]]
    b = [[2], [1], [3], [4]]
    assert pairwise_agreement(a, b) == (5, 6)
    assert kendall_tau_b(a, b) == pytest.approx(4 / 6)


def test_tau_b_corrects_for_ties():
    # a ties 1 and 2; b orders them. Pairs: (1,2) tied in a only, (1,3) and (2,3) concordant.
    # tau_b = (2 - 0) / sqrt((3 - 1) * (3 - 0)) = 2 / sqrt(6) = 0.8165; agreement 2 of 3.
    a = [[1, 2], [3]]
    b = [[1], [2], [3]]
    assert pair_counts(a, b) == dict(
        pairs=3, same=2, concordant=2, discordant=0, tied_a=1, tied_b=0
    )
    assert kendall_tau_b(a, b) == pytest.approx(2 / 6**0.5)
    assert pairwise_agreement(a, b) == (2, 3)


def test_two_identical_ties_count_as_agreement():
    a = [[1, 2], [3]]
    assert pairwise_agreement(a, a) == (3, 3)
    assert kendall_tau_b(a, a) == pytest.approx(1.0)


def test_tau_is_undefined_when_one_ranking_ties_everything():
    assert kendall_tau_b([[1, 2, 3]], [[1], [2], [3]]) is None


def test_only_completions_ranked_by_both_are_compared():
    assert pairwise_agreement([[1], [2], [3]], [[2], [1], [9]]) == (0, 1)
