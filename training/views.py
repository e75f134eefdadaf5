"""Training pages: job list, launch forms, job page (live charts), compare, checkpoint registry.

Every view is for project admins (and superusers) and scoped to their projects through
training.selectors: a job or checkpoint of another project is a 404. Writes are POST with
CSRF (Django's middleware).
"""

from __future__ import annotations

import json
from urllib.parse import urlencode

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from config.ids import MAX_ID, as_id
from training import selectors, services
from training.forms import JobLaunchForm
from training.models import Checkpoint, Job

KIND_HELP = {
    Job.Kind.SFT: "Fine-tune a LoRA policy on demonstrations (imported prompt + completion pairs, "
    "or the completion each ranking put first).",
    Job.Kind.REWARD: "Train a reward model on the project's rankings (all K-choose-2 pairs of each ranking).",
    Job.Kind.DPO: "Train the policy directly on the rankings' preference pairs.",
    Job.Kind.PPO: "Optimise the policy against a reward model or a rule, with a KL penalty to the start.",
    Job.Kind.GRPO: "Group-relative policy optimisation against a reward model or a rule.",
    Job.Kind.SAMPLE: "Generate K completions per prompt from a policy and put them in the labeling queue.",
    Job.Kind.EVAL: "Win rate of checkpoint A over checkpoint B under a reward, optionally sent to labelers.",
}


def _require_admin_somewhere(user) -> None:
    if not user.is_superuser and not selectors.projects_admin_for_user(user=user).exists():
        raise PermissionDenied("Training is for project admins.")


@login_required
@require_GET
def job_list(request):
    _require_admin_somewhere(request.user)
    project_id = request.GET.get("project")
    project = (
        selectors.project_admin_get(user=request.user, project_id=project_id)
        if project_id
        else None
    )
    jobs = selectors.jobs_with_queue_info(
        jobs=selectors.jobs_for_user(user=request.user, project_id=project.pk if project else None)[
            :200
        ]
    )
    for job in jobs:
        job.queue_note = queue_note(job)
    return render(
        request,
        "training/job_list.html",
        {
            "jobs": jobs,
            "project": project,
            "projects": selectors.projects_admin_for_user(user=request.user).order_by("name"),
            "kinds": [(k, label, KIND_HELP[k]) for k, label in Job.Kind.choices],
            "any_active": any(j.is_active for j in jobs),
            "running": [j for j in jobs if j.status == Job.Status.RUNNING],
            "queued": sum(j.status == Job.Status.QUEUED for j in jobs),
        },
    )


@login_required
@require_GET
def job_list_poll(request):
    """What the job list polls: ``?ids=`` (the rows it shows as active) and ``?after=`` (the
    newest job id it knows) give {"cursor": the newest job id, "jobs": [job_summary of each of
    those rows], "new_jobs": how many jobs were launched after ``after``}; ``?project=`` keeps
    to one project as the page does. Only the user's admin projects' jobs are counted."""
    _require_admin_somewhere(request.user)
    project_id = as_id(request.GET.get("project", ""))
    raw = request.GET.get("after", "0").strip()
    after = 0 if raw == "0" else as_id(raw)
    if after is None:
        return JsonResponse({"error": "after must be an integer cursor"}, status=400)
    ids = [i for i in map(as_id, request.GET.get("ids", "").split(",")[:200]) if i is not None]
    mine = selectors.jobs_for_user(user=request.user, project_id=project_id)
    jobs = selectors.jobs_with_queue_info(jobs=mine.filter(pk__in=ids))
    newer = list(mine.filter(pk__gt=after).values_list("pk", flat=True))
    return JsonResponse(
        {
            "cursor": max(newer, default=after),
            "jobs": [job_summary(j) for j in jobs],
            "new_jobs": len(newer),
        }
    )


