"""Reads for the training app: permission-scoped lookups and the engine's input rows.

Scoping: training pages and the training API are for project admins (Membership role admin)
and superusers only; anyone else gets the same 404 as for a row that does not exist.

Input rows are built from a frozen list of ids (the job's snapshot), in id order, so a job
that resumes after a crash trains on exactly the rows it started with; the sha256 of the
rows (``rows_hash``) proves it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

from django.db.models import Count, F, Max, Prefetch, QuerySet
from django.http import Http404
from django.utils import timezone

from config.ids import as_id
from labeling.models import (
    Completion,
    Item,
    ItemCompletion,
    Membership,
    Project,
    Prompt,
    Ranking,
)
from rlhf.rankings import ids_to_indices
from training.models import Checkpoint, Job, MetricPoint

# --------------------------------------------------------------------------- scoping


def projects_admin_for_user(*, user) -> QuerySet[Project]:
    """Projects whose training the user may see and launch: admin role, or superuser."""
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return Project.objects.none()
    if user.is_superuser:
        return Project.objects.all()
    return Project.objects.filter(
        memberships__user=user, memberships__role=Membership.Role.ADMIN
    ).distinct()


def project_admin_get(*, user, project_id) -> Project:
    try:
        return projects_admin_for_user(user=user).get(pk=as_id(project_id))
    except Project.DoesNotExist:
        raise Http404("No such project.") from None


def jobs_for_user(*, user, project_id: int | None = None) -> QuerySet[Job]:
    jobs = Job.objects.filter(project__in=projects_admin_for_user(user=user)).select_related(
        "project", "launched_by", "parent_checkpoint", "reward_checkpoint"
    )
    if project_id is not None:
        jobs = jobs.filter(project_id=project_id)
    return jobs


def job_get_for_user(*, user, job_id) -> Job:
    try:
        return jobs_for_user(user=user).get(pk=as_id(job_id))
    except Job.DoesNotExist:
        raise Http404("No such job.") from None


def checkpoints_for_user(
    *, user, project_id: int | None = None, role: str | None = None
) -> QuerySet[Checkpoint]:
    """The checkpoints of the projects `user` administers, newest job first and, within a job,
    its latest step first: what a checkpoint picker offers first is the newest finished model
    (ids follow registration order, which live registration makes differ from step order)."""
    rows = (
        Checkpoint.objects.filter(project__in=projects_admin_for_user(user=user))
        .select_related("project", "job", "parent")
        .order_by(F("job_id").desc(nulls_last=True), "-step", "-id")
    )
    if project_id is not None:
        rows = rows.filter(project_id=project_id)
    if role is not None:
        rows = rows.filter(role=role)
    return rows


def checkpoint_get_for_user(*, user, checkpoint_id) -> Checkpoint:
    try:
        return checkpoints_for_user(user=user).get(pk=as_id(checkpoint_id))
    except Checkpoint.DoesNotExist:
        raise Http404("No such checkpoint.") from None


def checkpoint_lineage(*, checkpoint: Checkpoint, limit: int = 50) -> list[Checkpoint]:
    """The checkpoint, its parent, its parent's parent, ... (oldest last)."""
    chain = [checkpoint]
    seen = {checkpoint.pk}
    node = checkpoint
    while node.parent_id is not None and len(chain) < limit:
        node = Checkpoint.objects.select_related("job", "parent").get(pk=node.parent_id)
        if node.pk in seen:
            break
        seen.add(node.pk)
        chain.append(node)
    return chain


# --------------------------------------------------------------------------- metrics


def metric_points_after(
    *, job: Job, after: int = 0, limit: int = 5000
) -> list[tuple[int, int, str, float]]:
    """(id, step, key, value) of the job's points with id > after, oldest first."""
    return list(
        MetricPoint.objects.filter(job=job, id__gt=after)
        .order_by("id")
        .values_list("id", "step", "key", "value")[:limit]
    )


def metric_series(points: Iterable[tuple[int, int, str, float]]) -> dict[str, list[list[float]]]:
    """Group (id, step, key, value) rows into {key: [[step, value], ...]}."""
    series: dict[str, list[list[float]]] = {}
    for _id, step, key, value in points:
        series.setdefault(key, []).append([step, value])
    return series


