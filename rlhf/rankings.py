"""Ranking maths in plain Python (no torch, no Django): the one home of the rules that the
labeling app, its import and export, and the engine share.

A ranking is a list of groups, best first; a group holds completions tied with each other:
``[[2], [0, 3], [1]]`` says 2 > 0 = 3 > 1. Completions are named by index into a list (the
engine's rows, import files) or by database id (the labeling app); the rules are the same:

- it ranks each of the item's completions exactly once (:func:`ranking_check`);
- it stands for the pairs (better, worse) of completions in different groups, ties giving
  no pair: C(K, 2) pairs for a full order of K (InstructGPT, arXiv:2203.02155, sec. 3.5)
  (:func:`ranking_pairs`);
- an item shows K = 2 to 9 completions (``MIN_K``, ``MAX_K``: one key 1..9 per response on
  the ranking page) (:func:`k_in_range`).

The database (trigger of labeling/migrations/0002) and the ranking page (static/js/rank.js)
keep their own guards of the "exactly once" rule, worded the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MIN_K = 2
MAX_K = 9
EXACTLY_ONCE = "a ranking must rank each completion exactly once"


class RankingError(ValueError):
    """A ranking that breaks a rule; the message is a lower-case clause that callers prefix
    with where the ranking came from ("line 3: ...", "row 2: ...")."""


def k_in_range(k: Any) -> bool:
    """Whether ``k`` completions may make an item (an int from MIN_K to MAX_K)."""
    return isinstance(k, int) and not isinstance(k, bool) and MIN_K <= k <= MAX_K


def _names(values) -> str:
    return ", ".join(str(v) for v in sorted(values))


def ranking_check(
    groups: Any, completions: Sequence[int], *, noun: str = "index"
) -> list[list[int]]:
    """Check that ``groups`` ranks each of ``completions`` (ids or indexes) exactly once and
    return it as lists of ints. ``noun`` ("index" or "id") names what the groups hold in the
    messages. Raises RankingError naming the first problem; ties are allowed here."""
    nouns = "indexes" if noun == "index" else f"{noun}s"
    example = "[[0], [2, 1]]" if noun == "index" else "[[12], [14, 13]]"
    if not isinstance(groups, list | tuple) or not groups:
        raise RankingError(
            f"a ranking must be a non-empty list of groups of completion {nouns}, best first, "
            f"such as {example}"
        )
    members = set(completions)
    out: list[list[int]] = []
    seen: set[int] = set()
    repeated: set[int] = set()
    for g, group in enumerate(groups):
        if not isinstance(group, list | tuple) or not group:
            raise RankingError(
                f"ranking[{g}] must be a non-empty list of completion {nouns}, such as {example}"
            )
        for value in group:
            if isinstance(value, bool) or not isinstance(value, int) or value not in members:
                raise RankingError(
                    f"ranking[{g}] holds {value!r}, which is not one of the completion "
                    f"{nouns} ({_names(members)})"
                )
            (repeated if value in seen else seen).add(value)
        out.append(list(group))
    if repeated:
        raise RankingError(
            f"completion(s) {_names(repeated)} appear more than once: {EXACTLY_ONCE}"
        )
    missing = members - seen
    if missing:
        raise RankingError(
            f"the ranking leaves out completion(s) {_names(missing)}: {EXACTLY_ONCE}"
        )
    return out


def ranking_pairs(groups: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """All (better, worse) pairs of a ranking, best group first; a tie gives no pair.

    ``[[0], [1, 2], [3]]`` -> ``[(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]``.
    """
    pairs: list[tuple[int, int]] = []
    for i, better in enumerate(groups):
        for worse in groups[i + 1 :]:
            pairs.extend((int(b), int(w)) for b in better for w in worse)
    return pairs


def ids_to_indices(groups: Sequence[Sequence[int]], ids: Sequence[int]) -> list[list[int]]:
    """Groups of completion ids -> groups of indexes into ``ids`` (the item's completions in
    position order). RankingError on an id that is not in ``ids``."""
    index = {cid: i for i, cid in enumerate(ids)}
    try:
        return [[index[cid] for cid in group] for group in groups]
    except (KeyError, TypeError):
        ranking_check(groups, ids, noun="id")  # words the problem
        raise


def indices_to_ids(groups: Sequence[Sequence[int]], ids: Sequence[int]) -> list[list[int]]:
    """Groups of indexes into ``ids`` -> groups of those ids; the inverse of ids_to_indices."""
    try:
        return [[ids[i] for i in group] for group in groups]
    except (IndexError, TypeError):
        ranking_check(groups, range(len(ids)))  # words the problem
        raise
