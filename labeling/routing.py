"""Disagreement routing: the reward model's scores per item, set against the labelers.

A reward model trained on the labelers' rankings is most useful where it is unsure or wrong,
and those are the items worth a second and third opinion (uncertainty sampling and
query-by-disagreement in active learning). Each scored item keeps one ItemScore row:

- `scores`: the reward per completion, written by `item_scores_store` (from
  `item_scores_compute` with a reward checkpoint, the `score_items` command, or any training
  code that already holds the scores);
- `margin`: the smallest gap between two completions' rewards (small: the model barely
  separates them);
- `agreement`: of the pairs of completions the labelers' consensus (Borda count over every
  ranking of the item) puts in a strict order, the share the reward model orders the same
  way; None while nobody has ranked the item;
- `routed` and `priority`: the items that go first when the project's `route_disagreements`
  is on: every item where the model disagrees with the consensus (lowest agreement first),
  then the items whose margin is among the smallest ROUTE_MARGIN_SHARE of the project's
  (smallest first); an item stops being routed once it has the routed number of labelers.

`item_scores_refresh` recomputes agreement and routing from the rankings as they are now
(no model needed): scoring calls it, and so can an admin after new rankings come in.
"""

from __future__ import annotations

from math import ceil

from django.db import transaction
from django.utils import timezone

from labeling.agreement import rank_positions
from labeling.models import Item, ItemCompletion, ItemScore, Project, Ranking
from labeling.services import QUEUE_SOURCES, LabelingError

ROUTE_MARGIN_SHARE = 0.1
"""The share of a project's scored items, smallest reward margins first, that are routed even
where the model agrees with the labelers (or nobody has ranked them yet)."""


def reward_groups(scores: dict[int, float]) -> list[list[int]]:
    """The reward model's ranking: completion ids best first, equal rewards tied."""
    out: list[list[int]] = []
    for cid in sorted(scores, key=lambda c: (-scores[c], c)):
        if out and scores[out[-1][0]] == scores[cid]:
            out[-1].append(cid)
        else:
            out.append([cid])
    return out


def reward_agreement(scores: dict[int, float], consensus: list[list[int]]) -> float | None:
    """Of the pairs `consensus` orders strictly, the share the rewards order the same way (a
    tie in reward counts as not agreeing); None when the consensus orders no pair."""
    ranks = rank_positions(consensus)
    ids = [c for c in ranks if c in scores]
    same = pairs = 0
    for i, x in enumerate(ids):
        for y in ids[i + 1 :]:
            if ranks[x] == ranks[y]:
                continue
            pairs += 1
            better, worse = (x, y) if ranks[x] < ranks[y] else (y, x)
            same += scores[better] > scores[worse]
    return same / pairs if pairs else None


def reward_margin(scores: dict[int, float]) -> float:
    values = sorted(scores.values())
    return min((b - a for a, b in zip(values, values[1:], strict=False)), default=0.0)


# --------------------------------------------------------------------------- writes


def project_routing_set(
    *, project: Project, route_disagreements: bool, routed_annotations_per_item: int | None = None
) -> Project:
    """Turn disagreement routing on or off, and set how many labelers a routed item gets."""
    if not isinstance(route_disagreements, bool):
        raise LabelingError("route_disagreements must be true or false.")
    values = {"route_disagreements": route_disagreements}
    if routed_annotations_per_item is not None:
        n = routed_annotations_per_item
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 50:
            raise LabelingError(f"Labelers per routed item must be between 1 and 50, not {n!r}.")
        values["routed_annotations_per_item"] = n
    Project.objects.filter(pk=project.pk).update(**values)
    for key, value in values.items():
        setattr(project, key, value)
    return project


