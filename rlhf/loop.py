"""Pieces every training loop shares: result, optimizer, schedule, guards, seeding, hashing.

- AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization",
  arXiv:1711.05101), fused on CUDA.
- Linear warm-up then cosine decay to 0 (Loshchilov & Hutter 2017, "SGDR", arXiv:1608.03983;
  the same shape as ``transformers.get_cosine_schedule_with_warmup``), as in the
  InstructGPT SFT recipe (Ouyang et al. 2022, arXiv:2203.02155, appendix C).
- A NaN/inf loss stops the run (:class:`~rlhf.errors.NonFiniteLossError`) before the
  optimizer step, so the last good checkpoint is never overwritten by a broken one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhf import distributed, events
from rlhf.config import same_setting
from rlhf.errors import ConfigError, NonFiniteLossError, OutOfMemoryError

OnStep = Callable[[int, dict[str, float]], None]
ShouldStop = Callable[[], bool]


@dataclass
class TrainResult:
    """What a training run returns."""

    checkpoint_dir: Path | None
    """The last checkpoint written (None if the run wrote none)."""
    step: int
    """Optimizer steps done (including those before a resume)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Metrics of the last step (plus final eval metrics)."""
    stopped: bool = False
    """True when should_stop() ended the run early."""


def make_optimizer(params: Iterable, cfg) -> torch.optim.Optimizer:
    """AdamW over ``params`` with cfg.learning_rate / cfg.weight_decay; fused on CUDA."""
    params = list(params)
    first = params[0]["params"][0] if isinstance(params[0], dict) else params[0]
    kwargs: dict[str, Any] = {
        "lr": cfg.learning_rate,
        "weight_decay": getattr(cfg, "weight_decay", 0.0),
        "betas": tuple(getattr(cfg, "adam_betas", (0.9, 0.999))),
        "eps": getattr(cfg, "adam_eps", 1e-8),
    }
    if first.is_cuda:
        kwargs["fused"] = True
    return torch.optim.AdamW(params, **kwargs)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): linear warm-up, then cosine to 0."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """LambdaLR with :func:`warmup_cosine_factor` (call ``scheduler.step()`` after each optimizer step)."""

    def factor(step: int) -> float:
        return warmup_cosine_factor(step, warmup_steps, total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_steps_for(cfg) -> int:
    """round(warmup_ratio * max_steps)."""
    return int(round(cfg.warmup_ratio * cfg.max_steps))


def optimizer_and_schedule(params: list, cfg, *, updates_per_step: int = 1):
    """AdamW (:func:`make_optimizer`) and its warm-up + cosine schedule over every optimizer
    update of the run (``max_steps * updates_per_step``; PPO and GRPO update several times per
    step), warming up for ``warmup_ratio`` of them."""
    optimizer = make_optimizer(params, cfg)
    total = cfg.max_steps * updates_per_step
    scheduler = warmup_cosine(optimizer, int(round(cfg.warmup_ratio * total)), total)
    return optimizer, scheduler


def check_finite(loss: torch.Tensor | float, step: int, *, name: str = "loss") -> float:
    """Return ``loss`` as a float; raise NonFiniteLossError if it is NaN or inf."""
    value = float(loss.detach().float().item()) if isinstance(loss, torch.Tensor) else float(loss)
    if not math.isfinite(value):
        kind = "nan" if math.isnan(value) else "inf"
        raise NonFiniteLossError(
            f"{name} is {kind} at step {step}; lower learning_rate, lower max_grad_norm, check the "
            f"data for empty or extreme rows, or use dtype='float32'. The last good checkpoint is kept."
        )
    return value


@contextlib.contextmanager
def oom_guard(hint: str = "batch_size or max_seq_len") -> Iterator[None]:
    """Turn a device out-of-memory error into OutOfMemoryError naming what to reduce."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise OutOfMemoryError(
            f"out of GPU memory; reduce {hint} (or raise grad_accum_steps to keep the effective batch)"
        ) from exc


def seed_everything(seed: int) -> None:
    """Seed python, numpy (if installed) and torch (all devices)."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass
    torch.manual_seed(seed)


def data_hash(rows: Iterable[Any]) -> str:
    """A stable sha256 of the data rows (canonical JSON, one per line): "sha256:<hex>"."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return "sha256:" + h.hexdigest()


def epoch_order(n: int, *, seed: int, epoch: int) -> list[int]:
    """A permutation of range(n) that depends only on (seed, epoch), so resume sees the same order."""
    return list(_epoch_order(n, seed, epoch))


@functools.lru_cache(maxsize=8)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def batch_indices(n: int, *, seed: int, start: int, count: int) -> list[int]:
    """Rows ``start .. start+count`` of the endless stream of seeded epoch permutations."""
    out: list[int] = []
    pos = start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        order = _epoch_order(n, seed, epoch)
        take = min(count - len(out), n - offset)
        out.extend(order[offset : offset + take])
        pos += take
    return out


