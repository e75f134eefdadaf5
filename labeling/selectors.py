"""Reads for the labeling app. Every lookup that starts from a request is scoped to the
projects the user belongs to (`project_get_for_user` raises Http404 otherwise)."""

from __future__ import annotations

from collections import defaultdict
from itertools import combinations
from statistics import median

from django.contrib.auth import get_user_model
from django.db import connection
from django.db.models import Count, Exists, IntegerField, OuterRef, Q, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce, Length
from django.http import Http404
from django.utils import timezone

from config.ids import as_id
from labeling.agreement import (
    exact_test_p_value,
    first_shown_is_best,
    kendall_tau_b,
    longer_preferred,
    pair_counts,
    rank_positions,
)
from labeling.models import (
    Assignment,
    Completion,
    Flag,
    Invite,
    Item,
    ItemCompletion,
    ItemScore,
    Membership,
    Project,
    Prompt,
    Ranking,
)


def _count_subquery(qs: QuerySet, outer_field: str = "project") -> Coalesce:
    counted = qs.filter(**{outer_field: OuterRef("pk")}).order_by().values(outer_field)
    counted = counted.annotate(n=Count("pk")).values("n")
    return Coalesce(Subquery(counted, output_field=IntegerField()), Value(0))


def project_list_for_user(*, user) -> QuerySet[Project]:
    """The user's projects (a superuser sees all), each annotated with `role`,
    `total_items`, `complete_items` and `my_done` (the user's rankings in it)."""
    if not user.is_authenticated:
        return Project.objects.none()
    qs = (
        Project.objects.all()
        if user.is_superuser
        else Project.objects.filter(memberships__user=user)
    )
    role = Subquery(Membership.objects.filter(project=OuterRef("pk"), user=user).values("role")[:1])
    return qs.annotate(
        # a superuser who is not a member administers every project (as project_get_for_user)
        role=Coalesce(role, Value(Membership.Role.ADMIN)) if user.is_superuser else role,
        total_items=_count_subquery(Item.objects.exclude(source=Item.Source.IMPORT)),
        complete_items=_count_subquery(
            Item.objects.exclude(source=Item.Source.IMPORT).filter(is_complete=True)
        ),
        my_done=_count_subquery(Ranking.objects.filter(user=user), outer_field="item__project"),
    ).order_by("-created_at", "-id")


_PROJECT_FOR_USER_SQL = """
SELECT p.*,
  (SELECT m.role FROM {membership} m WHERE m.project_id = p.id AND m.user_id = %s) AS member_role
FROM {project} p WHERE p.id = %s
"""


def project_get_for_user(*, user, project_id, admin: bool = False) -> Project:
    """The project if `user` is a member (an admin member when `admin`); Http404 otherwise,
    so a labeler cannot even learn that another project exists. Sets `project.role` and
    `project.is_admin` for the templates."""
    project_id = as_id(project_id)
    if project_id is None:
        raise Http404("No such project.")
    if not user.is_authenticated:
        raise Http404("No such project.")
    # One query (asked on every API call and page): the project with the user's role in it
    # (None when not a member).
    sql = _PROJECT_FOR_USER_SQL.format(
        project=Project._meta.db_table, membership=Membership._meta.db_table
    )
    project = next(iter(Project.objects.raw(sql, [user.pk, project_id])), None)
    if project is None or (project.member_role is None and not user.is_superuser):
        raise Http404("No such project.")
    project.role = project.member_role or Membership.Role.ADMIN
    project.is_admin = user.is_superuser or project.role == Membership.Role.ADMIN
    if admin and not project.is_admin:
        raise Http404("No such project.")
    return project


def project_members(*, project: Project) -> QuerySet[Membership]:
    return project.memberships.select_related("user").order_by("role", "user__username")


def project_open_invites(*, project: Project) -> QuerySet[Invite]:
    """The project's invites that can still be used (not used, not expired), newest first."""
    return project.invites.filter(used_at__isnull=True, expires_at__gt=timezone.now()).order_by(
        "-created_at", "-id"
    )


