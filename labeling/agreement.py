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
from math import exp, lgamma, log, log1p, sqrt

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


# --------------------------------------------------------------------------- labeler patterns
#
# The per-labeler report (labeling.selectors.labeler_report) asks two questions of each
# labeler's rankings and answers them with an exact test, no scipy:
#
# - position bias: is the response shown first ranked best more often than chance? With K
#   responses and a best group of t (t > 1 is a tie), a labeler who ignores the order puts the
#   first-shown response in the best group with probability t / K.
# - length preference: of two responses of different lengths ranked apart, is the longer
#   preferred more often than half the time?


def first_shown_is_best(groups: Groups, display_order: list[int]) -> tuple[bool, float] | None:
    """(whether the response shown first is in the best group, the chance of that: t / K);
    None when the order shown is unknown or the ranking ties everything (nothing to learn)."""
    if not display_order or not groups:
        return None
    k = sum(len(g) for g in groups)
    if len(groups[0]) >= k:
        return None
    return display_order[0] in groups[0], len(groups[0]) / k


def longer_preferred(groups: Groups, lengths: dict[int, int]) -> tuple[int, int]:
    """(pairs where the longer response is ranked above the shorter, pairs compared): every
    two responses in different groups whose lengths differ."""
    positions = rank_positions(groups)
    wins = pairs = 0
    for x, y in combinations(sorted(c for c in positions if c in lengths), 2):
        if positions[x] == positions[y] or lengths[x] == lengths[y]:
            continue
        pairs += 1
        better, worse = (x, y) if positions[x] < positions[y] else (y, x)
        wins += lengths[better] > lengths[worse]
    return wins, pairs


def _binomial_pmf(n: int, p: float) -> list[float]:
    """P(X = x) for x = 0..n, X ~ Binomial(n, p), through logarithms (no overflow)."""
    if p <= 0.0 or p >= 1.0:
        return [float(x == (n if p >= 1.0 else 0)) for x in range(n + 1)]
    log_p, log_q = log(p), log1p(-p)
    return [
        exp(lgamma(n + 1) - lgamma(x + 1) - lgamma(n - x + 1) + x * log_p + (n - x) * log_q)
        for x in range(n + 1)
    ]


def _convolve(a: list[float], b: list[float]) -> list[float]:
    out = [0.0] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        if x:
            for j, y in enumerate(b):
                out[i + j] += x * y
    return out


def exact_test_p_value(successes: int, trials: dict[float, int]) -> float | None:
    """Two-sided exact p-value of `successes` among independent trials, `trials` mapping a
    success probability to how many trials had it (one probability: the binomial test). The
    p-value sums the probabilities of every outcome no more likely than the one observed,
    as scipy.stats.binomtest does (with its 1e-7 relative tolerance). None without trials."""
    pmf = [1.0]
    for p, n in sorted(trials.items()):
        if n:
            pmf = _convolve(pmf, _binomial_pmf(n, p))
    if len(pmf) == 1 or not 0 <= successes < len(pmf):
        return None
    observed = pmf[successes] * (1 + 1e-7)
    return min(1.0, sum(q for q in pmf if q <= observed))