def lineage(cfg, rows, *, parent: str | None = None, **extra: Any) -> dict[str, Any]:
    """The ``lineage`` block of state.json."""
    out = {
        "base_model": cfg.model,
        "parent": parent if parent is not None else getattr(cfg, "init_adapter", None),
        "data_hash": data_hash(rows),
        "num_rows": len(rows),
    }
    out.update(extra)
    return out


def sync_device(device) -> None:
    """Wait for the device's queued work (CUDA), so wall-clock timings are true."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def call_should_stop(should_stop: ShouldStop | None) -> bool:
    """should_stop(), agreed by every rank of a data-parallel run (a stop on any rank stops
    them all at the same step; every rank must call this at the same points)."""
    return distributed.any_rank(bool(should_stop())) if should_stop is not None else False


# ---------------------------------------------------------------------------- stop before step 1


class StopRequested(Exception):
    """should_stop() turned true before the first step, while the model loaded or the data
    were prepared (minutes for a large model or data set). Raised by :func:`stop_point`;
    :func:`stops_while_loading` turns it into a stopped TrainResult."""


def stop_point(should_stop: ShouldStop | None) -> None:
    """Raise StopRequested when should_stop() is true. For the set-up before the first step
    only: between loading phases and inside long data preparation (see :func:`checked`)."""
    if call_should_stop(should_stop):
        raise StopRequested


def checked(items: Iterable[Any], should_stop: ShouldStop | None) -> Iterator[Any]:
    """``items``, with a :func:`stop_point` before each: a cancelled run stops tokenizing
    within a row, not after the whole data set."""
    for item in items:
        stop_point(should_stop)
        yield item


def stops_while_loading(kind: str):
    """Decorator of a trainer ``train_<kind>(config, data, *, resume_from=None, ...)``: a
    :class:`StopRequested` from its set-up returns ``TrainResult(stopped=True)`` at the point
    the run started from (the resumed checkpoint, its step and metrics; None and step 0 for a
    fresh run), with nothing new written."""

    def decorate(train: Callable[..., TrainResult]) -> Callable[..., TrainResult]:
        @functools.wraps(train)
        def run(*args: Any, **kwargs: Any) -> TrainResult:
            try:
                return train(*args, **kwargs)
            except StopRequested:
                resume = resume_point(kwargs.get("resume_from"), kind)
                metrics = dict(resume.state.get("metrics") or {})
                return TrainResult(resume.checkpoint, resume.step, metrics, stopped=True)

        return run

    return decorate


# ---------------------------------------------------------------------------- the shared loop


@dataclass
class Resume:
    """Where a run starts: the checkpoint being resumed (None = a fresh run) and its state."""

    checkpoint: Path | None = None
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))

    def parent(self, cfg) -> str | None:
        """The run's parent checkpoint: kept from the resumed run, else cfg.init_adapter."""
        return self.state.get("lineage", {}).get("parent", getattr(cfg, "init_adapter", None))

    def check_data(self, run_lineage: dict[str, Any]) -> None:
        """ConfigError when the data differ from those of the run being resumed."""
        saved = self.state.get("lineage", {}) if self.checkpoint is not None else {}
        if saved.get("data_hash") not in (None, run_lineage.get("data_hash")):
            raise ConfigError(
                f"the data differ from those of the run in {self.checkpoint.parent} "
                f"({saved.get('num_rows')} rows then, {run_lineage.get('num_rows')} now): resume "
                "with the same data, or start a new run in a new folder"
            )

    def check_config(self, cfg) -> None:
        """ConfigError when the run would not continue the one it resumes: another base model
        or adapter shape, or a max_steps below the step already reached. Fields such as
        max_steps (upwards), learning_rate or save_every may change."""
        if self.checkpoint is None:
            return
        old = self.state.get("config", {})
        changed = [
            f"{name} {old[name]!r} -> {getattr(cfg, name)!r}"
            for name in RESUME_FIXED
            if name in old
            and hasattr(cfg, name)
            and not same_setting(old[name], getattr(cfg, name))
        ]
        if changed:
            raise ConfigError(
                f"{'; '.join(changed)}: these must stay as they were in the run being resumed "
                f"({self.checkpoint}); start a new run to change them"
            )
        if self.step > cfg.max_steps:
            raise ConfigError(
                f"the run being resumed is at step {self.step}, past max_steps={cfg.max_steps}; "
                "raise max_steps to train further"
            )


RESUME_FIXED = ("model", "lora_r", "lora_alpha", "target_modules", "base_kind", "pooling")
"""Config fields a resumed run must keep: they decide the model and the adapter's shape."""


_KIND_NAMES = {
    "sft": "an SFT",
    "reward": "a reward",
    "dpo": "a DPO",
    "ppo": "a PPO",
    "grpo": "a GRPO",
}


def resume_point(resume_from: str | Path | None, kind: str, cfg=None) -> Resume:
    """The checkpoint to resume (a checkpoint folder or a run folder = its latest) and its
    state.json; ConfigError when it was written by another kind of run, or (given ``cfg``)
    when the config cannot continue it (:meth:`Resume.check_config`)."""
    if resume_from is None:
        return Resume()
    from rlhf.checkpoint import read_state, resolve_checkpoint

    ckpt = resolve_checkpoint(resume_from)
    state = read_state(ckpt)
    if state.get("kind") != kind:
        raise ConfigError(
            f"{ckpt} is a {state.get('kind')!r} checkpoint, not {_KIND_NAMES.get(kind, kind)} one"
        )
    resume = Resume(ckpt, state)
    if cfg is not None:
        resume.check_config(cfg)
    return resume


