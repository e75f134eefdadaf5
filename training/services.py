"""Writes for the training app: launch, claim, heartbeat, metrics, cancel, finish, recover.

The life of a job::

    job_launch ──on_commit──> job_run task ──job_claim (compare-and-set)──> running
        running: metric_points_write / job_heartbeat, both guarded by the run token
        ──job_finish──> succeeded | failed | cancelled
    a running job whose heartbeat went stale (worker killed) ──jobs_recover_stale──>
        queued again (resumes from its latest complete checkpoint) while attempts remain,
        else failed with the reason.

Only the worker holding the job's current ``run_token`` can write its progress or finish it,
so a job never runs twice at once: a redelivered task message (the broker's visibility
timeout) finds the job running and exits; a worker that lost the job to recovery (it was
frozen, not dead) sees its token gone at the next heartbeat and stops without writing.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from celery import current_app
from django.conf import settings
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.db import transaction
from django.db.models import F
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone

from labeling.models import Completion, Item, Project
from training import selectors
from training.models import Checkpoint, Job, MetricPoint
from training.rewards import REWARD_RULES

logger = logging.getLogger(__name__)

# Which engine config validates each job kind (evaluation generates with the sampling config).
ENGINE_KIND = {
    Job.Kind.SFT: "sft",
    Job.Kind.REWARD: "reward",
    Job.Kind.DPO: "dpo",
    Job.Kind.PPO: "ppo",
    Job.Kind.GRPO: "grpo",
    Job.Kind.SAMPLE: "sample",
    Job.Kind.EVAL: "sample",
}
# The data each kind trains on.
INPUT_KIND = {
    Job.Kind.SFT: Job.Input.DEMONSTRATIONS,
    Job.Kind.REWARD: Job.Input.RANKINGS,
    Job.Kind.DPO: Job.Input.RANKINGS,
    Job.Kind.PPO: Job.Input.PROMPTS,
    Job.Kind.GRPO: Job.Input.PROMPTS,
    Job.Kind.SAMPLE: Job.Input.PROMPTS,
    Job.Kind.EVAL: Job.Input.PROMPTS,
}
# The checkpoint role a successful job registers.
OUTPUT_ROLE = {
    Job.Kind.SFT: Checkpoint.Role.POLICY,
    Job.Kind.DPO: Checkpoint.Role.POLICY,
    Job.Kind.PPO: Checkpoint.Role.POLICY,
    Job.Kind.GRPO: Checkpoint.Role.POLICY,
    Job.Kind.REWARD: Checkpoint.Role.REWARD,
}
NEEDS_REWARD = {Job.Kind.PPO, Job.Kind.GRPO, Job.Kind.EVAL}
# Fields set by the launch choices (base model / parent checkpoint), not by the config JSON.
RESERVED_CONFIG_FIELDS = ("model", "init_adapter")
LOG_TAIL_CHARS = 20_000


def _setting(name: str, default: int) -> int:
    """An int from settings, else the environment, else the default (fails loudly on junk)."""
    value = getattr(settings, name, None)
    if value is not None:
        return int(value)
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None


def stale_after_s() -> int:
    """Seconds without a heartbeat after which a running job counts as lost (worker killed)."""
    return _setting("TRAINING_STALE_AFTER_S", 120)


def heartbeat_every_s() -> int:
    return _setting("TRAINING_HEARTBEAT_S", 10)


def stop_grace_s() -> int:
    """Seconds a stopping engine (cancel, worker shutdown) gets to reach its next step and
    save a checkpoint before its process group is killed."""
    return _setting("TRAINING_STOP_GRACE_S", 60)


def recover_every_s() -> int:
    return _setting("TRAINING_RECOVER_EVERY_S", 30)


MAX_DEVICES = 64
"""The most devices a job may ask for (one node's worth, with room)."""

MAX_ATTEMPTS = 20
"""The most attempts a job may be given (each resumes from the latest checkpoint)."""


def default_max_attempts() -> int:
    return _setting("TRAINING_MAX_ATTEMPTS", 3)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class JobLaunchError(ValidationError):
    """A launch the rules refuse; ``message_dict`` maps form fields to messages."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__({field or NON_FIELD_ERRORS: [message]})
        self.field = field
        self.text = message

    def __str__(self) -> str:
        return self.text


# --------------------------------------------------------------------------- launch


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def base_model_dirs() -> list[Path]:
    """The folders a local base model may live in (settings.BASE_MODEL_DIRS), resolved."""
    roots = getattr(settings, "BASE_MODEL_DIRS", None) or []
    return [Path(r).expanduser().resolve() for r in roots]


def _local_model_allowed(folder: Path) -> bool:
    """Whether a local folder may be loaded as a base model: inside one of BASE_MODEL_DIRS (or
    the DEFAULT_BASE_MODEL folder itself), and never inside CHECKPOINT_DIR (a checkpoint is
    chosen as a parent checkpoint, which is scoped to the project)."""
    real = folder.expanduser().resolve()
    checkpoints = Path(settings.CHECKPOINT_DIR).expanduser().resolve()
    if real == checkpoints or real.is_relative_to(checkpoints):
        return False
    default = Path(settings.DEFAULT_BASE_MODEL or "").expanduser()
    if settings.DEFAULT_BASE_MODEL and default.is_dir() and real == default.resolve():
        return True
    return any(real == root or real.is_relative_to(root) for root in base_model_dirs())


def _check_base_model(base: str) -> None:
    """A base model is a folder under BASE_MODEL_DIRS, or something shaped like a hub id
    (``name`` or ``namespace/name``) that is not a folder elsewhere on this machine.

    The field is typed by a project admin and loaded by the worker, so an arbitrary server
    path would let one project read another project's checkpoint folders (transformers loads
    an adapter folder with its adapter) or probe the server's file system. A folder outside
    the allowed ones gets the same answer as a path that does not exist."""
    refused = JobLaunchError(
        f"Base model {base!r} is neither a folder of the model directories on this machine nor "
        "a hub id such as 'Qwen/Qwen2.5-0.5B-Instruct'.",
        field="base_model",
    )
    if "\x00" in base:
        raise refused
    folder = Path(base).expanduser()
    try:
        exists = folder.exists()
        allowed = exists and folder.is_dir() and _local_model_allowed(folder)
    except (OSError, ValueError):
        raise refused from None
    if exists:
        if allowed:
            return
        raise refused
    looks_like_path = base.startswith(("/", ".", "~")) or "\\" in base or base.count("/") > 1
    if looks_like_path or not _HUB_ID.match(base):
        raise refused


def job_launch(
    *,
    kind: str,
    project: Project,
    config: dict,
    user,
    base_model: str | None = None,
    parent_checkpoint: Checkpoint | None = None,
    reward_checkpoint: Checkpoint | None = None,
    reward_rule: str = "",
    compare_checkpoint: Checkpoint | None = None,
    options: dict | None = None,
    max_attempts: int | None = None,
    devices: int = 1,
) -> Job:
    """Validate, snapshot the input data and enqueue a job (after the transaction commits).

    Raises JobLaunchError (a ValidationError) naming the field at fault: an unknown kind, a
    config the engine's dataclass refuses, a checkpoint of another project or role, a missing
    reward, no data to train on, a device count or attempt limit out of range. Nothing is
    created then.
    """
    from rlhf.config import config_to_dict

    if kind not in Job.Kind.values:
        raise JobLaunchError(
            f"Unknown job kind {kind!r}; choose one of {', '.join(Job.Kind.values)}."
        )
    options = dict(options or {})
    base, init_adapter = _launch_start(
        kind=kind,
        project=project,
        base_model=base_model,
        parent_checkpoint=parent_checkpoint,
        compare_checkpoint=compare_checkpoint,
    )
    _launch_reward(
        kind=kind,
        project=project,
        reward_checkpoint=reward_checkpoint,
        reward_rule=reward_rule,
        options=options,
    )
    cfg = _launch_engine_config(
        kind=kind, project=project, config=config, base=base, init_adapter=init_adapter
    )
    if parent_checkpoint is None:
        _check_base_model(base)
    attempts = _launch_limits(kind=kind, devices=devices, max_attempts=max_attempts)
    input_kind = INPUT_KIND[kind]
    ids, rows = _launch_snapshot(project=project, input_kind=input_kind, options=options)
    rows_hash = selectors.rows_hash(rows)

    with transaction.atomic():
        job = Job.objects.create(
            kind=kind,
            project=project,
            config=config_to_dict(cfg),
            options=options,
            launched_by=user if getattr(user, "is_authenticated", False) else None,
            max_attempts=attempts,
            input_kind=input_kind,
            input_ids=ids,
            input_count=len(rows),
            input_hash=rows_hash,
            base_model=base,
            parent_checkpoint=parent_checkpoint,
            compare_checkpoint=compare_checkpoint,
            reward_checkpoint=reward_checkpoint,
            reward_rule=reward_rule or "",
            total_steps=getattr(cfg, "max_steps", 0) if kind in OUTPUT_ROLE else 0,
            devices=devices,
            enqueued_at=timezone.now(),
            log_tail=_log_line(
                f"launched by {getattr(user, 'username', '?')}: {len(rows)} {input_kind} "
                f"(sha256 {rows_hash[:12]}), base {base}"
                + (f", from checkpoint #{parent_checkpoint.pk}" if parent_checkpoint else "")
            ),
        )
        # the folder is named after the id, which exists only now: the row's one other write
        job.output_dir = str(Path(settings.CHECKPOINT_DIR) / f"job-{job.pk}")
        Job.objects.filter(pk=job.pk).update(output_dir=job.output_dir)
        _job_send(job_id=job.pk, devices=devices)
    return job


def _launch_start(
    *,
    kind: str,
    project: Project,
    base_model: str | None,
    parent_checkpoint: Checkpoint | None,
    compare_checkpoint: Checkpoint | None,
) -> tuple[str, str | None]:
    """(base model, init adapter): what the policy starts from; an evaluation's A and B."""
    if parent_checkpoint is not None:
        _check_checkpoint(
            parent_checkpoint,
            project=project,
            role=Checkpoint.Role.POLICY,
            field="parent_checkpoint",
        )
        base, init_adapter = parent_checkpoint.base_model, parent_checkpoint.path
    else:
        base, init_adapter = (base_model or "").strip() or settings.DEFAULT_BASE_MODEL, None
    if kind != Job.Kind.EVAL:
        if compare_checkpoint is not None:
            raise JobLaunchError(
                "Only an evaluation compares two checkpoints.", field="compare_checkpoint"
            )
        return base, init_adapter
    if parent_checkpoint is None:
        raise JobLaunchError(
            "An evaluation needs checkpoint A (the policy to evaluate).", field="parent_checkpoint"
        )
    if compare_checkpoint is not None:
        _check_checkpoint(
            compare_checkpoint,
            project=project,
            role=Checkpoint.Role.POLICY,
            field="compare_checkpoint",
        )
        if compare_checkpoint.base_model != base:
            raise JobLaunchError(
                f"Checkpoint B was trained on {compare_checkpoint.base_model!r}, A on {base!r}; "
                "compare checkpoints of the same base model.",
                field="compare_checkpoint",
            )
    return base, None  # the task loads A and B in turn