def project_progress(*, project: Project) -> dict:
    """Items complete / total (queue items only: imported ones come ranked), labeler
    rankings stored, live leases and unresolved flags."""
    items = Item.objects.filter(project=project)
    queued = ~Q(source=Item.Source.IMPORT)
    counts = items.aggregate(
        total=Count("pk", filter=queued),
        complete=Count("pk", filter=queued & Q(is_complete=True)),
        imported=Count("pk", filter=Q(source=Item.Source.IMPORT)),
    )
    total, complete = counts["total"], counts["complete"]
    return {
        "total": total,
        "complete": complete,
        "remaining": total - complete,
        "imported": counts["imported"],
        "percent": round(100 * complete / total, 1) if total else 0.0,
        "rankings": Ranking.objects.filter(item__project=project, user__isnull=False).count(),
        "flags": Flag.objects.filter(item__project=project, resolved=False).count(),
    }


def rankings_recent_for_user(*, project: Project, user, limit: int = 50) -> QuerySet[Ranking]:
    """The user's own labeler rankings in the project, newest first, with the prompt joined
    and `earlier_versions` (how many versions the latest replaced)."""
    return (
        Ranking.objects.filter(item__project=project, user=user, source=Ranking.Source.LABELER)
        .select_related("item__prompt")
        .annotate(earlier_versions=Count("revisions"))
        .order_by("-created_at", "-id")[:limit]
    )


def ranking_for_revision(*, project: Project, user, item_id) -> Ranking:
    """The user's own labeler ranking of an item of the project; Http404 when there is none."""
    item_pk = as_id(item_id)
    ranking = (
        Ranking.objects.filter(
            item_id=item_pk, item__project=project, user=user, source=Ranking.Source.LABELER
        ).first()
        if item_pk is not None
        else None
    )
    if ranking is None:
        raise Http404("You have no ranking of this item.")
    return ranking


def labeler_done_count(*, project: Project, user) -> int:
    return Ranking.objects.filter(item__project=project, user=user).count()


_VIEW_SQL = """
SELECT c.*, i.project_id AS view_project_id, p.text AS view_prompt_text,
       p.messages AS view_prompt_messages
FROM {completion} c
JOIN {item_completion} ic ON ic.completion_id = c.id
JOIN {item} i ON i.id = ic.item_id
JOIN {prompt} p ON p.id = i.prompt_id
WHERE ic.item_id = %s
ORDER BY ic.position
"""


FOLD_AFTER_TURNS = 3
"""A conversation of more user/assistant turns than this shows only its last two (and its
system turn) until the labeler unfolds the earlier ones."""


def conversation_view(*, messages: list[dict] | None) -> dict | None:
    """How the ranking page lays out a conversation: {"system": the system turn or None,
    "earlier": turns folded away, "latest": turns always shown (the last assistant reply and
    the latest user turn)}; None for a plain-text prompt."""
    if not messages:
        return None
    system = messages[0] if messages[0].get("role") == "system" else None
    turns = messages[1:] if system else list(messages)
    cut = len(turns) - 2 if len(turns) > FOLD_AFTER_TURNS else 0
    return {"system": system, "earlier": turns[:cut], "latest": turns[cut:]}


def assignment_view(*, assignment: Assignment) -> dict:
    """What the ranking page shows for a lease: the item, its prompt and its completions in
    the labeler's display order (numbered 1..K, the digit keys)."""
    # One raw query (this runs for every item handed out, and a queryset with these joins
    # costs more to build than the database spends answering it): the completions in
    # position order, each row carrying the item's prompt.
    sql = _VIEW_SQL.format(
        prompt=Prompt._meta.db_table,
        item=Item._meta.db_table,
        completion=Completion._meta.db_table,
        item_completion=ItemCompletion._meta.db_table,
    )
    rows = list(Completion.objects.raw(sql, [assignment.item_id]))
    if not rows:
        raise Item.DoesNotExist(f"Item {assignment.item_id} has no completions.")
    first = rows[0]
    messages = Prompt._meta.get_field("messages").from_db_value(
        first.view_prompt_messages, None, connection
    )
    prompt = Prompt.from_db(  # the columns not read here load on first access
        Prompt.objects.db,
        ["id", "project_id", "text", "messages"],
        [first.prompt_id, first.view_project_id, first.view_prompt_text, messages],
    )
    item = Item.from_db(
        Item.objects.db,
        ["id", "project_id", "prompt_id"],
        [assignment.item_id, first.view_project_id, first.prompt_id],
    )
    Item.prompt.field.set_cached_value(item, prompt)
    completions = {c.pk: c for c in rows}
    order = [cid for cid in assignment.display_order if cid in completions]
    order += [cid for cid in completions if cid not in order]
    return {
        "assignment": assignment,
        "item": item,
        "prompt": item.prompt,
        "conversation": conversation_view(messages=messages),
        "completions": [completions[cid] for cid in order],
        "display_order": order,
    }