def item_scores_store(
    *, project: Project, scores: dict[int, dict[int, float]], checkpoint_id: int | None = None
) -> int:
    """Store the reward model's `scores` ({item id: {completion id: reward}}) for items of
    `project`, replacing earlier ones, then refresh agreement and routing. Every item must be
    the project's and be given a finite reward for each of its completions. Returns the number
    of items stored."""
    scores = {int(i): {int(c): float(r) for c, r in per.items()} for i, per in scores.items()}
    shown: dict[int, set[int]] = {}
    for item_id, cid in ItemCompletion.objects.filter(
        item__project=project, item_id__in=list(scores)
    ).values_list("item_id", "completion_id"):
        shown.setdefault(item_id, set()).add(cid)
    for item_id, per in scores.items():
        if item_id not in shown:
            raise LabelingError(f"Item {item_id} is not in this project.")
        if set(per) != shown[item_id]:
            raise LabelingError(f"Item {item_id}: give a reward for each of its completions.")
        if any(r != r or r in (float("inf"), float("-inf")) for r in per.values()):
            raise LabelingError(f"Item {item_id}: a reward is not a finite number.")
    now = timezone.now()
    with transaction.atomic():
        # two scorings at once (two reward jobs ending together) take turns, the later wins
        Project.objects.select_for_update().filter(pk=project.pk).first()
        ItemScore.objects.filter(item_id__in=list(scores)).delete()
        ItemScore.objects.bulk_create(
            ItemScore(
                item_id=item_id,
                project=project,
                checkpoint_id=checkpoint_id,
                scores={str(c): r for c, r in per.items()},
                margin=reward_margin(per),
                scored_at=now,
            )
            for item_id, per in scores.items()
        )
        item_scores_refresh(project=project)
    return len(scores)


def item_scores_refresh(*, project: Project) -> dict:
    """Recompute each scored item's agreement with the labelers' consensus (every ranking of
    the item as it is now) and which items are routed. Returns counts."""
    from labeling.importexport import borda_consensus  # importexport imports the selectors

    rows = list(ItemScore.objects.filter(project=project).select_related("item"))
    rankings: dict[int, list] = {}
    ranked = Ranking.objects.filter(item__project=project, item__score__isnull=False)
    for item_id, groups in ranked.order_by("id").values_list("item_id", "groups"):
        rankings.setdefault(item_id, []).append(groups)
    by_margin = sorted(rows, key=lambda s: (s.margin, s.item_id))
    close = {s.pk for s in by_margin[: ceil(ROUTE_MARGIN_SHARE * len(rows))]}
    margin_rank = {s.pk: n for n, s in enumerate(by_margin)}
    target = max(project.annotations_per_item, project.routed_annotations_per_item)
    counts = {"scored": len(rows), "disagree": 0, "routed": 0}
    for s in rows:
        per = {int(c): r for c, r in s.scores.items()}
        ranked = rankings.get(s.item_id)
        s.agreement = (
            reward_agreement(per, borda_consensus(ranked, sorted(per))) if ranked else None
        )
        disagrees = s.agreement is not None and s.agreement < 1
        counts["disagree"] += disagrees
        # disagreements first, worst first; then the closest calls; the rest after
        s.priority = s.agreement - 1 if disagrees else (margin_rank[s.pk] + 1) / (len(rows) + 1)
        s.routed = (
            (disagrees or s.pk in close)
            and s.item.source in QUEUE_SOURCES
            and s.item.ranking_count < target
        )
        counts["routed"] += s.routed
    ItemScore.objects.bulk_update(rows, ["agreement", "priority", "routed"], batch_size=500)
    return counts


def item_scores_compute(
    *, project: Project, checkpoint_path: str, checkpoint_id: int | None = None, scorer=None
) -> int:
    """Score every queue and imported item of `project` with the reward model at
    `checkpoint_path` (rlhf.reward.RewardScorer, loaded here unless `scorer` is given: a
    callable (prompts, completions) -> rewards) and store the scores. Loads a model: run it
    where a model may run (the `score_items` command, a GPU worker), never in a web request."""
    if scorer is None:
        scorer = _load_scorer(checkpoint_path)
    from rlhf.data import ChatPrompt  # a conversation is scored as the reward model read it

    pairs = [
        (item_id, cid, ChatPrompt(prompt, messages) if messages else prompt, text)
        for item_id, cid, prompt, messages, text in ItemCompletion.objects.filter(
            item__project=project
        )
        .exclude(item__source=Item.Source.EVAL)
        .order_by("item_id", "position")
        .values_list(
            "item_id",
            "completion_id",
            "item__prompt__text",
            "item__prompt__messages",
            "completion__text",
        )
    ]
    scores: dict[int, dict[int, float]] = {}
    batch = 16
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        rewards = scorer([p[2] for p in chunk], [p[3] for p in chunk])
        for (item_id, cid, _, _), reward in zip(chunk, rewards, strict=True):
            scores.setdefault(item_id, {})[cid] = float(reward)
    return item_scores_store(project=project, scores=scores, checkpoint_id=checkpoint_id)


def _load_scorer(checkpoint_path: str):
    from rlhf.reward import RewardScorer  # torch: imported only where a model is loaded

    return RewardScorer.from_checkpoint(checkpoint_path)