@login_required
@require_http_methods(["GET", "POST"])
def job_launch(request, kind: str):
    if kind not in Job.Kind.values:
        raise Http404("No such job kind.")
    _require_admin_somewhere(request.user)
    unavailable = _engine_unavailable(kind)
    if unavailable:
        return render(
            request,
            "training/job_launch.html",
            {
                "form": None,
                "kind": kind,
                "kind_label": Job.Kind(kind).label,
                "kind_help": KIND_HELP[kind],
                "unavailable": unavailable,
            },
            status=503,
        )
    initial = {}
    if request.GET.get("project"):
        initial["project"] = selectors.project_admin_get(
            user=request.user, project_id=request.GET["project"]
        ).pk
    for name in ("parent_checkpoint", "compare_checkpoint"):
        if (checkpoint_id := as_id(request.GET.get(name, ""))) is not None:
            initial[name] = checkpoint_id
    if request.GET.get("reward"):  # "checkpoint:N" or "rule:NAME"; the form keeps it if offered
        initial["reward"] = request.GET["reward"]
    if request.method == "POST":
        form = JobLaunchForm(request.POST, kind=kind, user=request.user)
        if form.is_valid():
            try:
                job = services.job_launch(**form.launch_arguments())
            except services.JobLaunchError as exc:
                form.add_launch_error(exc)
            else:
                return redirect("training:job_detail", job_id=job.pk)
    else:
        form = JobLaunchForm(kind=kind, user=request.user, initial=initial)
    return render(
        request,
        "training/job_launch.html",
        {
            "form": form,
            "kind": kind,
            "kind_label": Job.Kind(kind).label,
            "kind_help": KIND_HELP[kind],
        },
    )


def _engine_unavailable(kind: str) -> str:
    """Why the engine cannot run this kind here (its module is missing), or ""."""
    from rlhf.config import config_class
    from rlhf.errors import ConfigError

    try:
        config_class(services.ENGINE_KIND[kind])
    except (ConfigError, ImportError) as exc:
        return str(exc)
    return ""


def checkpoint_actions(c: Checkpoint) -> list[tuple[str, str]]:
    """(label, url) of the jobs to launch from a checkpoint, for its row on the job page and
    the rows that page adds while it polls: a policy is sampled, trained further or
    evaluated; a reward model scores a PPO run (preselected on the form)."""

    def launch(kind: str, **query) -> str:
        return f"{reverse('training:job_launch', args=[kind])}?{urlencode({'project': c.project_id, **query})}"

    if c.role == Checkpoint.Role.POLICY:
        return [
            ("sample", launch("sample", parent_checkpoint=c.pk)),
            ("PPO", launch("ppo", parent_checkpoint=c.pk)),
            ("evaluate", launch("eval", parent_checkpoint=c.pk)),
        ]
    if c.role == Checkpoint.Role.REWARD:
        return [("PPO with it", launch("ppo", reward=f"checkpoint:{c.pk}"))]
    return []


@login_required
@require_GET
def job_detail(request, job_id: int):
    job = selectors.job_get_for_user(user=request.user, job_id=job_id)
    selectors.jobs_with_queue_info(jobs=[job])
    job.queue_note = queue_note(job)
    checkpoints = list(job.checkpoints.order_by("step", "id"))
    for c in checkpoints:
        c.actions = checkpoint_actions(c)
    result = selectors.job_result(job=job)  # with the labelers' verdict of an evaluation
    return render(
        request,
        "training/job_detail.html",
        {
            "job": job,
            "checkpoints": checkpoints,
            "config_json": json.dumps(job.config, indent=2),
            "warnings": selectors.job_warnings(job=job),
            "result_json": json.dumps(result, indent=2) if result else "",
            "human": result.get("human"),
        },
    )


@login_required
@require_GET
def job_metrics(request, job_id: int):
    """Metric points after a cursor, with the job's status: what the job page polls.

    ``?after=<cursor>`` (0 for everything) returns {"cursor", "series": {key: [[step, value],
    ...]}, "job": {...}, "log_tail", "warnings": [{"code", "message"}], "checkpoints"}; pass the
    returned cursor back to get only new points.
    """
    job = selectors.job_get_for_user(user=request.user, job_id=job_id)
    selectors.jobs_with_queue_info(jobs=[job])
    try:
        after = min(max(0, int(request.GET.get("after", "0"))), MAX_ID)
    except ValueError:
        return JsonResponse({"error": "after must be an integer cursor"}, status=400)
    points = selectors.metric_points_after(job=job, after=after)
    return JsonResponse(
        {
            "cursor": points[-1][0] if points else after,
            "more": len(points) >= 5000,
            "series": selectors.metric_series(points),
            "job": job_summary(job),
            "log_tail": job.log_tail,
            "warnings": selectors.job_warnings(job=job),
            "checkpoints": [
                {
                    "id": c.pk,
                    "name": c.name,
                    "role": c.role,
                    "step": c.step,
                    "path": c.path,
                    "url": reverse("training:checkpoint_detail", args=[c.pk]),
                    "actions": [{"label": t, "url": u} for t, u in checkpoint_actions(c)],
                }
                for c in job.checkpoints.order_by("step", "id")
            ],
        }
    )