def _labeler_rankings(project: Project) -> list[dict]:
    return list(
        Ranking.objects.filter(item__project=project, user__isnull=False)
        .order_by("id")
        .values("item_id", "user_id", "groups", "seconds_spent", "display_order")
    )


def _shared_item_comparisons(rankings: list[dict]):
    """Yield (user_a, user_b, counts, tau) for every two labelers who ranked the same item."""
    by_item: dict[int, list[dict]] = defaultdict(list)
    for r in rankings:
        by_item[r["item_id"]].append(r)
    for rows in by_item.values():
        for a, b in combinations(rows, 2):
            yield (
                a["user_id"],
                b["user_id"],
                pair_counts(a["groups"], b["groups"]),
                kendall_tau_b(a["groups"], b["groups"]),
            )


def project_agreement(*, project: Project) -> dict:
    """Inter-labeler agreement on items ranked by two or more labelers.

    pairwise_agreement: pairs of completions given the same relation / pairs compared,
    pooled over every two labelers on every shared item; mean_kendall_tau: the mean of
    tau-b over those labeler pairs (None where nothing is shared)."""
    same = pairs = comparisons = 0
    taus: list[float] = []
    shared_items = set()
    rankings = _labeler_rankings(project)
    for _, _, counts, tau in _shared_item_comparisons(rankings):
        comparisons += 1
        same += counts["same"]
        pairs += counts["pairs"]
        if tau is not None:
            taus.append(tau)
    by_item = defaultdict(int)
    for r in rankings:
        by_item[r["item_id"]] += 1
    shared_items = sum(1 for n in by_item.values() if n >= 2)
    return {
        "shared_items": shared_items,
        "comparisons": comparisons,
        "pairwise_agreement": same / pairs if pairs else None,
        "mean_kendall_tau": sum(taus) / len(taus) if taus else None,
    }


def labeler_stats(*, project: Project) -> list[dict]:
    """One row per labeler who ranked in the project: username, count, median seconds, and
    agreement with the other labelers on shared items (pairwise rate and mean tau-b)."""
    rankings = _labeler_rankings(project)
    per_user: dict[int, dict] = defaultdict(
        lambda: {"count": 0, "seconds": [], "same": 0, "pairs": 0, "taus": []}
    )
    for r in rankings:
        row = per_user[r["user_id"]]
        row["count"] += 1
        if r["seconds_spent"] is not None:
            row["seconds"].append(r["seconds_spent"])
    for ua, ub, counts, tau in _shared_item_comparisons(rankings):
        for uid in (ua, ub):
            per_user[uid]["same"] += counts["same"]
            per_user[uid]["pairs"] += counts["pairs"]
            if tau is not None:
                per_user[uid]["taus"].append(tau)
    from django.contrib.auth import get_user_model

    names = dict(get_user_model().objects.filter(pk__in=per_user).values_list("pk", "username"))
    out = []
    for uid, row in per_user.items():
        out.append(
            {
                "user_id": uid,
                "username": names.get(uid, f"user {uid}"),
                "count": row["count"],
                "median_seconds": median(row["seconds"]) if row["seconds"] else None,
                "agreement": row["same"] / row["pairs"] if row["pairs"] else None,
                "mean_kendall_tau": sum(row["taus"]) / len(row["taus"]) if row["taus"] else None,
            }
        )
    out.sort(key=lambda r: (-r["count"], r["username"]))
    return out


def flagged_items(
    *, project: Project, include_resolved: bool = False, category: str | None = None
) -> QuerySet[Flag]:
    qs = Flag.objects.filter(item__project=project)
    if not include_resolved:
        qs = qs.filter(resolved=False)
    if category:
        qs = qs.filter(category=category)
    return qs.select_related("item", "item__prompt", "user").order_by("-created_at", "-id")


