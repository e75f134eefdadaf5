"""Supervised fine-tuning (SFT) with a LoRA adapter, loss on completion tokens only.

The first policy of the RLHF loop: InstructGPT (Ouyang et al. 2022, "Training language
models to follow instructions with human feedback", arXiv:2203.02155, sec. 3.5 and
appendix C) fine-tunes on labeler demonstrations with a cosine schedule; here the base is
frozen and a LoRA adapter is trained (Hu et al. 2021, arXiv:2106.09685).

Per optimizer step (``grad_accum_steps`` micro-batches of ``batch_size`` rows)::

    loss = sum over completion tokens of -log p(token | prefix) / (completion tokens in the step)

so accumulation gives the same gradient as one large batch. Under ``torchrun`` each rank
takes a contiguous share of the step's rows and divides its token losses by the step's
token count over every rank (:mod:`rlhf.distributed`), so the summed gradients are those of
one process with the same config. Gradients are clipped to
``max_grad_norm``; the learning rate warms up linearly then decays with a cosine.
The data order is a seeded permutation per epoch, a function of (seed, position) only,
so a resumed run sees exactly the rows an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F

from rlhf import distributed
from rlhf.checkpoint import load_adapter_weights, load_training_state
from rlhf.config import BaseConfig, OfflineConfig
from rlhf.data import (
    IGNORE_INDEX,
    SFTCollator,
    collate_sft,
    target_count,
    validate_rows,
    where,
)
from rlhf.errors import DataError
from rlhf.loop import (
    OnStep,
    ShouldStop,
    TrainResult,
    batch_indices,
    check_finite,
    checked,
    lineage,
    oom_guard,
    optimizer_and_schedule,
    optimizer_step,
    resume_point,
    run_steps,
    save_run_checkpoint,
    seed_everything,
    stop_point,
    stops_while_loading,
)
from rlhf.modeling import (
    enable_gradient_checkpointing,
    eval_mode,
    hidden_size_of,
    load_policy,
    next_token_logits,
    trainable_parameters,
)

ADAPTER = "policy"


@dataclass
class SFTConfig(OfflineConfig):
    """SFT with LoRA. Defaults: QLoRA (Dettmers et al. 2023, arXiv:2305.14314) for the
    adapter and learning rate, InstructGPT (Ouyang et al. 2022, appendix C) for the schedule."""

    batch_size: int | Literal["auto"] = 8
    """Rows per micro-batch (per optimizer step: batch_size * grad_accum_steps), or "auto": on
    a GPU the largest micro-batch (up to 64) whose activations fit in the free memory, with
    gradient checkpointing turned on only when that beats a micro-batch of 8 without it
    (:func:`pick_micro_batch`); 8 on a CPU. The pick is saved in the checkpoints' config
    and a resumed run keeps it."""


AUTO = "auto"
C = TypeVar("C", bound=BaseConfig)
AUTO_CPU_BATCH = 8
"""The micro-batch "auto" gives on a CPU (BaseConfig's default)."""


def activation_bytes_per_token(
    *,
    layers: int,
    hidden: int,
    intermediate: int,
    vocab: int,
    dtype_bytes: int,
    checkpointing: bool,
) -> float:
    """Estimated bytes of activations kept for the backward pass per token of a LoRA SFT step.

    Per decoder layer, 16-bit activations take about 17h + 8i bytes per token with SwiGLU and
    fused attention (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
    Transformer Models", arXiv:2205.05198, sec. 4.1, which gives 34h for a 4h GELU MLP); LoRA
    adds a dropped-out copy of each adapted input (~6h + i). Rounded up to (18h + 6i) elements.
    With gradient checkpointing only each layer's input (h) is kept, plus one layer being
    recomputed. The LM head adds bf16 logits, their fp32 copy and its gradient (V·(d+8)).
    """
    layer = dtype_bytes * (18 * hidden + 6 * intermediate)
    kept = layers * dtype_bytes * hidden + layer if checkpointing else layers * layer
    return kept + vocab * (dtype_bytes + 8)


def pick_micro_batch(
    *,
    free_bytes: int,
    tokens_per_row: int,
    layers: int,
    hidden: int,
    intermediate: int,
    vocab: int,
    dtype_bytes: int,
    gradient_checkpointing: bool = False,
    max_batch: int = 64,
    min_fast_batch: int = 8,
    budget: float = 0.8,
    reserve_bytes: int = 1 << 30,
) -> tuple[int, bool]:
    """(micro-batch, gradient checkpointing) for SFT from the free device memory.

    The micro-batch is the largest power of two up to ``max_batch`` whose activations
    (:func:`activation_bytes_per_token` x ``tokens_per_row``) fit in ``budget`` of the free
    memory less ``reserve_bytes`` (the allocator's slack, LoRA gradients and optimizer
    state). Checkpointing (about a third more compute) is turned on only when without it even
    ``min_fast_batch`` rows do not fit and with it more rows do; a caller's ``True`` stays on.
    At least 1 row is returned (an OOM then names what to reduce).
    """
    room = max(free_bytes * budget - reserve_bytes, 0.0)

    def fits(checkpointing: bool) -> int:
        per_row = tokens_per_row * activation_bytes_per_token(
            layers=layers,
            hidden=hidden,
            intermediate=intermediate,
            vocab=vocab,
            dtype_bytes=dtype_bytes,
            checkpointing=checkpointing,
        )
        batch = 1
        while batch * 2 <= max_batch and batch * 2 * per_row <= room:
            batch *= 2
        return batch

    if gradient_checkpointing:
        return fits(True), True
    plain = fits(False)
    if plain >= min(min_fast_batch, max_batch):
        return plain, False
    checkpointed = fits(True)
    return (checkpointed, True) if checkpointed > plain else (plain, False)


def resolve_auto_batch(
    cfg: C, model, device, *, tokens_per_row: int, saved_config: dict | None
) -> C:
    """``cfg`` (an SFT or reward config) with batch_size "auto" replaced: the resumed run's
    pick, else :func:`pick_micro_batch` on a GPU (from ``torch.cuda.mem_get_info`` with the
    PEFT ``model`` loaded; a row = ``tokens_per_row`` tokens), else :data:`AUTO_CPU_BATCH`."""
    if cfg.batch_size != AUTO:
        return cfg
    if saved_config and isinstance(saved_config.get("batch_size"), int):
        batch = saved_config["batch_size"]
        checkpointing = bool(saved_config.get("gradient_checkpointing", cfg.gradient_checkpointing))
    elif torch.device(device).type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        config = model.get_base_model().config
        hidden = hidden_size_of(model.get_base_model())
        batch, checkpointing = pick_micro_batch(
            free_bytes=free,
            tokens_per_row=tokens_per_row,
            layers=int(config.num_hidden_layers),
            hidden=hidden,
            intermediate=int(getattr(config, "intermediate_size", None) or 4 * hidden),
            vocab=int(config.vocab_size),
            dtype_bytes=next(model.parameters()).element_size(),
            gradient_checkpointing=cfg.gradient_checkpointing,
        )
    else:
        batch, checkpointing = AUTO_CPU_BATCH, cfg.gradient_checkpointing
    return dataclasses.replace(cfg, batch_size=batch, gradient_checkpointing=checkpointing)


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


def forward_completion_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed completion-token loss of a batch and its token count.

    The LM head runs only on positions that predict a completion token
    (:func:`rlhf.modeling.next_token_logits`), which saves the head's time and the fp32
    logits' memory on the prompt.
    """
    targets = batch["labels"][:, 1:]  # [B,T-1]
    keep = targets != IGNORE_INDEX  # [B,T-1]
    logits = next_token_logits(model, batch["input_ids"], batch["attention_mask"], keep)  # [N,V]
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), int(keep.sum().item())


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
    """Mean completion-token loss over pre-tokenized examples (dropout off); under torchrun
    each rank evaluates its share and the sums are reduced."""
    total, count = 0.0, 0
    mine = distributed.local_part(examples)
    with eval_mode(model):
        for i in range(0, len(mine), batch_size):
            batch = collate_sft(mine[i : i + batch_size], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            s, n = forward_completion_loss(model, batch)
            total += float(s)
            count += n
    sums = distributed.all_reduce_sums({"total": total, "count": count})
    return sums["total"] / max(sums["count"], 1)


@distributed.data_parallel
@stops_while_loading("sft")
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
    """Train a LoRA adapter on {"prompt","completion"} rows (the prompt text or "messages") or
    whole conversations {"messages"} with the loss on every assistant turn (rlhf.data:
    SFTCollator); return the last checkpoint.

    on_step(step, metrics) after every optimizer step (loss/sft, optim/lr, optim/grad_norm,
    perf/tokens_per_s, progress/total_steps, eval/loss when computed). should_stop() is checked
    before every step; when true a checkpoint is saved and the result has stopped=True. It is
    also checked while the model loads and the data are tokenized: a stop there returns
    stopped=True at the resume point (no checkpoint for a fresh run), with nothing written.
    ``eval_data`` (rows like ``data``) replaces the held-out split of ``eval_fraction``.
    Under ``torchrun`` it trains data-parallel with the same global batch (module docstring).
    """
    cfg = config
    cfg.validate()
    rows = validate_rows("sft", data)
    output_dir = Path(output_dir)
    seed_everything(cfg.seed)

    resume = resume_point(resume_from, "sft", cfg)
    stop_point(should_stop)
    model, tokenizer, device, _dtype = load_policy(cfg, adapter_name=ADAPTER)
    collator = SFTCollator(tokenizer, max_seq_len=cfg.max_seq_len, chat_template=cfg.chat_template)
    examples = [collator.encode(r) for r in checked(rows, should_stop)]
    for i, example in enumerate(examples):
        if not target_count(example):
            at = where(data[i], i)
            raise DataError(
                f"{at}: no completion tokens left after truncation to max_seq_len={cfg.max_seq_len}"
            )
    cfg = resolve_auto_batch(
        cfg,
        model,
        device,
        tokens_per_row=max(len(ids) for ids, _ in examples),
        saved_config=resume.state.get("config"),
    )
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if eval_data is not None:
        train_examples = examples
        eval_rows = validate_rows("sft", eval_data)
        eval_examples = [collator.encode(r) for r in checked(eval_rows, should_stop)]
    else:
        train_idx, eval_idx = split_eval(len(examples), fraction=cfg.eval_fraction, seed=cfg.seed)
        train_examples = [examples[i] for i in train_idx]
        eval_examples = [examples[i] for i in eval_idx]
    pad_id = tokenizer.pad_token_id

    params = trainable_parameters(model)
    optimizer, scheduler = optimizer_and_schedule(params, cfg)
    if resume.checkpoint is not None:
        load_adapter_weights(model, resume.checkpoint, ADAPTER)
        load_training_state(resume.checkpoint, optimizer, scheduler)  # also the RNG states
    distributed.broadcast_parameters(params)

    run_lineage = lineage(cfg, rows, parent=resume.parent(cfg))
    resume.check_data(run_lineage)
    eval_bs = cfg.eval_batch_size or cfg.batch_size
    rows_per_step = cfg.batch_size * cfg.grad_accum_steps

    def checkpoint(step: int, metrics: dict[str, float]) -> Path:
        return save_run_checkpoint(
            output_dir,
            kind="sft",
            cfg=cfg,
            step=step,
            metrics=metrics,
            lineage=run_lineage,
            model=model,
            adapters=[ADAPTER],
            optimizer=optimizer,
            scheduler=scheduler,
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

    def train_step(step: int) -> dict[str, float]:
        t_start = time.perf_counter()
        idx = batch_indices(
            len(train_examples),
            seed=cfg.seed,
            start=(step - 1) * rows_per_step,
            count=rows_per_step,
        )
        mine = distributed.local_part(idx)
        micro = [
            collate_sft([train_examples[i] for i in mine[m : m + cfg.batch_size]], pad_id)
            for m in range(0, len(mine), cfg.batch_size)
        ]
        counts = distributed.all_reduce_sums(
            {
                "target": sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro),
                "tokens": sum(int(b["attention_mask"].sum()) for b in micro),
            }
        )
        n_target, n_tokens = counts["target"], counts["tokens"]
        loss_sum = 0.0
        with oom_guard("batch_size or max_seq_len (or turn on gradient_checkpointing)"):
            for batch in micro:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                s, _ = forward_completion_loss(model, batch)
                loss = s / n_target
                check_finite(loss, step)
                loss.backward()
                loss_sum += float(loss.detach())
            grad_norm, lr = optimizer_step(
                optimizer, scheduler, params, max_grad_norm=cfg.max_grad_norm, step=step
            )
        loss_sum = distributed.all_reduce_sums({"loss": loss_sum})["loss"]
        return {
            "loss/sft": loss_sum,
            "optim/lr": lr,
            "optim/grad_norm": grad_norm,
            "perf/tokens_per_s": n_tokens / max(time.perf_counter() - t_start, 1e-9),
            "progress/epoch": step * rows_per_step / len(train_examples),
        }

    model.train()
    return run_steps(
        cfg,
        resume=resume,
        train_step=train_step,
        checkpoint=checkpoint,
        on_step=on_step,
        should_stop=should_stop,
        eval_metrics=eval_metrics,
    )