def _launch_reward(
    *,
    kind: str,
    project: Project,
    reward_checkpoint: Checkpoint | None,
    reward_rule: str,
    options: dict,
) -> None:
    """The reward (a reward-model checkpoint or a built-in rule) of the kinds that need one."""
    if kind not in NEEDS_REWARD:
        if reward_checkpoint is not None or reward_rule:
            raise JobLaunchError(f"A {kind} job takes no reward.", field="reward")
    elif reward_checkpoint is not None and reward_rule:
        raise JobLaunchError("Choose a reward model or a rule reward, not both.", field="reward")
    elif reward_checkpoint is None and not reward_rule:
        raise JobLaunchError(
            "Choose a reward: a reward-model checkpoint or a built-in rule.", field="reward"
        )
    elif reward_checkpoint is not None:
        _check_checkpoint(
            reward_checkpoint, project=project, role=Checkpoint.Role.REWARD, field="reward"
        )
    elif reward_rule not in REWARD_RULES:
        raise JobLaunchError(
            f"Unknown reward rule {reward_rule!r}; choose one of {', '.join(REWARD_RULES)}.",
            field="reward",
        )
    if options.get("send_to_labelers") and kind != Job.Kind.EVAL:
        raise JobLaunchError(
            "Only an evaluation sends its A-vs-B pairs to labelers.", field="send_to_labelers"
        )


