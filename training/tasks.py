"""Celery tasks: thin supervisors between the broker, the engine and training.services.

``job_run(job_id)`` (queue "gpu"): claim the job with a compare-and-set update (exit if
another worker has it), read its frozen input rows through selectors, write them with the
config into the job's run folder, start the engine on them as a child process group and turn
its events into service calls (training.runtime), register the checkpoint and finish the job.
Errors the engine names (NaN loss, out of memory, bad config or data) end the job as failed
with its message; the worker never trains in its own process.

``jobs_recover_stale()`` (queue "default") is the same recovery the workers run in a loop
(training.worker); it is a task too, so a beat schedule or an operator can trigger it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from celery import shared_task

from training import evaluation, runtime, selectors, services
from training.models import Checkpoint, Job
from training.rewards import reward_rule_get
from training.runtime import JobMonitor, stop_on_sigterm

logger = logging.getLogger(__name__)


@shared_task(name="training.job_run", acks_late=True, ignore_result=True)  # sent to queue "gpu"
def job_run(job_id: int) -> str:
    # From the claim to the last write, a worker's SIGTERM stops the job at its next step
    # instead of ending the process between two of these writes (training.runtime).
    with stop_on_sigterm():
        return _job_run(job_id)


def _job_run(job_id: int) -> str:
    token = services.job_claim(job_id=job_id, worker=services.worker_name())
    if token is None:
        logger.info("job %s: not claimed (running elsewhere, cancelled or finished)", job_id)
        return "not claimed"
    job = Job.objects.select_related(
        "project", "parent_checkpoint", "compare_checkpoint", "reward_checkpoint"
    ).get(pk=job_id)
    monitor = JobMonitor(
        job_id=job_id,
        token=token,
        total_steps=job.total_steps,
        save_every=int(job.config.get("save_every") or 0),
        on_checkpoint=_live_checkpoint(job) if job.kind in services.OUTPUT_ROLE else None,
    )
    status, error, result = Job.Status.FAILED, "", {}
    with monitor:
        on = f"{job.devices} devices (torchrun)" if job.devices > 1 else "1 device"
        monitor.log(f"attempt {job.attempts} of {job.max_attempts} on {job.worker}, {on}")
        monitor.flush()
        try:
            rows = _frozen_rows(job)
            run_kind = {Job.Kind.SAMPLE: _run_sample, Job.Kind.EVAL: _run_eval}.get(
                job.kind, _run_training
            )
            status, result = run_kind(job, rows, monitor)
        except Exception as exc:  # every failure ends the job with its reason, never silently
            status, error = Job.Status.FAILED, _failure_reason(exc, job_id)
    if monitor.lost:
        logger.warning("job %s: taken from this worker (stale heartbeat); not finishing it", job_id)
        return "lost"
    if status == RELEASED:
        if services.job_release(
            job_id=job_id,
            token=token,
            line=f"worker shutting down: stopped at step {monitor.step}; queued to resume "
            "from the latest checkpoint",
        ):
            return RELEASED
        status = Job.Status.CANCELLED  # a cancel came in after the last check: it wins
    services.job_finish(
        job_id=job_id,
        token=token,
        status=status,
        error=error,
        result=result,
        step=monitor.step or None,
    )
    return status


@shared_task(name="training.items_score", ignore_result=True)  # sent to queue "gpu"
def items_score(project_id: int, checkpoint_id: int) -> int:
    """Score a project's items with a finished reward model (labeling.routing): what the
    disagreements page lists and disagreement routing sends first. Inference only, in this
    process, like an evaluation's reward scoring."""
    from labeling.models import Project
    from labeling.routing import item_scores_compute

    ckpt = Checkpoint.objects.filter(pk=checkpoint_id, project_id=project_id).first()
    project = Project.objects.filter(pk=project_id).first()
    if ckpt is None or project is None:
        return 0
    try:
        return item_scores_compute(
            project=project, checkpoint_path=ckpt.path, checkpoint_id=ckpt.pk
        )
    except Exception:  # the page keeps the previous scores and says how to score again
        logger.exception(
            "scoring the items of project %s with checkpoint %s failed", project_id, checkpoint_id
        )
        return 0


@shared_task(name="training.jobs_recover_stale", ignore_result=True)
def jobs_recover_stale() -> dict:
    report = services.jobs_recover_stale(stale_after_s=services.stale_after_s())
    return dataclasses.asdict(report)


class DataChangedError(RuntimeError):
    pass


class EngineFailed(RuntimeError):
    """The engine child ended without a result; the message is the job's error."""


def _frozen_rows(job: Job) -> list[dict]:
    rows = selectors.input_rows(input_kind=job.input_kind, ids=job.input_ids)
    if selectors.rows_hash(rows) != job.input_hash:
        raise DataChangedError(
            f"the {job.input_kind} this job was launched on changed or were deleted "
            f"({len(rows)} of {job.input_count} left); launch a new job"
        )
    return rows


RELEASED = "released"
"""What a kind returns when it stopped because the worker is shutting down (not a job status:
the job goes back to the queue)."""