def duration_text(seconds: float) -> str:
    """An ETA as a person reads it: "45 s", "3 min 5 s", "2 h 10 min"."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def queue_note(job: Job) -> str:
    """Where a job stands, in words, for the job list and the job page (set by
    selectors.jobs_with_queue_info): its place in the queue, or its worker, pace and ETA."""
    if job.status == Job.Status.QUEUED:
        place = getattr(job, "queue_position", None)
        return f"#{place} in the queue" if place else "queued"
    parts = []
    if job.status == Job.Status.RUNNING and job.worker:
        parts.append(f"on {job.worker}")
    rate = getattr(job, "steps_per_s", None)
    if rate:
        parts.append(f"{rate:.2g} steps/s" if rate >= 0.1 else f"{1 / rate:.2g} s/step")
    eta = getattr(job, "eta_s", None)
    if eta is not None:
        parts.append(f"about {duration_text(eta)} left")
    return " · ".join(parts)


def job_summary(job: Job) -> dict:
    """What the job page and the job list poll of a job (after jobs_with_queue_info)."""
    return {
        "id": job.pk,
        "kind": job.kind,
        "status": job.status,
        "step": job.step,
        "total_steps": job.total_steps,
        "progress": job.progress_percent,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "devices": job.devices,
        "cancel_requested": job.cancel_requested,
        "error": job.error,
        "worker": job.worker,
        "heartbeat_at": job.heartbeat_at.isoformat() if job.heartbeat_at else None,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "result": job.result,  # the page shows an evaluation's human verdict server-side
        "is_active": job.is_active,
        "queue_position": getattr(job, "queue_position", None),
        "steps_per_s": getattr(job, "steps_per_s", None),
        "eta_s": getattr(job, "eta_s", None),
        "queue_note": queue_note(job),
    }


@login_required
@require_POST
def job_cancel(request, job_id: int):
    """The answer to the page's "Cancel job…" question (a POST with CSRF); back to the page
    it was asked on (``next``, this site only) or to the job."""
    job = selectors.job_get_for_user(user=request.user, job_id=job_id)
    services.job_cancel(job=job)
    back = request.POST.get("next", "")
    if back and url_has_allowed_host_and_scheme(
        back, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return redirect(back)
    return redirect("training:job_detail", job_id=job.pk)


@login_required
@require_GET
def job_compare(request):
    _require_admin_somewhere(request.user)
    raw = request.GET.getlist("jobs") + request.GET.get("ids", "").split(",")
    ids = [i for i in map(as_id, raw) if i is not None]
    jobs = list(selectors.jobs_for_user(user=request.user).filter(pk__in=ids).order_by("pk"))
    recent = selectors.jobs_for_user(user=request.user).exclude(kind__in=[Job.Kind.SAMPLE])[:50]
    compare = [
        {
            "id": j.pk,
            "label": f"{j.kind} #{j.pk}",
            "url": reverse("training:job_metrics", args=[j.pk]),
        }
        for j in jobs
    ]
    return render(
        request,
        "training/job_compare.html",
        {
            "jobs": jobs,
            "recent": recent,
            "selected": {j.pk for j in jobs},
            "compare": compare,
            **selectors.jobs_compare(jobs=jobs),
        },
    )


@login_required
@require_GET
def checkpoint_list(request):
    _require_admin_somewhere(request.user)
    role = request.GET.get("role")
    if role not in Checkpoint.Role.values:
        role = None
    checkpoints = selectors.checkpoints_for_user(user=request.user, role=role)[:500]
    return render(
        request,
        "training/checkpoint_list.html",
        {"checkpoints": checkpoints, "role": role, "roles": Checkpoint.Role.values},
    )


@login_required
@require_GET
def checkpoint_detail(request, checkpoint_id: int):
    checkpoint = selectors.checkpoint_get_for_user(user=request.user, checkpoint_id=checkpoint_id)
    return render(
        request,
        "training/checkpoint_detail.html",
        {
            "checkpoint": checkpoint,
            "lineage": selectors.checkpoint_lineage(checkpoint=checkpoint),
            "children": checkpoint.children.all(),
            "metrics_json": json.dumps(checkpoint.metrics, indent=2),
        },
    )