def _launch_engine_config(
    *, kind: str, project: Project, config: dict, base: str, init_adapter: str | None
):
    """The engine's config dataclass for the job, or a JobLaunchError naming what it refuses."""
    from rlhf.config import config_from_dict
    from rlhf.errors import ConfigError

    if not isinstance(config, dict):
        raise JobLaunchError("The config must be a JSON object.", field="config")
    reserved = [k for k in RESERVED_CONFIG_FIELDS if k in config]
    if reserved:
        raise JobLaunchError(
            f"Set {' and '.join(reserved)} with the base model / checkpoint choice, not in the config.",
            field="config",
        )
    if kind == Job.Kind.SAMPLE:  # every item of the project shows K completions
        k = config.get("num_completions", project.k)
        if k != project.k:
            raise JobLaunchError(
                f"num_completions is {k!r}, but the items of {project.name} show "
                f"K = {project.k} completions: use {project.k}.",
                field="config",
            )
        config = {**config, "num_completions": project.k}
    try:
        return config_from_dict(
            ENGINE_KIND[kind], {**config, "model": base, "init_adapter": init_adapter}
        )
    except ConfigError as exc:
        raise JobLaunchError(f"Invalid config: {exc}", field="config") from None


def _launch_limits(*, kind: str, devices: int, max_attempts: int | None) -> int:
    """Check the device count; the job's attempt limit."""
    if not isinstance(devices, int) or not 1 <= devices <= MAX_DEVICES:
        raise JobLaunchError(f"devices must be between 1 and {MAX_DEVICES}.", field="devices")
    if devices > 1 and kind not in OUTPUT_ROLE:
        raise JobLaunchError(f"A {kind} job runs on one device.", field="devices")
    if max_attempts is not None and not 1 <= max_attempts <= MAX_ATTEMPTS:
        raise JobLaunchError(f"max_attempts must be between 1 and {MAX_ATTEMPTS}.")
    return max_attempts if max_attempts is not None else default_max_attempts()