def job_warnings(*, job: Job) -> list[dict]:
    """What the job's own metrics say is wrong with its curves (training.diagnostics)."""
    from training import diagnostics

    keys = diagnostics.KEYS.get(job.kind)
    if not keys:
        return []
    points = (
        MetricPoint.objects.filter(job=job, key__in=keys)
        .order_by("id")
        .values_list("id", "step", "key", "value")
    )
    return diagnostics.warnings_for(job.kind, job.config, metric_series(points))


def metric_last_values(*, job: Job) -> dict[str, float]:
    """The last value of every metric key of the job."""
    last: dict[str, float] = {}
    for key, value in (
        MetricPoint.objects.filter(job=job).order_by("id").values_list("key", "value").iterator()
    ):
        last[key] = value
    return last


# --------------------------------------------------------------------------- input snapshot


def rows_hash(rows: list[dict]) -> str:
    """sha256 of the rows as canonical JSON: the identity of a training data snapshot."""
    blob = json.dumps(rows, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def ranking_ids_for_project(*, project: Project) -> list[int]:
    """Every ranking of the project that expresses a preference (not all ties), by id."""
    ids = []
    for rid, groups in (
        Ranking.objects.filter(item__project=project)
        .order_by("id")
        .values_list("id", "groups")
        .iterator()
    ):
        if isinstance(groups, list) and len(groups) >= 2:
            ids.append(rid)
    return ids


def _with_turns(row: dict, messages: list | None) -> dict:
    """An engine row that also carries its prompt's conversation ("messages"), which the
    engine renders with the model's chat template; plain prompts keep their rows as they were
    (so their snapshot hashes do not change)."""
    if messages:
        row["messages"] = messages
    return row


def preference_rows(*, ranking_ids: list[int]) -> list[dict]:
    """Rankings as engine rows {"prompt", "completions", "ranking"} (indices into completions,
    in the item's display position order), in the order of ``ranking_ids``."""
    rankings = {
        r.pk: r
        for r in Ranking.objects.filter(pk__in=ranking_ids)
        .select_related("item__prompt")
        .prefetch_related(
            Prefetch(
                "item__item_completions",
                queryset=ItemCompletion.objects.select_related("completion").order_by("position"),
            )
        )
    }
    rows = []
    for rid in ranking_ids:
        ranking = rankings.get(rid)
        if ranking is None:
            continue  # deleted since the snapshot: the hash check reports it
        shown = [ic.completion for ic in ranking.item.item_completions.all()]
        rows.append(
            _with_turns(
                {
                    "prompt": ranking.item.prompt.text,
                    "completions": [c.text for c in shown],
                    "ranking": ids_to_indices(ranking.groups, [c.pk for c in shown]),
                },
                ranking.item.prompt.messages,
            )
        )
    return rows


def prompt_ids_for_project(*, project: Project, limit: int | None = None) -> list[int]:
    ids = Prompt.objects.filter(project=project).order_by("id").values_list("id", flat=True)
    return list(ids[:limit] if limit else ids)


def prompt_rows(*, prompt_ids: list[int]) -> list[dict]:
    """Prompts as engine rows {"prompt"} in the order of ``prompt_ids``."""
    found = {
        pid: (text, messages)
        for pid, text, messages in Prompt.objects.filter(pk__in=prompt_ids).values_list(
            "id", "text", "messages"
        )
    }
    return [
        _with_turns({"prompt": found[pid][0]}, found[pid][1]) for pid in prompt_ids if pid in found
    ]


def demonstration_ids_for_project(*, project: Project) -> list[int]:
    """Completion ids that serve as demonstrations for SFT: an imported completion that is its
    prompt's only one (an imported prompt + completion pair), and the completion a ranking put
    alone in first place (what labelers preferred)."""
    single_prompts = (
        Prompt.objects.filter(project=project)
        .annotate(n=Count("completions"))
        .filter(n=1)
        .values("id")
    )
    ids = set(
        Completion.objects.filter(
            prompt__in=single_prompts, source=Completion.Source.IMPORT
        ).values_list("id", flat=True)
    )
    for groups in (
        Ranking.objects.filter(item__project=project).values_list("groups", flat=True).iterator()
    ):
        if isinstance(groups, list) and len(groups) >= 2 and len(groups[0]) == 1:
            ids.add(int(groups[0][0]))
    return sorted(ids)


def demonstration_rows(*, completion_ids: list[int]) -> list[dict]:
    """Demonstrations as engine rows {"prompt", "completion"} in the order of ``completion_ids``."""
    found = {
        c.pk: c for c in Completion.objects.filter(pk__in=completion_ids).select_related("prompt")
    }
    return [
        _with_turns(
            {"prompt": found[cid].prompt.text, "completion": found[cid].text},
            found[cid].prompt.messages,
        )
        for cid in completion_ids
        if cid in found
    ]


def input_rows(*, input_kind: str, ids: list[int]) -> list[dict]:
    """The engine rows of a snapshot."""
    if input_kind == Job.Input.RANKINGS:
        return preference_rows(ranking_ids=ids)
    if input_kind == Job.Input.DEMONSTRATIONS:
        return demonstration_rows(completion_ids=ids)
    if input_kind == Job.Input.PROMPTS:
        return prompt_rows(prompt_ids=ids)
    raise ValueError(f"unknown input kind {input_kind!r}")


def prompts_by_id(*, prompt_ids: list[int]) -> dict[int, Prompt]:
    return Prompt.objects.in_bulk(prompt_ids)


# --------------------------------------------------------------------------- evaluations


def eval_human_result(*, job: Job) -> dict | None:
    """The labelers' verdict on an evaluation job's A-vs-B items (None when the job sent none):
    A's win rate over B from every labeler ranking of those items (a tie counts one half, with
    its 95% interval), how often the labelers agree with the reward model where both chose a
    side, and one row per ranked item (prompt, the labelers' verdicts, the reward model's)."""
    from training import evaluation

    if job.kind != Job.Kind.EVAL or not job.options.get("send_to_labelers"):
        return None
    sides = {}  # item id -> {"a": (completion id, reward), "b": ...}
    for item_id, completion_id, generation in ItemCompletion.objects.filter(
        item__project_id=job.project_id,
        item__source=Item.Source.EVAL,
        completion__generation__job_id=job.pk,
    ).values_list("item_id", "completion_id", "completion__generation"):
        side = (generation or {}).get("eval_side")
        if side in ("a", "b"):
            sides.setdefault(item_id, {})[side] = (completion_id, (generation or {}).get("reward"))
    sides = {i: s for i, s in sides.items() if len(s) == 2}
    rankings = Ranking.objects.filter(item_id__in=list(sides), source=Ranking.Source.LABELER)
    counts = {"a": 0, "b": 0, "tie": 0}
    agree = disagree = 0
    by_item: dict[int, list[str]] = {}
    for item_id, groups in rankings.values_list("item_id", "groups"):
        rank = {cid: r for r, group in enumerate(groups) for cid in group}
        a_id, b_id = sides[item_id]["a"][0], sides[item_id]["b"][0]
        human = evaluation.verdict(-rank[a_id], -rank[b_id])
        counts[human] += 1
        by_item.setdefault(item_id, []).append(human)
    prompts = dict(
        Prompt.objects.filter(items__id__in=list(by_item)).values_list("items__id", "text")
    )
    items = []
    for item_id, verdicts in sorted(by_item.items()):
        ra, rb = sides[item_id]["a"][1], sides[item_id]["b"][1]
        rm = evaluation.verdict(ra, rb) if ra is not None and rb is not None else None
        for human in verdicts:
            if rm in ("a", "b") and human != "tie":
                agree, disagree = agree + (human == rm), disagree + (human != rm)
        items.append(
            {
                "item_id": item_id,
                "prompt": prompts.get(item_id, "")[:200],
                "human": verdicts,
                "reward_model": rm,
            }
        )
    result = evaluation.win_rate(wins=counts["a"], ties=counts["tie"], losses=counts["b"])
    return {
        **result,
        "items_sent": len(sides),
        "items_ranked": len(by_item),
        "agreement_with_reward_model": agree / (agree + disagree) if agree + disagree else None,
        "items": items,
    }


def job_result(*, job: Job) -> dict:
    """The job's stored result; an evaluation sent to labelers adds their verdict under
    "human", computed as they rank (they rank after the job has ended)."""
    human = eval_human_result(job=job)
    return {**(job.result or {}), "human": human} if human is not None else (job.result or {})


# --------------------------------------------------------------------------- the job queue


def queue_positions() -> dict[int, int]:
    """{job id: 1-based place in the queue} of every queued job, in the order the workers take
    them (enqueued first, then id). The queue is shared by every project, so a job's place
    counts the jobs of other projects ahead of it too (only their number shows)."""
    queued = (
        Job.objects.filter(status=Job.Status.QUEUED)
        .order_by(F("enqueued_at").asc(nulls_first=True), "id")
        .values_list("id", flat=True)
    )
    return {job_id: place for place, job_id in enumerate(queued, start=1)}


def job_pace(*, job: Job, now=None) -> dict:
    """{"steps_per_s", "eta_s"} of a running job (each None when unknown): the steps it has
    done over the seconds since it started, and the seconds left at that pace. The pace counts
    the model loading, so it starts low and settles as the job runs; a finished job keeps the
    pace of its whole run and no ETA."""
    end = job.finished_at if not job.is_active else (now or timezone.now())
    if job.started_at is None or end is None or job.step <= 0:
        return {"steps_per_s": None, "eta_s": None}
    seconds = (end - job.started_at).total_seconds()
    if seconds <= 0:
        return {"steps_per_s": None, "eta_s": None}
    rate = job.step / seconds
    left = job.total_steps - job.step
    running = job.status == Job.Status.RUNNING
    return {
        "steps_per_s": rate,
        "eta_s": round(left / rate) if running and left > 0 else None,
    }


def jobs_with_queue_info(*, jobs: Iterable[Job]) -> list[Job]:
    """The jobs, each with ``queue_position`` (None unless queued), ``steps_per_s`` and
    ``eta_s`` set: what the job list, the job page and the API show of the queue."""
    places = queue_positions()
    now = timezone.now()
    jobs = list(jobs)
    for job in jobs:
        job.queue_position = places.get(job.pk)
        pace = job_pace(job=job, now=now)
        job.steps_per_s, job.eta_s = pace["steps_per_s"], pace["eta_s"]
    return jobs


# --------------------------------------------------------------------------- comparing runs


def metric_final_values(*, job_ids: list[int]) -> dict[int, dict[str, float]]:
    """{job id: {key: the key's last value}} of the jobs: their metrics where they ended (or
    stand now, for a running job)."""
    last = (
        MetricPoint.objects.filter(job_id__in=job_ids)
        .values("job_id", "key")
        .annotate(last=Max("id"))
        .values("last")
    )
    final: dict[int, dict[str, float]] = {}
    for job_id, key, value in MetricPoint.objects.filter(id__in=last).values_list(
        "job_id", "key", "value"
    ):
        final.setdefault(job_id, {})[key] = value
    return final


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_diff(configs: list[dict]) -> list[tuple[str, list]]:
    """(key, [each config's value, None where it has none]) of the keys whose values are not
    the same in every config, nested keys dotted ("lora.r"), sorted by key."""
    flat = [_flat(c) for c in configs]
    keys = sorted(set().union(*flat)) if flat else []
    missing = object()
    rows = []
    for key in keys:
        values = [f.get(key, missing) for f in flat]
        if any(v != values[0] for v in values[1:]):
            rows.append((key, [None if v is missing else v for v in values]))
    return rows


def jobs_compare(*, jobs: list[Job]) -> dict:
    """What the compare page shows beside the curves: {"final": [(key, [value per job])],
    "config": [(key, [value per job])] of the settings that differ}. A job's settings are its
    engine config plus what it started from (kind, base model, parent, reward, data)."""
    final = metric_final_values(job_ids=[j.pk for j in jobs])
    keys = sorted(set().union(*(final.get(j.pk, {}) for j in jobs))) if jobs else []
    settings = [
        {
            "kind": j.kind,
            "base_model": j.base_model,
            "parent_checkpoint": j.parent_checkpoint_id,
            "reward": f"checkpoint #{j.reward_checkpoint_id}"
            if j.reward_checkpoint_id
            else j.reward_rule or None,
            "data": f"{j.input_count} {j.input_kind} ({j.input_hash[:12]})",
            **{k: v for k, v in (j.config or {}).items() if k != "model"},
        }
        for j in jobs
    ]
    return {
        "final": [(key, [final.get(j.pk, {}).get(key) for j in jobs]) for key in keys],
        "config": [
            (key, [v if v is None or isinstance(v, str) else json.dumps(v) for v in values])
            for key, values in config_diff(settings)
        ],
    }