def _stopped(monitor: JobMonitor) -> str:
    return RELEASED if monitor.released else Job.Status.CANCELLED


# --------------------------------------------------------------------------- kinds


def _live_checkpoint(job: Job):
    """Register each checkpoint the engine completes while the job runs (JobMonitor calls it
    with the folder), so it can be sampled from or evaluated before the job ends."""
    from rlhf.checkpoint import read_state

    def register(path: Path) -> None:
        state = read_state(path)
        ckpt = services.checkpoint_register_output(
            job=job, path=path, step=int(state.get("step", 0)), metrics=state.get("metrics")
        )
        logger.info("job %s: checkpoint #%s registered while running", job.pk, ckpt.pk)

    return register


def _reward_args(job: Job) -> dict:
    """The engine's reward: a reward-model folder, or a rule as ``module:function`` the child
    imports (training.rewards needs no Django)."""
    if job.reward_checkpoint_id:
        return {"reward_model": job.reward_checkpoint.path}
    if job.reward_rule:
        fn = reward_rule_get(job.reward_rule).fn
        return {"reward_fn": f"{fn.__module__}:{fn.__name__}"}
    return {}


RUN_DIR = "engine"
"""The folder inside a job's output folder with what its engine child reads (config.json,
data.jsonl) and its stderr (engine.log)."""


def _engine(
    job: Job,
    rows: list[dict],
    monitor: JobMonitor,
    *,
    kind: str,
    output_dir: str,
    config: dict | None = None,
    resume: bool = False,
    steps: bool = True,
    **reward: str,
) -> dict:
    """Run the engine on ``rows`` in a child process group and return its ``result`` event
    (a stopped one when it was stopped and killed before it said so). Raises EngineFailed
    with the reason when it failed. ``config`` defaults to the job's; ``steps`` False keeps
    the engine's steps off the job's progress and curves."""
    from rlhf.data import write_jsonl

    run_dir = Path(job.output_dir) / RUN_DIR
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(job.config if config is None else config))
    write_jsonl(run_dir / "data.jsonl", rows)
    command = runtime.engine_command(
        kind,
        run_dir=run_dir,
        output_dir=output_dir,
        devices=job.devices,
        resume=resume,
        stop_grace_s=services.stop_grace_s(),
        **reward,
    )
    outcome = runtime.engine_run(
        command,
        monitor=monitor,
        log_path=run_dir / runtime.ENGINE_LOG,
        stop_grace_s=services.stop_grace_s(),
        steps=steps,
    )
    if outcome.result is not None:
        return outcome.result
    if outcome.stop_sent and outcome.failure is None:  # killed, or stopped before it could say
        return {"stopped": True, "step": monitor.step, "checkpoint": None, "metrics": {}}
    raise EngineFailed(outcome.reason())


def _run_training(job: Job, rows: list[dict], monitor: JobMonitor) -> tuple[str, dict]:
    from rlhf.checkpoint import latest_checkpoint, read_state

    model, adapter = job.config.get("model"), job.config.get("init_adapter")
    monitor.log(f"loading {model}" + (f" with adapter {adapter}" if adapter else ""))
    resume = latest_checkpoint(job.output_dir)
    start_step = int(read_state(resume).get("step", 0)) if resume is not None else 0
    # A retried attempt continues from its checkpoint (or from scratch): drop the points the
    # lost attempt wrote past it so every step has one value.
    services.metric_points_discard_after(job_id=job.pk, token=monitor.token, step=start_step)
    monitor.step = start_step
    if resume is not None:
        monitor.log(f"resuming from {resume.name} (step {start_step})")
    elif job.attempts > 1:
        monitor.log(
            "no checkpoint was saved before the worker was lost: starting again from step 0"
        )
    monitor.flush()
    result = _engine(
        job,
        rows,
        monitor,
        kind=services.ENGINE_KIND[job.kind],
        output_dir=job.output_dir,
        resume=resume is not None,
        **_reward_args(job),
    )
    if monitor.lost:
        return Job.Status.FAILED, {}
    step, stopped, metrics = int(result["step"]), bool(result["stopped"]), result["metrics"]
    monitor.step = step
    if stopped and monitor.released:  # its checkpoint is where the next worker resumes
        return RELEASED, {}
    summary = {"step": step, "metrics": _finite(metrics)}
    if result["checkpoint"] is not None:
        ckpt = services.checkpoint_register_output(
            job=job, path=result["checkpoint"], step=step, metrics=metrics, stopped=stopped
        )
        summary["checkpoint_id"] = ckpt.pk
        monitor.log(f"checkpoint #{ckpt.pk}: {result['checkpoint']}")
        value = ckpt.children.filter(role=Checkpoint.Role.VALUE, path=ckpt.path).first()
        if value is not None:
            summary["value_checkpoint_id"] = value.pk
    return (Job.Status.CANCELLED if stopped else Job.Status.SUCCEEDED), summary