def _launch_snapshot(
    *, project: Project, input_kind: str, options: dict
) -> tuple[list[int], list[dict]]:
    """The ids the job trains on, frozen now, and their engine rows."""
    max_prompts = options.get("max_prompts")
    if max_prompts is not None and (not isinstance(max_prompts, int) or max_prompts < 1):
        raise JobLaunchError("max_prompts must be a positive integer.", field="config")
    ids = _snapshot_ids(project=project, input_kind=input_kind, limit=max_prompts)
    if not ids:
        raise JobLaunchError(_NO_DATA[input_kind].format(project=project.name))
    return ids, selectors.input_rows(input_kind=input_kind, ids=ids)


_NO_DATA = {
    Job.Input.RANKINGS: "Project {project!r} has no rankings with a preference yet: rank some items or import preferences.",
    Job.Input.PROMPTS: "Project {project!r} has no prompts yet: import some.",
    Job.Input.DEMONSTRATIONS: (
        "Project {project!r} has no demonstrations yet: import prompt + completion pairs, "
        "or rank items (each ranking's single best completion is a demonstration)."
    ),
}


def _snapshot_ids(*, project: Project, input_kind: str, limit: int | None) -> list[int]:
    if input_kind == Job.Input.RANKINGS:
        return selectors.ranking_ids_for_project(project=project)
    if input_kind == Job.Input.DEMONSTRATIONS:
        return selectors.demonstration_ids_for_project(project=project)
    return selectors.prompt_ids_for_project(project=project, limit=limit)


def _check_checkpoint(ckpt: Checkpoint, *, project: Project, role: str, field: str) -> None:
    if ckpt.project_id != project.pk:
        raise JobLaunchError(f"Checkpoint #{ckpt.pk} belongs to another project.", field=field)
    if ckpt.role != role:
        raise JobLaunchError(
            f"Checkpoint #{ckpt.pk} is a {ckpt.role} checkpoint, not a {role} one.", field=field
        )


def job_queue(devices: int) -> str:
    """The Celery queue of a job on ``devices`` devices: "gpu" for one, "gpu-N" for N. A worker
    with D devices consumes gpu, gpu-2 ... gpu-D (training.worker), so it takes only jobs that
    fit."""
    return "gpu" if devices <= 1 else f"gpu-{devices}"


def job_enqueue(*, job: Job) -> None:
    """Send the job's task again (a released or recovered job), to the queue of its size,
    once the current transaction commits."""
    job_id = job.pk
    Job.objects.filter(pk=job_id).update(enqueued_at=timezone.now())
    devices = Job.objects.filter(pk=job_id).values_list("devices", flat=True).first() or 1
    _job_send(job_id=job_id, devices=devices)


def _job_send(*, job_id: int, devices: int) -> None:
    """The job's task, by name (services do not import the tasks that call them), sent after
    the commit: never before the row exists."""
    queue = job_queue(devices)
    transaction.on_commit(
        lambda: current_app.send_task("training.job_run", args=[job_id], queue=queue)
    )


# --------------------------------------------------------------------------- running


