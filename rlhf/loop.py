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

from rlhf.errors import NonFiniteLossError, OutOfMemoryError

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


def call_should_stop(should_stop: ShouldStop | None) -> bool:
    return bool(should_stop()) if should_stop is not None else False