def _run_sample(job: Job, rows: list[dict], monitor: JobMonitor) -> tuple[str, dict]:
    from rlhf.data import read_jsonl

    result = _engine(job, rows, monitor, kind="sample", output_dir=job.output_dir)
    if monitor.lost:
        return Job.Status.FAILED, {}
    if monitor.released:  # sampling keeps no checkpoint: the next worker samples again
        return RELEASED, {}
    samples = read_jsonl(result["path"]) if result.get("path") else []
    if monitor.cancelled:
        return Job.Status.CANCELLED, {"prompts_sampled": len(samples)}
    stored = services.samples_store(
        job=job,
        prompt_ids=job.input_ids[: len(samples)],
        samples=samples,
        checkpoint=job.parent_checkpoint,
    )
    monitor.set_progress(max(monitor.step, 1), max(monitor.total_steps, monitor.step, 1))
    monitor.log(
        f"wrote {stored['completions']} completions and {stored['items']} items to the labeling queue"
    )
    return Job.Status.SUCCEEDED, stored


def _run_eval(job: Job, rows: list[dict], monitor: JobMonitor) -> tuple[str, dict]:
    """Win rate of checkpoint A (parent_checkpoint) over B (compare_checkpoint, or the base
    model) under the job's reward: each side answers every prompt (an engine child each), the
    reward scores both (training.evaluation.compare: a win counts 1, a tie 1/2)."""
    from rlhf.data import read_jsonl

    a, b = job.parent_checkpoint, job.compare_checkpoint
    sides = {}
    for done, (side, ckpt) in enumerate((("a", a), ("b", b)), start=1):
        monitor.log(f"sampling side {side.upper()}: {ckpt.name if ckpt else job.base_model}")
        result = _engine(
            job,
            rows,
            monitor,
            kind="sample",
            output_dir=str(Path(job.output_dir) / f"side-{side}"),
            config={**job.config, "init_adapter": ckpt.path if ckpt else None},
            steps=False,  # one progress bar for the whole evaluation
        )
        if monitor.should_stop():  # a side is incomplete
            return _stopped(monitor), {}
        sides[side] = read_jsonl(result["path"])
        monitor.set_progress(done, 3)
    from rlhf.data import row_prompt  # a conversation is scored as the reward model read it

    prompts, texts_a, texts_b, prompt_ids = [], [], [], []
    for pid, row, sa, sb in zip(job.input_ids, rows, sides["a"], sides["b"], strict=False):
        for ca, cb in zip(sa["completions"], sb["completions"], strict=False):
            prompts.append(row_prompt(row))
            texts_a.append(ca["text"])
            texts_b.append(cb["text"])
            prompt_ids.append(pid)
    scores_a, scores_b = _score(job, prompts, texts_a), _score(job, prompts, texts_b)
    summary, points = evaluation.compare(scores_a, scores_b)
    services.metric_points_write(job_id=job.pk, token=monitor.token, points=points)
    result = {**summary, "checkpoint_a": a.pk, "checkpoint_b": b.pk if b else None}
    if job.options.get("send_to_labelers"):
        pairs = [
            {"prompt_id": p, "a": x, "b": y, "reward_a": ra, "reward_b": rb}
            for p, x, y, ra, rb in zip(
                prompt_ids, texts_a, texts_b, scores_a, scores_b, strict=True
            )
        ]
        result["items_sent"] = services.eval_pairs_store(
            job=job, pairs=pairs, checkpoint_a=a, checkpoint_b=b
        )
    monitor.set_progress(3, 3)
    n, wins, ties = result["n"], result["wins"], result["ties"]
    monitor.log(
        f"win rate of A over B: {result['win_rate']:.3f} ({wins} wins, {ties} ties, {n - wins - ties} losses)"
        if n
        else "no completions to compare"
    )
    return Job.Status.SUCCEEDED, result


def _score(
    job: Job, prompts: list[str], completions: list[str], batch_size: int = 16
) -> list[float]:
    if job.reward_rule:
        fn = reward_rule_get(job.reward_rule).fn
        return [float(fn(p, c)) for p, c in zip(prompts, completions, strict=True)]
    import torch

    from rlhf.reward import RewardScorer

    scorer = RewardScorer.from_checkpoint(job.reward_checkpoint.path)
    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            out += [
                float(x)
                for x in scorer(prompts[i : i + batch_size], completions[i : i + batch_size])
            ]
    return out


# --------------------------------------------------------------------------- errors


def _failure_reason(exc: BaseException, job_id: int) -> str:
    """What the job page shows: the engine's own message for the errors it names (the child
    reported them; an evaluation raises them here), else the type and message, with the
    traceback in the worker's log only."""
    from rlhf.events import failure

    if isinstance(exc, EngineFailed):
        return str(exc)
    if isinstance(exc, DataChangedError):
        return f"Input data changed: {exc}"
    reported = failure(exc)
    if not reported["expected"]:
        logger.exception("job %s failed", job_id)
    return reported["reason"]


def _finite(metrics: dict) -> dict:
    import math

    return {
        k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)
    }


# The workers' recovery loop starts with each worker (see training.worker).
from training import worker as _worker  # noqa: E402,F401