def job_claim(*, job_id: int, worker: str) -> str | None:
    """Take a queued job: compare-and-set queued -> running. Returns the run token, or None
    when another worker has it (or it was cancelled or finished meanwhile)."""
    token = uuid.uuid4().hex
    now = timezone.now()
    claimed = Job.objects.filter(
        pk=job_id, status=Job.Status.QUEUED, cancel_requested=False
    ).update(
        status=Job.Status.RUNNING,
        run_token=token,
        worker=worker[:255],
        heartbeat_at=now,
        started_at=Coalesce(F("started_at"), now),
        attempts=F("attempts") + 1,
        error="",
    )
    return token if claimed == 1 else None


@dataclass
class Heartbeat:
    owned: bool  # False: the job was taken from this worker (recovered, cancelled while queued...)
    cancel_requested: bool


def job_heartbeat(*, job_id: int, token: str) -> Heartbeat:
    """Prove the worker is alive; tells whether it still owns the job and whether to stop."""
    owned = (
        Job.objects.filter(pk=job_id, run_token=token, status=Job.Status.RUNNING).update(
            heartbeat_at=timezone.now()
        )
        == 1
    )
    cancel = bool(Job.objects.filter(pk=job_id).values_list("cancel_requested", flat=True).first())
    return Heartbeat(owned=owned, cancel_requested=cancel)


def job_stop_requested(*, job_id: int, token: str) -> Heartbeat:
    """The cancel flag and ownership, read in one cheap query (no write)."""
    row = (
        Job.objects.filter(pk=job_id).values_list("cancel_requested", "run_token", "status").first()
    )
    if row is None:
        return Heartbeat(owned=False, cancel_requested=True)
    cancel, run_token, status = row
    return Heartbeat(
        owned=run_token == token and status == Job.Status.RUNNING, cancel_requested=cancel
    )


def _owned_log_tail_for_update(*, job_id: int, token: str) -> str | None:
    """Lock the job row while `token` still owns the running job and return its log tail;
    None when the job is no longer ours (cancelled, failed, or claimed again)."""
    return (
        Job.objects.select_for_update()
        .filter(pk=job_id, run_token=token, status=Job.Status.RUNNING)
        .values_list("log_tail", flat=True)
        .first()
    )


def metric_points_write(
    *,
    job_id: int,
    token: str,
    points: list[tuple[int, str, float]],
    step: int | None = None,
    total_steps: int | None = None,
    log_lines: list[str] | None = None,
) -> bool:
    """Write a batch of (step, key, value) points, the progress and new log lines, in one
    transaction, only while ``token`` owns the job. Non-finite values are dropped (JSON has
    no NaN; a NaN loss fails the job anyway). Returns False when the job is no longer ours."""
    updates: dict = {"heartbeat_at": timezone.now()}
    if step is not None:
        updates["step"] = max(0, int(step))
    if total_steps is not None and total_steps > 0:
        updates["total_steps"] = int(total_steps)
    with transaction.atomic():
        row = _owned_log_tail_for_update(job_id=job_id, token=token)
        if row is None:
            return False
        if log_lines:
            updates["log_tail"] = _tail(row + "".join(_log_line(line) for line in log_lines))
        Job.objects.filter(pk=job_id).update(**updates)
        MetricPoint.objects.bulk_create(
            MetricPoint(job_id=job_id, step=int(s), key=str(k)[:64], value=float(v))
            for s, k, v in points
            if isinstance(v, (int, float)) and math.isfinite(v)
        )
    return True


def metric_points_discard_after(*, job_id: int, token: str, step: int) -> int:
    """On resume: drop the points a lost attempt wrote past the checkpoint it resumes from,
    so the curves have one value per step, and set the progress back to that step. Returns
    the number of points deleted."""
    if not Job.objects.filter(pk=job_id, run_token=token, status=Job.Status.RUNNING).update(
        step=step
    ):
        return 0
    deleted, _ = MetricPoint.objects.filter(job_id=job_id, step__gt=step).delete()
    return deleted


def job_log(*, job_id: int, token: str | None, line: str) -> None:
    """Append a line to the job's log tail (owner-guarded when a token is given)."""
    with transaction.atomic():
        rows = Job.objects.select_for_update().filter(pk=job_id)
        if token is not None:
            rows = rows.filter(run_token=token)
        tail = rows.values_list("log_tail", flat=True).first()
        if tail is None:
            return
        Job.objects.filter(pk=job_id).update(log_tail=_tail(tail + _log_line(line)))


