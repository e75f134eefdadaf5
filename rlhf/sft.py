"""Supervised fine-tuning (SFT) with a LoRA adapter, loss on completion tokens only.

The first policy of the RLHF loop: InstructGPT (Ouyang et al. 2022, "Training language
models to follow instructions with human feedback", arXiv:2203.02155, sec. 3.5 and
appendix C) fine-tunes on labeler demonstrations with a cosine schedule; here the base is
frozen and a LoRA adapter is trained (Hu et al. 2021, arXiv:2106.09685).

Per optimizer step (``grad_accum_steps`` micro-batches of ``batch_size`` rows)::

    loss = sum over completion tokens of -log p(token | prefix) / (completion tokens in the step)

so accumulation gives the same gradient as one large batch. Gradients are clipped to
``max_grad_norm``; the learning rate warms up linearly then decays with a cosine.
The data order is a seeded permutation per epoch, a function of (seed, position) only,
so a resumed run sees exactly the rows an uninterrupted run would.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rlhf.checkpoint import (
    load_adapter_weights,
    load_training_state,
    read_state,
    resolve_checkpoint,
    save_checkpoint,
)
from rlhf.config import BaseConfig, config_to_dict
from rlhf.data import IGNORE_INDEX, SFTCollator, collate_sft, validate_rows
from rlhf.errors import ConfigError, DataError, NonFiniteLossError
from rlhf.loop import (
    OnStep,
    ShouldStop,
    TrainResult,
    batch_indices,
    call_should_stop,
    check_finite,
    lineage,
    make_optimizer,
    oom_guard,
    seed_everything,
    warmup_cosine,
    warmup_steps_for,
)
from rlhf.modeling import load_policy, trainable_parameters

ADAPTER = "policy"


@dataclass
class SFTConfig(BaseConfig):
    """SFT with LoRA. Defaults: QLoRA (Dettmers et al. 2023, arXiv:2305.14314) for the
    adapter and learning rate, InstructGPT (Ouyang et al. 2022, appendix C) for the schedule."""

    eval_fraction: float = 0.1
    """Fraction of rows held out for eval/loss (at least one row when there are 2+ rows; 0 = none)."""

    eval_every: int = 0
    """Compute eval/loss every N steps (0 = at checkpoints and at the end only)."""

    eval_batch_size: int = 0
    """Rows per eval forward pass (0 = batch_size)."""

    chat_template: bool = False
    """Wrap prompts with the tokenizer's chat template (user turn + assistant header)."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (Chen et al. 2016, arXiv:1604.06174)."""

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.eval_batch_size < 0:
            raise ConfigError(f"eval_batch_size must be >= 0, got {self.eval_batch_size}")


def completion_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions and their count.

    logits [B,T,V], labels [B,T] (IGNORE_INDEX on prompt and padding) -> (sum: scalar, n: int).
    """
    shift_logits = logits[:, :-1, :].float()  # [B,T-1,V]
    shift_labels = labels[:, 1:]  # [B,T-1]
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, int((shift_labels != IGNORE_INDEX).sum().item())


def _backbone_and_head(model):
    """(decoder, lm_head) of a (Peft-wrapped) causal LM, or None when logits need the full forward
    (e.g. models that soft-cap or rescale logits after the head)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if (
        config is None
        or getattr(config, "final_logit_softcapping", None)
        or getattr(config, "logit_scale", None)
    ):
        return None
    backbone = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if backbone is None or head is None or backbone is base:
        return None
    return backbone, head


def forward_completion_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed completion-token loss of a batch and its token count.

    The LM head runs only on positions that predict a completion token ([N,H] -> [N,V]
    instead of [B,T,V]), which saves the head's time and the fp32 logits' memory on the prompt.
    """
    parts = _backbone_and_head(model)
    if parts is None:
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        )
        return completion_loss(out.logits, batch["labels"])
    backbone, head = parts
    hidden = backbone(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state  # [B,T,H]
    targets = batch["labels"][:, 1:]  # [B,T-1]
    keep = targets != IGNORE_INDEX  # [B,T-1]
    logits = head(hidden[:, :-1][keep]).float()  # [N,V]
    return F.cross_entropy(logits, targets[keep], reduction="sum"), int(keep.sum().item())


def split_eval(n: int, *, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of range(n) into (train, eval) indexes."""
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    n_eval = min(n - 1, max(1, int(round(n * fraction))))
    g = torch.Generator().manual_seed(seed + 7919)
    order = torch.randperm(n, generator=g).tolist()
    return sorted(order[n_eval:]), sorted(order[:n_eval])


