"""Win-rate maths for A-vs-B evaluations, shared by the reward model's verdict (tasks) and
the labelers' (selectors.eval_human_result). Pure functions: no database."""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def verdict(a: float, b: float) -> str:
    """ "a", "b" or "tie" for two scores (or two ranks, lower is better: pass them negated)."""
    return "a" if a > b else "b" if b > a else "tie"


def win_rate(*, wins: int, ties: int, losses: int) -> dict:
    """A's win rate over B, a tie counting one half, with its 95% Wilson score interval (which
    stays inside [0, 1] and is honest for small n, unlike the normal approximation)."""
    n = wins + ties + losses
    if n == 0:
        return {
            "wins": 0,
            "ties": 0,
            "losses": 0,
            "n": 0,
            "win_rate": None,
            "ci_low": None,
            "ci_high": None,
        }
    p = (wins + 0.5 * ties) / n
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return {
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "n": n,
        "win_rate": p,
        "ci_low": max(0.0, centre - half),
        "ci_high": min(1.0, centre + half),
    }


def compare(scores_a: list[float], scores_b: list[float]) -> tuple[dict, list[tuple]]:
    """A's win rate over B from the reward's scores of paired answers: the summary
    (:func:`win_rate` plus each side's mean reward) and the curve points (step, key, value):
    each pair's two rewards and the running win rate after it."""
    verdicts = [verdict(a, b) for a, b in zip(scores_a, scores_b, strict=True)]
    wins, ties, n = verdicts.count("a"), verdicts.count("tie"), len(verdicts)
    points, won = [], 0.0
    for i, (a, b, v) in enumerate(zip(scores_a, scores_b, verdicts, strict=True), start=1):
        won += {"a": 1.0, "tie": 0.5, "b": 0.0}[v]
        points += [(i, "eval/reward_a", a), (i, "eval/reward_b", b), (i, "eval/win_rate", won / i)]
    summary = {
        **win_rate(wins=wins, ties=ties, losses=n - wins - ties),
        "mean_reward_a": sum(scores_a) / n if n else None,
        "mean_reward_b": sum(scores_b) / n if n else None,
    }
    return summary, points