def job_finish(
    *,
    job_id: int,
    token: str,
    status: str,
    error: str = "",
    result: dict | None = None,
    step: int | None = None,
    log_line: str = "",
) -> bool:
    """End a running job as succeeded, failed or cancelled. Owner-guarded; returns whether
    this call ended it."""
    if status not in Job.FINAL_STATUSES:
        raise ValueError(f"{status!r} is not a final status")
    updates: dict = {
        "status": status,
        "finished_at": timezone.now(),
        "error": error[:10_000],
        "run_token": "",
    }
    if result is not None:
        updates["result"] = result
    if step is not None:
        updates["step"] = max(0, int(step))
    with transaction.atomic():
        tail = _owned_log_tail_for_update(job_id=job_id, token=token)
        if tail is None:
            return False
        line = log_line or (f"{status}: {error}" if error else status)
        updates["log_tail"] = _tail(tail + _log_line(line))
        Job.objects.filter(pk=job_id).update(**updates)
        if status == Job.Status.SUCCEEDED and (result or {}).get("checkpoint_id"):
            items_score_enqueue(job_id=job_id, checkpoint_id=int(result["checkpoint_id"]))
    return True


def items_score_enqueue(*, job_id: int, checkpoint_id: int) -> None:
    """A reward model just finished: score the project's items with it, so the disagreements
    page and disagreement routing (labeling.routing) use the current reward model."""
    job = Job.objects.filter(pk=job_id).values("kind", "project_id").first()
    if job is None or job["kind"] != Job.Kind.REWARD:
        return
    args = [job["project_id"], checkpoint_id]
    transaction.on_commit(
        lambda: current_app.send_task("training.items_score", args=args, queue=job_queue(1))
    )


def job_cancel(*, job: Job) -> Job:
    """Cancel cooperatively: a queued job ends at once; a running one gets the flag its worker
    checks every step (the engine saves a checkpoint and returns). Never kills a process."""
    now = timezone.now()
    if Job.objects.filter(pk=job.pk, status=Job.Status.QUEUED).update(
        status=Job.Status.CANCELLED, cancel_requested=True, finished_at=now
    ):
        job_log(job_id=job.pk, token=None, line="cancelled while queued")
    else:
        if Job.objects.filter(pk=job.pk, status=Job.Status.RUNNING, cancel_requested=False).update(
            cancel_requested=True
        ):
            job_log(
                job_id=job.pk, token=None, line="cancel requested; stopping after the current step"
            )
    job.refresh_from_db()
    return job


def checkpoint_register(
    *,
    job: Job,
    path: str | Path,
    role: str,
    step: int = 0,
    metrics: dict | None = None,
    parent: Checkpoint | None = None,
    name: str = "",
) -> Checkpoint:
    """Record a checkpoint folder with its lineage (producing job, base model, parent)."""
    finite = {
        k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)
    }
    ckpt, _ = Checkpoint.objects.get_or_create(
        path=str(path),
        role=role,
        defaults={
            "project_id": job.project_id,
            "name": name or f"{job.kind} #{job.pk} {role} step {step}",
            "base_model": job.base_model,
            "parent": parent,
            "job": job,
            "step": step,
            "metrics": finite,
        },
    )
    return ckpt


def checkpoint_register_output(
    *, job: Job, path: str | Path, step: int, metrics: dict | None = None, stopped: bool = False
) -> Checkpoint:
    """Register a checkpoint folder a training job wrote, in its output role (and, for PPO,
    the value adapter + head it also holds, with the policy as parent). Called as soon as the
    folder is complete (live checkpoints: sample from or evaluate a running job's step 20) and
    again for the final one; registering a folder twice returns the first row."""
    metrics = metrics or {}
    name = f"{job.kind} #{job.pk} step {step}" + (" (cancelled)" if stopped else "")
    ckpt = checkpoint_register(
        job=job,
        path=path,
        role=OUTPUT_ROLE[job.kind],
        step=step,
        metrics=metrics,
        parent=job.parent_checkpoint,
        name=name,
    )
    if stopped and ckpt.name != name:  # registered live, then the run stopped on it
        Checkpoint.objects.filter(pk=ckpt.pk).update(name=name)
        ckpt.name = name
    if job.kind == Job.Kind.PPO and (Path(path) / "value").is_dir():
        checkpoint_register(
            job=job,
            path=path,
            role=Checkpoint.Role.VALUE,
            step=step,
            metrics={k: v for k, v in metrics.items() if k.startswith(("loss/value", "value/"))},
            parent=ckpt,
            name=f"ppo #{job.pk} value step {step}",
        )
    return ckpt