def flag_counts_by_category(*, project: Project) -> list[dict]:
    """Open flags per category, most first: [{"category", "label", "count"}]."""
    labels = dict(Flag.Category.choices)
    rows = (
        Flag.objects.filter(item__project=project, resolved=False)
        .values("category")
        .annotate(count=Count("pk"))
        .order_by("-count", "category")
    )
    return [
        {"category": r["category"], "label": labels.get(r["category"], r["category"]), **r}
        for r in rows
    ]


def rankings_for_project(*, project: Project, source: str | None = None) -> QuerySet[Ranking]:
    """Every ranking in the project, oldest first, with item, prompt and user joined.
    `source` = "labeler" or "import" narrows it. Completions: `item_completion_texts`."""
    qs = Ranking.objects.filter(item__project=project)
    if source is not None:
        qs = qs.filter(source=source)
    return qs.select_related("item", "item__prompt", "user").order_by("id")


def item_completion_texts(*, item_ids) -> dict[int, dict[int, str]]:
    """{item id: {completion id: text}} for a batch of items (for exports and training)."""
    out: dict[int, dict[int, str]] = defaultdict(dict)
    for item_id, cid, text in (
        ItemCompletion.objects.filter(item_id__in=list(item_ids))
        .order_by("item_id", "position")
        .values_list("item_id", "completion_id", "completion__text")
    ):
        out[item_id][cid] = text
    return dict(out)


# --------------------------------------------------------------------------- labeler report

REPORT_MIN_RANKINGS = 20
"""A labeler's position bias or length preference is flagged only over this many rankings."""
REPORT_MIN_SHARED_ITEMS = 10
"""Agreement with the consensus is judged only over this many items shared with others."""
REPORT_P_VALUE = 0.01
"""A pattern is flagged when chance alone would produce it less often than this."""
REPORT_LENGTH_GAP = 0.2
"""...and, for length, when the labeler's rate is this far from the other labelers' rate (good
answers may well be longer: what stands out is a labeler the others do not follow)."""
REPORT_CONSENSUS_GAP = 0.25
"""Agreement with the consensus this far below the other labelers' median is flagged."""


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _percent(x: float) -> str:
    return f"{100 * x:.0f}%"


