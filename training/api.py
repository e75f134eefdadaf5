"""Training JSON API (mounted under /api/): launch, status, metrics, cancel, checkpoints.

Same rules as the pages: project admins only, scoped to their projects (404 otherwise);
session auth with CSRF, or a bearer token (labeling.auth).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from ninja import Field, Router, Schema, Status
from pydantic import ConfigDict, StrictBool, StrictInt

from config.ids import MAX_ID, Id, QueryId
from config.schemas import INVALID
from training import selectors, services
from training.models import Checkpoint, Job

router = Router(tags=["training"])


class LaunchIn(Schema):
    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not ignored

    kind: str = Field(description="sft, reward, ppo, dpo, grpo, sample or eval")
    project_id: Id
    config: dict = Field(
        default_factory=dict, description="Engine config fields (see rlhf/ dataclasses)."
    )
    base_model: str | None = None
    parent_checkpoint_id: Id | None = Field(
        None, description="Start from this policy checkpoint (eval: A)."
    )
    compare_checkpoint_id: Id | None = Field(
        None, description="Eval only: checkpoint B (null: base model)."
    )
    reward_checkpoint_id: Id | None = None
    reward_rule: str = ""
    max_prompts: Annotated[StrictInt, Field(ge=1)] | None = Field(
        None, description="Use only the first N prompts (null: all)."
    )
    send_to_labelers: StrictBool = Field(
        False, description="Eval only: send the A-vs-B pairs to labelers as items."
    )
    max_attempts: Annotated[StrictInt, Field(ge=1, le=services.MAX_ATTEMPTS)] | None = None
    devices: Annotated[StrictInt, Field(ge=1, le=services.MAX_DEVICES)] = Field(
        1,
        description="Devices (GPUs) to train on, one process each; a worker with as many runs it.",
    )


class JobOut(Schema):
    id: int
    kind: str
    project_id: int
    status: str
    step: int
    total_steps: int
    progress: int
    attempts: int
    max_attempts: int
    devices: int
    cancel_requested: bool
    error: str
    worker: str
    config: dict
    options: dict
    result: dict
    base_model: str
    parent_checkpoint_id: int | None
    compare_checkpoint_id: int | None
    reward_checkpoint_id: int | None
    reward_rule: str
    input_kind: str
    input_count: int
    input_hash: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    checkpoint_ids: list[int]
    queue_position: int | None = Field(
        None, description="Queued jobs: 1-based place in the shared queue (other projects' too)."
    )
    steps_per_s: float | None = Field(
        None, description="Steps done over seconds since the job started (loading included)."
    )
    eta_s: int | None = Field(None, description="Running jobs: seconds left at that pace.")

    @staticmethod
    def resolve_queue_position(obj: Job) -> int | None:
        return _with_queue_info(obj).queue_position

    @staticmethod
    def resolve_steps_per_s(obj: Job) -> float | None:
        return _with_queue_info(obj).steps_per_s

    @staticmethod
    def resolve_eta_s(obj: Job) -> int | None:
        return _with_queue_info(obj).eta_s

    @staticmethod
    def resolve_progress(obj: Job) -> int:
        return obj.progress_percent

    @staticmethod
    def resolve_result(obj: Job) -> dict:
        return selectors.job_result(job=obj)

    @staticmethod
    def resolve_checkpoint_ids(obj: Job) -> list[int]:
        return list(obj.checkpoints.values_list("id", flat=True))


def _with_queue_info(job: Job) -> Job:
    if not hasattr(job, "queue_position"):  # a list is annotated in one go by list_jobs
        selectors.jobs_with_queue_info(jobs=[job])
    return job


class WarningOut(Schema):
    code: str = Field(description="length_cap, eos_collapse, small_held_out, overfit, no_held_out")
    message: str


class MetricsOut(Schema):
    cursor: int
    more: bool
    series: dict[str, list[list[float]]]
    status: str
    step: int
    total_steps: int
    warnings: list[WarningOut] = Field(
        description="What the job's metrics say is wrong with its curves (training.diagnostics)."
    )


class CheckpointOut(Schema):
    id: int
    project_id: int
    role: str
    name: str
    path: str
    base_model: str
    parent_id: int | None
    job_id: int | None
    step: int
    metrics: dict
    created_at: datetime
    input_hash: str | None = None

    @staticmethod
    def resolve_input_hash(obj: Checkpoint) -> str | None:
        return obj.job.input_hash if obj.job_id else None


class ErrorOut(Schema):
    detail: str
    code: str | None = None
    field: str | None = None


def _checkpoint(user, checkpoint_id: int | None) -> Checkpoint | None:
    if checkpoint_id is None:
        return None
    return selectors.checkpoint_get_for_user(user=user, checkpoint_id=checkpoint_id)


@router.post("/training/jobs", response={201: JobOut, 400: ErrorOut, 404: ErrorOut, **INVALID})
def launch_job(request, payload: LaunchIn):
    project = selectors.project_admin_get(user=request.user, project_id=payload.project_id)
    options = {}
    if payload.max_prompts is not None:
        options["max_prompts"] = payload.max_prompts
    if payload.send_to_labelers:
        options["send_to_labelers"] = True
    try:
        job = services.job_launch(
            kind=payload.kind,
            project=project,
            config=payload.config,
            user=request.user,
            base_model=payload.base_model,
            parent_checkpoint=_checkpoint(request.user, payload.parent_checkpoint_id),
            compare_checkpoint=_checkpoint(request.user, payload.compare_checkpoint_id),
            reward_checkpoint=_checkpoint(request.user, payload.reward_checkpoint_id),
            reward_rule=payload.reward_rule,
            options=options,
            max_attempts=payload.max_attempts,
            devices=payload.devices,
        )
    except services.JobLaunchError as exc:
        return Status(400, {"detail": exc.text, "field": exc.field})
    return Status(201, job)


@router.get("/training/jobs", response={200: list[JobOut], **INVALID})
def list_jobs(request, project_id: QueryId | None = None, limit: int = 100):
    return selectors.jobs_with_queue_info(
        jobs=selectors.jobs_for_user(user=request.user, project_id=project_id)[
            : max(1, min(limit, 500))
        ]
    )


@router.get("/training/jobs/{job_id}", response={200: JobOut, 404: ErrorOut, **INVALID})
def get_job(request, job_id: int):
    return selectors.job_get_for_user(user=request.user, job_id=job_id)


@router.get("/training/jobs/{job_id}/metrics", response={200: MetricsOut, 404: ErrorOut, **INVALID})
def get_job_metrics(request, job_id: int, after: Annotated[int, Field(ge=0, le=MAX_ID)] = 0):
    job = selectors.job_get_for_user(user=request.user, job_id=job_id)
    points = selectors.metric_points_after(job=job, after=after)
    return {
        "cursor": points[-1][0] if points else after,
        "more": len(points) >= 5000,
        "series": selectors.metric_series(points),
        "status": job.status,
        "step": job.step,
        "total_steps": job.total_steps,
        "warnings": selectors.job_warnings(job=job),
    }


@router.post("/training/jobs/{job_id}/cancel", response={200: JobOut, 404: ErrorOut, **INVALID})
def cancel_job(request, job_id: int):
    job = selectors.job_get_for_user(user=request.user, job_id=job_id)
    return services.job_cancel(job=job)


@router.get("/training/checkpoints", response={200: list[CheckpointOut], **INVALID})
def list_checkpoints(request, project_id: QueryId | None = None, role: str | None = None):
    return list(
        selectors.checkpoints_for_user(user=request.user, project_id=project_id, role=role)[:500]
    )


@router.get(
    "/training/checkpoints/{checkpoint_id}",
    response={200: CheckpointOut, 404: ErrorOut, **INVALID},
)
def get_checkpoint(request, checkpoint_id: int):
    return selectors.checkpoint_get_for_user(user=request.user, checkpoint_id=checkpoint_id)