def samples_store(
    *,
    job: Job,
    prompt_ids: list[int],
    samples: list[dict],
    checkpoint: Checkpoint | None,
    item_source: str = Item.Source.QUEUE,
) -> dict:
    """Write sampled completions into the project's labeling queue: one Completion
    (source model) per sample and one item per prompt showing its K completions.

    ``samples`` is the engine's list of {"prompt", "completions": [{"text", "num_tokens"}],
    "generation"}, aligned with ``prompt_ids``.
    """
    from labeling import services as labeling_services

    prompts = selectors.prompts_by_id(prompt_ids=prompt_ids)
    model_name = checkpoint.name if checkpoint else job.base_model
    n_completions = n_items = 0
    with transaction.atomic():
        for pid, sample in zip(prompt_ids, samples, strict=False):
            prompt = prompts.get(pid)
            if prompt is None:
                continue
            made = []
            for c in sample.get("completions", []):
                generation = {
                    **(sample.get("generation") or {}),
                    "num_tokens": c.get("num_tokens"),
                    "job_id": job.pk,
                }
                made.append(
                    labeling_services.completion_create(
                        prompt=prompt,
                        text=c["text"],
                        source=Completion.Source.MODEL,
                        checkpoint_id=checkpoint.pk if checkpoint else None,
                        model_name=model_name[:500],
                        generation=generation,
                    )
                )
            n_completions += len(made)
            if 2 <= len(made) <= 9:
                labeling_services.item_create(
                    project=job.project, prompt=prompt, completions=made, source=item_source
                )
                n_items += 1
    return {"prompts": len(prompt_ids), "completions": n_completions, "items": n_items}


def eval_pairs_store(
    *, job: Job, pairs: list[dict], checkpoint_a: Checkpoint, checkpoint_b: Checkpoint | None
) -> int:
    """Send A-vs-B pairs to labelers: per prompt, A's and B's completions as an item of 2
    (source eval). ``pairs`` holds {"prompt_id", "a", "b"} and optionally the reward model's
    scores "reward_a", "reward_b", kept with each completion so that the labelers' verdicts
    can be set beside the reward model's (selectors.eval_human_result). Returns the number
    of items."""
    from labeling import services as labeling_services

    prompts = selectors.prompts_by_id(prompt_ids=[p["prompt_id"] for p in pairs])
    n = 0
    with transaction.atomic():
        for pair in pairs:
            prompt = prompts.get(pair["prompt_id"])
            if prompt is None or pair["a"] == pair["b"]:
                continue
            made = [
                labeling_services.completion_create(
                    prompt=prompt,
                    text=text,
                    source=Completion.Source.MODEL,
                    checkpoint_id=ckpt.pk if ckpt else None,
                    model_name=(ckpt.name if ckpt else job.base_model)[:500],
                    generation={
                        "job_id": job.pk,
                        "eval_side": side,
                        **({"reward": score} if score is not None else {}),
                    },
                )
                for side, text, ckpt, score in (
                    ("a", pair["a"], checkpoint_a, pair.get("reward_a")),
                    ("b", pair["b"], checkpoint_b, pair.get("reward_b")),
                )
            ]
            labeling_services.item_create(
                project=job.project, prompt=prompt, completions=made, source=Item.Source.EVAL
            )
            n += 1
    return n


# --------------------------------------------------------------------------- recovery


@dataclass
class RecoveryReport:
    requeued: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)