def labeler_report(*, project: Project) -> list[dict]:
    """One row per labeler of the project (and per other member who ranked, skipped or
    flagged there), most rankings first:

    - `rankings`, `median_seconds`, `skips` (items given back without a flag), `flags`;
    - `position_bias`: of the rankings whose display order is known, how often the response
      shown first is ranked best (`rate`), against `chance` (the mean of t / K, t the size of
      the best group), with the exact two-sided `p_value`;
    - `length_preference`: over every two responses ranked apart whose lengths differ, how
      often the longer is preferred, against 0.5, with its `p_value` (pairs of one ranking
      are counted as independent trials: a rough test, strict enough at p < 0.01);
    - `consensus`: agreement with the Borda-count consensus of the OTHER labelers' rankings of
      the same items (pairwise agreement rate and mean Kendall tau-b);
    - `labelers`: pairwise agreement and mean tau-b with each other labeler on shared items;
    - `flagged` and `reasons`: plain words for the admin, when a pattern is far from chance
      (position), from chance and the others (length) or from the others (consensus).
    """
    from labeling.importexport import borda_consensus  # importexport imports this module

    rankings = _labeler_rankings(project)
    lengths = dict(
        ItemCompletion.objects.filter(item__project=project, item__rankings__user__isnull=False)
        .annotate(n=Length("completion__text"))
        .values_list("completion_id", "n")
        .distinct()
    )
    skips = dict(
        Assignment.objects.filter(item__project=project, status=Assignment.Status.SKIPPED)
        .exclude(Exists(Flag.objects.filter(item=OuterRef("item"), user=OuterRef("user"))))
        .values("user_id")
        .annotate(n=Count("pk"))
        .values_list("user_id", "n")
    )
    flags = dict(
        Flag.objects.filter(item__project=project)
        .values("user_id")
        .annotate(n=Count("pk"))
        .values_list("user_id", "n")
    )
    labelers = set(
        Membership.objects.filter(project=project, role=Membership.Role.LABELER).values_list(
            "user_id", flat=True
        )
    )
    user_ids = labelers | {r["user_id"] for r in rankings} | set(skips) | set(flags)
    names = dict(get_user_model().objects.filter(pk__in=user_ids).values_list("pk", "username"))

    rows = {
        uid: {
            "seconds": [],
            "first": 0,
            "chances": defaultdict(int),
            "longer": 0,
            "pairs": 0,
            "consensus": {"items": 0, "same": 0, "pairs": 0, "taus": []},
            "others": defaultdict(lambda: {"items": 0, "same": 0, "pairs": 0, "taus": []}),
            "count": 0,
        }
        for uid in user_ids
    }
    by_item: dict[int, list[dict]] = defaultdict(list)
    for r in rankings:
        row = rows[r["user_id"]]
        row["count"] += 1
        by_item[r["item_id"]].append(r)
        if r["seconds_spent"] is not None:
            row["seconds"].append(r["seconds_spent"])
        shown = first_shown_is_best(r["groups"], r["display_order"])
        if shown is not None:
            row["first"] += shown[0]
            row["chances"][shown[1]] += 1
        wins, pairs = longer_preferred(r["groups"], lengths)
        row["longer"] += wins
        row["pairs"] += pairs
    for item_rankings in by_item.values():
        for r in item_rankings:
            others = [o["groups"] for o in item_rankings if o is not r]
            if not others:
                continue
            order = sorted(rank_positions(r["groups"]))
            _add_comparison(
                rows[r["user_id"]]["consensus"], r["groups"], borda_consensus(others, order)
            )
        for a, b in combinations(item_rankings, 2):
            _add_comparison(rows[a["user_id"]]["others"][b["user_id"]], a["groups"], b["groups"])
            _add_comparison(rows[b["user_id"]]["others"][a["user_id"]], b["groups"], a["groups"])

    out = []
    for uid, row in rows.items():
        trials = sum(row["chances"].values())
        chance = sum(p * n for p, n in row["chances"].items()) / trials if trials else None
        out.append(
            {
                "user_id": uid,
                "username": names.get(uid, f"user {uid}"),
                "rankings": row["count"],
                "median_seconds": median(row["seconds"]) if row["seconds"] else None,
                "skips": skips.get(uid, 0),
                "flags": flags.get(uid, 0),
                "position_bias": {
                    "rankings": trials,
                    "first_ranked_best": row["first"],
                    "rate": _rate(row["first"], trials),
                    "chance": chance,
                    "p_value": exact_test_p_value(row["first"], row["chances"]),
                },
                "length_preference": {
                    "pairs": row["pairs"],
                    "longer_preferred": row["longer"],
                    "rate": _rate(row["longer"], row["pairs"]),
                    "p_value": exact_test_p_value(row["longer"], {0.5: row["pairs"]}),
                },
                "consensus": _comparison_out(row["consensus"]),
                "labelers": sorted(
                    (
                        {"user_id": other, "username": names.get(other, f"user {other}")}
                        | _comparison_out(c)
                        for other, c in row["others"].items()
                    ),
                    key=lambda o: o["username"],
                ),
                "_longer": (row["longer"], row["pairs"]),
            }
        )
    for row in out:
        row["reasons"] = _report_reasons(row, out)
        row["flagged"] = bool(row["reasons"])
    for row in out:
        del row["_longer"]
    out.sort(key=lambda r: (-r["rankings"], r["username"]))
    return out


def _add_comparison(acc: dict, a, b) -> None:
    counts = pair_counts(a, b)
    acc["items"] += 1
    acc["same"] += counts["same"]
    acc["pairs"] += counts["pairs"]
    tau = kendall_tau_b(a, b)
    if tau is not None:
        acc["taus"].append(tau)


def _comparison_out(acc: dict) -> dict:
    return {
        "items": acc["items"],
        "agreement": _rate(acc["same"], acc["pairs"]),
        "kendall_tau": sum(acc["taus"]) / len(acc["taus"]) if acc["taus"] else None,
    }


