"""Agreement between two rankings of the same completions (pure functions, no Django).

A ranking is a list of groups, best first; a group holding several ids is a tie:
``[[7], [3, 9], [4]]`` means 7 > 3 = 9 > 4.

- Pairwise agreement: over every pair of completions both rankings cover, the share of
  pairs on which they give the same relation (a > b, a < b, or a tie).
- Kendall's tau-b (Kendall 1945, "The treatment of ties in ranking problems"):
  (C - D) / sqrt((n0 - n1) * (n0 - n2)), with C and D the concordant and discordant
  pairs, n0 the number of pairs, n1 and n2 the pairs tied in the first and the second
  ranking. It is 1 for identical orders, -1 for reversed ones, and undefined (None) when
  one ranking ties everything.
"""

from __future__ import annotations

from itertools import combinations
from math import sqrt

Groups = list[list[int]]


def rank_positions(groups: Groups) -> dict[int, int]:
    """{completion id: index of its group} (0 = best)."""
    return {cid: rank for rank, group in enumerate(groups) for cid in group}


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def pair_counts(a: Groups, b: Groups) -> dict[str, int]:
    """Counts over the pairs of completions ranked by both `a` and `b`:
    pairs, same (same relation, ties included), concordant, discordant, tied_a, tied_b."""
    ra, rb = rank_positions(a), rank_positions(b)
    shared = sorted(set(ra) & set(rb))
    counts = dict(pairs=0, same=0, concordant=0, discordant=0, tied_a=0, tied_b=0)
    for x, y in combinations(shared, 2):
        sa, sb = _sign(ra[x] - ra[y]), _sign(rb[x] - rb[y])
        counts["pairs"] += 1
        counts["same"] += sa == sb
        counts["tied_a"] += sa == 0
        counts["tied_b"] += sb == 0
        if sa and sb:
            counts["concordant" if sa == sb else "discordant"] += 1
    return counts


def pairwise_agreement(a: Groups, b: Groups) -> tuple[int, int]:
    """(pairs with the same relation, pairs compared)."""
    c = pair_counts(a, b)
    return c["same"], c["pairs"]


def kendall_tau_b(a: Groups, b: Groups) -> float | None:
    c = pair_counts(a, b)
    denominator = sqrt((c["pairs"] - c["tied_a"]) * (c["pairs"] - c["tied_b"]))
    if denominator == 0:
        return None
    return (c["concordant"] - c["discordant"]) / denominator