def jobs_recover_stale(*, stale_after_s: float, now=None) -> RecoveryReport:
    """Find running jobs whose heartbeat is older than ``stale_after_s`` (their worker died:
    kill -9, OOM killer, lost machine) and requeue them to resume from their latest complete
    checkpoint, or fail them with the reason once ``max_attempts`` is spent. Each change is a
    compare-and-set on the stale token, so concurrent recoverers (every worker runs one) and a
    worker that comes back to life never both win."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=stale_after_s)
    report = RecoveryReport()
    stale = Job.objects.filter(status=Job.Status.RUNNING, heartbeat_at__lt=cutoff).values_list(
        "id", "run_token", "attempts", "max_attempts", "cancel_requested", "worker", "heartbeat_at"
    )
    for job_id, token, attempts, max_attempts, cancel, worker, beat in list(stale):
        silent = int((now - beat).total_seconds())
        same = Job.objects.filter(
            pk=job_id, status=Job.Status.RUNNING, run_token=token, heartbeat_at=beat
        )
        with transaction.atomic():
            if cancel:
                if same.update(status=Job.Status.CANCELLED, run_token="", finished_at=now):
                    job_log(
                        job_id=job_id,
                        token=None,
                        line=f"worker {worker} lost; the job was being cancelled",
                    )
                    report.cancelled.append(job_id)
            elif attempts < max_attempts:
                if same.update(status=Job.Status.QUEUED, run_token="", worker=""):
                    job_log(
                        job_id=job_id,
                        token=None,
                        line=f"worker {worker} lost (no heartbeat for {silent} s); requeued, "
                        f"attempt {attempts + 1} of {max_attempts} resumes from the latest checkpoint",
                    )
                    job_enqueue(job=Job(pk=job_id))
                    report.requeued.append(job_id)
            else:
                reason = (
                    f"Worker lost: no heartbeat from {worker} for {silent} s "
                    f"(the process was killed or the machine died); gave up after {attempts} "
                    f"attempt{'s' if attempts != 1 else ''} (max_attempts={max_attempts})."
                )
                if same.update(
                    status=Job.Status.FAILED, run_token="", error=reason, finished_at=now
                ):
                    job_log(job_id=job_id, token=None, line=reason)
                    report.failed.append(job_id)
    return report


def jobs_release_host(*, host: str) -> list[int]:
    """Put the jobs running on ``host`` back in the queue after its workers were stopped on
    purpose (``manage.py studio`` on Ctrl-C): they resume from their latest checkpoint when a
    worker starts again (it re-sends queued jobs), and the interrupted attempt is not counted.
    Only for a host whose workers are known to be stopped."""
    ids = list(
        Job.objects.filter(status=Job.Status.RUNNING, worker__startswith=f"{host}:").values_list(
            "id", flat=True
        )
    )
    line = "worker stopped; queued to resume from the latest checkpoint"
    released = [job_id for job_id in ids if job_release(job_id=job_id, token=None, line=line)]
    # a job whose cancel was pending ends as cancelled (its worker is gone)
    for job_id in set(ids) - set(released):
        if Job.objects.filter(pk=job_id, status=Job.Status.RUNNING, cancel_requested=True).update(
            status=Job.Status.CANCELLED, run_token="", finished_at=timezone.now()
        ):
            job_log(job_id=job_id, token=None, line="worker stopped; cancelled as asked")
    return released


def job_release(*, job_id: int, token: str | None, line: str) -> bool:
    """Put a running job back in the queue, this attempt not counted, and send its task again:
    its worker is shutting down on purpose, and the next worker resumes it from its latest
    checkpoint. Guarded by the run token when one is given. A job someone asked to cancel is
    not released (the caller ends it as cancelled). Returns whether it was released."""
    rows = Job.objects.filter(pk=job_id, status=Job.Status.RUNNING, cancel_requested=False)
    if token is not None:
        rows = rows.filter(run_token=token)
    with transaction.atomic():
        released = rows.update(
            status=Job.Status.QUEUED,
            run_token="",
            worker="",
            attempts=Greatest(F("attempts") - 1, 0),
        )
        if released:
            job_log(job_id=job_id, token=None, line=line)
            job_enqueue(job=Job(pk=job_id))
    return bool(released)


def jobs_requeue_waiting(*, older_than_s: float = 0) -> list[int]:
    """Send the task again for queued jobs enqueued more than ``older_than_s`` ago: their
    message may have been lost with a broker that restarted without persistence. Duplicate
    messages are harmless: only one claim can succeed."""
    cutoff = timezone.now() - timedelta(seconds=older_than_s)
    ids = list(
        Job.objects.filter(
            status=Job.Status.QUEUED, cancel_requested=False, enqueued_at__lte=cutoff
        ).values_list("id", flat=True)
    )
    with transaction.atomic():
        for job_id in ids:
            job_enqueue(job=Job(pk=job_id))
    return ids


# --------------------------------------------------------------------------- helpers


def _log_line(text: str) -> str:
    return f"{timezone.now():%Y-%m-%d %H:%M:%S} {text.rstrip()}\n"


def _tail(text: str) -> str:
    if len(text) <= LOG_TAIL_CHARS:
        return text
    cut = text[-LOG_TAIL_CHARS:]
    return cut[cut.find("\n") + 1 :] if "\n" in cut else cut