def optimizer_step(
    optimizer: torch.optim.Optimizer, scheduler, params: list, *, max_grad_norm: float, step: int
) -> tuple[float, float]:
    """Clip the gradients, step the optimizer and the schedule, zero the gradients.

    A NaN/inf gradient norm raises NonFiniteLossError BEFORE the optimizer step, so the
    weights (and the last good checkpoint) stay intact. Under torchrun the gradients are first
    summed over the ranks (:func:`rlhf.distributed.all_reduce_gradients`; the losses are
    divided by global counts), so every rank clips and steps alike. Returns (grad_norm, lr).
    """
    distributed.all_reduce_gradients(params)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    if not math.isfinite(grad_norm):
        raise NonFiniteLossError(
            f"gradient norm is {grad_norm} at step {step}; lower learning_rate or max_grad_norm. "
            "The last good checkpoint is kept."
        )
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def save_run_checkpoint(
    output_dir: str | Path,
    *,
    kind: str,
    cfg,
    step: int,
    metrics: dict[str, float],
    lineage: dict[str, Any],
    model,
    adapters: list[str],
    heads: dict | None = None,
    optimizer=None,
    scheduler=None,
    extra: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """save_checkpoint with the state.json every run writes: kind, config, metrics, lineage,
    adapters (and heads), the world size, plus ``info`` (e.g. the reward model's pooling).
    Every rank calls it; rank 0 alone writes, and the others wait until the folder is in
    place and get its path."""
    from rlhf.checkpoint import checkpoint_name, save_checkpoint
    from rlhf.config import config_to_dict

    state: dict[str, Any] = {
        "kind": kind,
        "config": config_to_dict(cfg),
        "metrics": metrics,
        "lineage": lineage,
        "adapters": list(adapters),
    }
    if heads:
        state["heads"] = list(heads)
    state.update(info or {})
    state["world_size"] = distributed.world_size()
    if not distributed.is_main():
        distributed.barrier()
        return Path(output_dir) / checkpoint_name(step)
    path = save_checkpoint(
        output_dir,
        step=step,
        model=model,
        adapter_names=list(adapters),
        heads=heads,
        optimizer=optimizer,
        scheduler=scheduler,
        state=state,
        extra=extra,
    )
    events.emit("checkpoint", step=step, path=str(path))  # complete: renamed into place
    distributed.barrier()
    return path


def run_steps(
    cfg,
    *,
    resume: Resume,
    train_step: Callable[[int], dict[str, float]],
    checkpoint: Callable[[int, dict[str, float]], Path],
    on_step: OnStep | None = None,
    should_stop: ShouldStop | None = None,
    eval_metrics: Callable[[], dict[str, float]] | None = None,
) -> TrainResult:
    """The loop every trainer shares, from the ``resume`` point to ``cfg.max_steps``.

    Before each step ``should_stop()`` is checked: when true, eval metrics are added, a
    checkpoint is written and the result has stopped=True; before the first step of this call
    there is nothing new to evaluate or save, and the result is the resume point (stopped). ``train_step(step)`` does optimizer
    step ``step`` (1-based) and returns its metrics; ``progress/total_steps`` is added, eval
    metrics every ``cfg.eval_every`` steps (if the config has it), at checkpoints and at the
    end; then ``on_step(step, metrics)`` (on rank 0 only), and a checkpoint every ``cfg.save_every`` steps.
    The last step is always saved; a resumed run with nothing left to do returns the
    checkpoint it resumed, with its metrics, and writes nothing.
    """
    evaluate = eval_metrics or dict
    eval_every = getattr(cfg, "eval_every", 0)
    metrics = dict(resume.state.get("metrics") or {})
    last_checkpoint = resume.checkpoint
    start_step = step = resume.step
    while step < cfg.max_steps:
        if call_should_stop(should_stop):
            if step == start_step:
                return TrainResult(last_checkpoint, step, metrics, stopped=True)
            metrics = {**metrics, **evaluate()}
            last_checkpoint = checkpoint(step, metrics)
            return TrainResult(last_checkpoint, step, metrics, stopped=True)
        step += 1
        metrics = train_step(step)
        metrics["progress/total_steps"] = float(cfg.max_steps)
        will_save = bool(cfg.save_every) and step % cfg.save_every == 0 and step < cfg.max_steps
        if (eval_every and step % eval_every == 0) or will_save or step == cfg.max_steps:
            metrics.update(evaluate())
        if on_step is not None and distributed.is_main():
            on_step(step, dict(metrics))
        if will_save:
            last_checkpoint = checkpoint(step, metrics)
    if step > start_step or last_checkpoint is None:
        last_checkpoint = checkpoint(step, metrics)
    return TrainResult(last_checkpoint, step, metrics, stopped=False)