@torch.no_grad()
def evaluate_loss(
    model, examples: list[tuple[list[int], int]], *, pad_id: int, batch_size: int, device
) -> float:
    """Mean completion-token loss over pre-tokenized examples (dropout off)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate_sft(examples[i : i + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        s, n = forward_completion_loss(model, batch)
        total += float(s)
        count += n
    if was_training:
        model.train()
    return total / max(count, 1)


def train_sft(
    config: SFTConfig,
    data: list[dict[str, Any]],
    *,
    output_dir: str | os.PathLike,
    on_step: OnStep | None = None,
    should_stop: ShouldStop | None = None,
    resume_from: str | os.PathLike | None = None,
    eval_data: list[dict[str, Any]] | None = None,
) -> TrainResult:
    """Train a LoRA adapter on {"prompt","completion"} rows; return the last checkpoint.

    on_step(step, metrics) after every optimizer step (loss/sft, optim/lr, optim/grad_norm,
    perf/tokens_per_s, progress/total_steps, eval/loss when computed). should_stop() is checked
    before every step; when true a checkpoint is saved and the result has stopped=True.
    ``eval_data`` (rows like ``data``) replaces the held-out split of ``eval_fraction``.
    """
    cfg = config
    cfg.validate()
    rows = validate_rows("sft", data)
    output_dir = Path(output_dir)
    seed_everything(cfg.seed)

    model, tokenizer, device, _dtype = load_policy(cfg, adapter_name=ADAPTER)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    collator = SFTCollator(tokenizer, max_seq_len=cfg.max_seq_len, chat_template=cfg.chat_template)
    examples = [collator.encode(r) for r in rows]
    for i, (ids, p_len) in enumerate(examples):
        if len(ids) <= p_len:
            where = f"line {data[i]['_line']}" if "_line" in data[i] else f"row {i}"
            raise DataError(
                f"{where}: no completion tokens left after truncation to max_seq_len={cfg.max_seq_len}"
            )
    if eval_data is not None:
        train_examples = examples
        eval_examples = [collator.encode(r) for r in validate_rows("sft", eval_data)]
    else:
        train_idx, eval_idx = split_eval(len(examples), fraction=cfg.eval_fraction, seed=cfg.seed)
        train_examples = [examples[i] for i in train_idx]
        eval_examples = [examples[i] for i in eval_idx]
    pad_id = tokenizer.pad_token_id

    params = trainable_parameters(model)
    optimizer = make_optimizer(params, cfg)
    scheduler = warmup_cosine(optimizer, warmup_steps_for(cfg), cfg.max_steps)

    start_step = 0
    parent = cfg.init_adapter
    last_ckpt: Path | None = None
    if resume_from is not None:
        ckpt = last_ckpt = resolve_checkpoint(resume_from)
        saved = read_state(ckpt)
        if saved.get("kind") != "sft":
            raise ConfigError(f"{ckpt} is a {saved.get('kind')!r} checkpoint, not an SFT one")
        load_adapter_weights(model, ckpt, ADAPTER)
        load_training_state(ckpt, optimizer, scheduler)  # also restores the RNG states
        start_step = int(saved["step"])
        parent = saved.get("lineage", {}).get("parent", parent)

    run_lineage = lineage(cfg, rows, parent=parent)
    eval_bs = cfg.eval_batch_size or cfg.batch_size
    rows_per_step = cfg.batch_size * cfg.grad_accum_steps

    def checkpoint(step: int, metrics: dict[str, float]) -> Path:
        state = {
            "kind": "sft",
            "config": config_to_dict(cfg),
            "metrics": metrics,
            "lineage": run_lineage,
            "adapters": [ADAPTER],
        }
        return save_checkpoint(
            output_dir,
            step=step,
            model=model,
            adapter_names=[ADAPTER],
            optimizer=optimizer,
            scheduler=scheduler,
            state=state,
        )

    def eval_metrics() -> dict[str, float]:
        if not eval_examples:
            return {}
        with oom_guard("eval_batch_size or max_seq_len"):
            return {
                "eval/loss": evaluate_loss(
                    model, eval_examples, pad_id=pad_id, batch_size=eval_bs, device=device
                )
            }

    model.train()
    metrics: dict[str, float] = dict(saved.get("metrics", {})) if resume_from is not None else {}
    step = start_step
    while step < cfg.max_steps:
        if call_should_stop(should_stop):
            metrics = {**metrics, **eval_metrics()}
            last_ckpt = checkpoint(step, metrics)
            return TrainResult(checkpoint_dir=last_ckpt, step=step, metrics=metrics, stopped=True)

        t_start = time.perf_counter()
        idx = batch_indices(
            len(train_examples), seed=cfg.seed, start=step * rows_per_step, count=rows_per_step
        )
        micro = [
            collate_sft(
                [train_examples[i] for i in idx[m * cfg.batch_size : (m + 1) * cfg.batch_size]],
                pad_id,
            )
            for m in range(cfg.grad_accum_steps)
        ]
        n_target = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        n_tokens = sum(int(b["attention_mask"].sum()) for b in micro)
        loss_sum = 0.0
        with oom_guard("batch_size or max_seq_len (or turn on gradient_checkpointing)"):
            for batch in micro:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                s, _ = forward_completion_loss(model, batch)
                loss = s / n_target
                check_finite(loss, step + 1)
                loss.backward()
                loss_sum += float(loss.detach())
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if not math.isfinite(float(grad_norm)):
                raise NonFiniteLossError(
                    f"gradient norm is {float(grad_norm)} at step {step + 1}; lower learning_rate or max_grad_norm. "
                    "The last good checkpoint is kept."
                )
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1

        metrics = {
            "loss/sft": loss_sum,
            "optim/lr": lr,
            "optim/grad_norm": float(grad_norm),
            "perf/tokens_per_s": n_tokens / max(time.perf_counter() - t_start, 1e-9),
            "progress/total_steps": float(cfg.max_steps),
            "progress/epoch": step * rows_per_step / len(train_examples),
        }
        will_save = bool(cfg.save_every) and step % cfg.save_every == 0 and step < cfg.max_steps
        if (cfg.eval_every and step % cfg.eval_every == 0) or will_save or step == cfg.max_steps:
            metrics.update(eval_metrics())
        if on_step is not None:
            on_step(step, dict(metrics))
        if will_save:
            last_ckpt = checkpoint(step, metrics)

    if step > start_step or last_ckpt is None:
        last_ckpt = checkpoint(step, metrics)
    return TrainResult(checkpoint_dir=last_ckpt, step=step, metrics=metrics, stopped=False)