def _report_reasons(row: dict, everyone: list[dict]) -> list[str]:
    """Why the admin should look at this labeler's work (empty: nothing stands out)."""
    reasons = []
    others = [o for o in everyone if o["user_id"] != row["user_id"]]
    pos = row["position_bias"]
    if (
        pos["rankings"] >= REPORT_MIN_RANKINGS
        and pos["p_value"] is not None
        and pos["p_value"] < REPORT_P_VALUE
    ):
        more = pos["rate"] > pos["chance"]
        reasons.append(
            f"Ranks the response shown first as the best in {pos['first_ranked_best']} of "
            f"{pos['rankings']} rankings ({_percent(pos['rate'])}), where chance is "
            f"{_percent(pos['chance'])} (p = {pos['p_value']:.2g}): "
            + (
                "the order is random, so this looks like ranking by position, not by reading."
                if more
                else "the response shown first is passed over more often than chance allows."
            )
        )
    length = row["length_preference"]
    wins = sum(o["_longer"][0] for o in others)
    pairs = sum(o["_longer"][1] for o in others)
    others_rate = _rate(wins, pairs)
    if (
        row["rankings"] >= REPORT_MIN_RANKINGS
        and length["p_value"] is not None
        and length["p_value"] < REPORT_P_VALUE
        and (others_rate is None or abs(length["rate"] - others_rate) >= REPORT_LENGTH_GAP)
    ):
        reasons.append(
            f"Prefers the {'longer' if length['rate'] > 0.5 else 'shorter'} response in "
            f"{max(length['longer_preferred'], length['pairs'] - length['longer_preferred'])} "
            f"of {length['pairs']} pairs ranked apart (p = {length['p_value']:.2g} against an "
            "even split)"
            + (
                f", where the other labelers prefer the longer in {_percent(others_rate)}."
                if others_rate is not None
                else "."
            )
        )
    mine = row["consensus"]
    peers = [
        o["consensus"]["agreement"]
        for o in others
        if o["consensus"]["items"] >= REPORT_MIN_SHARED_ITEMS
        and o["consensus"]["agreement"] is not None
    ]
    if mine["items"] >= REPORT_MIN_SHARED_ITEMS and mine["agreement"] is not None and peers:
        typical = median(peers)
        if mine["agreement"] < typical - REPORT_CONSENSUS_GAP:
            reasons.append(
                f"Agrees with the other labelers' consensus on {_percent(mine['agreement'])} "
                f"of response pairs over {mine['items']} shared items, where the others' "
                f"median is {_percent(typical)}."
            )
    return reasons


# --------------------------------------------------------------------------- disagreements


def item_disagreements(*, project: Project, limit: int = 100) -> dict:
    """The reward model against the labelers (labeling.routing): counts of scored, disagreeing
    and routed items, and the items where they disagree most (lowest agreement first, then the
    model's larger margin: confidently wrong before unsure), each with its completions in the
    labelers' consensus order beside their rewards, to adjudicate."""
    from labeling.importexport import borda_consensus  # importexport imports this module

    scored = ItemScore.objects.filter(project=project)
    counts = scored.aggregate(
        scored=Count("pk"),
        disagree=Count("pk", filter=Q(agreement__lt=1)),
        routed=Count("pk", filter=Q(routed=True)),
    )
    rows = list(
        scored.filter(agreement__lt=1)
        .select_related("item__prompt")
        .order_by("agreement", "-margin", "item_id")[:limit]
    )
    texts = item_completion_texts(item_ids=[s.item_id for s in rows])
    rankings: dict[int, list] = defaultdict(list)
    for item_id, groups in (
        Ranking.objects.filter(item_id__in=[s.item_id for s in rows])
        .order_by("id")
        .values_list("item_id", "groups")
    ):
        rankings[item_id].append(groups)
    items = []
    for s in rows:
        order = list(texts.get(s.item_id, {}))
        consensus = rank_positions(borda_consensus(rankings[s.item_id], order))
        completions = [
            {
                "id": cid,
                "text": texts[s.item_id][cid],
                "reward": s.scores.get(str(cid)),
                "consensus_rank": consensus.get(cid, 0) + 1,
            }
            for cid in order
        ]
        completions.sort(key=lambda c: (c["consensus_rank"], -(c["reward"] or 0)))
        items.append(
            {
                "item_id": s.item_id,
                "prompt": s.item.prompt.text,
                "rankings": len(rankings[s.item_id]),
                "agreement": s.agreement,
                "margin": s.margin,
                "routed": s.routed,
                "checkpoint_id": s.checkpoint_id,
                "completions": completions,
            }
        )
    return {**counts, "items": items}
