"""Direct Preference Optimization with a LoRA policy.

Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model" (arXiv:2305.18290), equation 7::

    L_DPO = -E_(x, y_w, y_l) [ log σ( β log π_θ(y_w|x)/π_ref(y_w|x) - β log π_θ(y_l|x)/π_ref(y_l|x) ) ]

The implicit reward of a completion is ``β (log π_θ(y|x) - log π_ref(y|x))`` (sec. 5);
``rewards/margin`` is its mean chosen - rejected difference and ``rewards/accuracy`` the
fraction of pairs where the chosen one scores higher.

Rows are ``{"prompt", "chosen", "rejected"}`` or ranked ``{"prompt", "completions",
"ranking"}``; a ranking expands to every pair of completions in different tiers. Each
distinct sequence of a micro-batch goes through the model once even when it is in several
pairs. Reference log-probs are computed once before training (no second model in memory and
no reference forward per step); by default the reference is the base model with the LoRA
adapters disabled (``DPOConfig.reference``).

Under ``torchrun`` each rank takes a contiguous share of a step's pairs, each pair's loss
divided by the step's number of pairs, so the ranks' summed gradients are one process's
(:mod:`rlhf.distributed`); reference and held-out log-probs are computed in shares and
gathered.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf import distributed
from rlhf.checkpoint import load_adapter_weights, load_training_state
from rlhf.config import OfflineConfig, disable_dropout, resolve_reference
from rlhf.data import completion_mask, encode_prompt_completion, pad_sequences
from rlhf.errors import ConfigError, DataError
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
    sync_device,
)
from rlhf.modeling import (
    active_adapter,
    enable_gradient_checkpointing,
    eval_mode,
    kept_trainable_state,
    load_frozen_adapter,
    load_policy,
    next_token_logits,
    source_adapter_dir,
    token_logprobs,
    trainable_parameters,
)
from rlhf.reward import PreferenceRow, preference_rows
from rlhf.sft import split_eval

ADAPTER = "policy"


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    *,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss of a batch of pairs (Rafailov et al. 2023, eq. 7).

    All inputs: [B] summed log-probabilities of the completion tokens given the prompt.
    ``label_smoothing`` ε > 0 gives conservative DPO (Mitchell 2023): the preference is
    assumed flipped with probability ε. Returns ``(loss, chosen_rewards [B],
    rejected_rewards [B])`` where the loss is the batch mean and the rewards are the
    implicit rewards β·(log π_θ - log π_ref), detached.
    """
    chosen_logratio = policy_chosen_logps - ref_chosen_logps  # [B]
    rejected_logratio = policy_rejected_logps - ref_rejected_logps  # [B]
    logits = beta * (chosen_logratio - rejected_logratio)  # [B]
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(
        -logits
    )
    return losses.mean(), beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class DPOConfig(OfflineConfig):
    """DPO with a LoRA policy. ``batch_size`` counts preference PAIRS per micro-batch."""

    beta: float = 0.1
    """Strength of the implicit KL constraint (Rafailov et al. 2023 use β = 0.1 for
    dialogue and summarization, 0.5 for controlled sentiment)."""

    label_smoothing: float = 0.0
    """Probability that a preference label is flipped (conservative DPO, Mitchell 2023); 0 = DPO."""

    learning_rate: float = 5e-5
    """Peak AdamW rate. Rafailov et al. fine-tune all weights at 1e-6; LoRA adapters need
    roughly 10-50x more (Hu et al. 2021 train adapters at 1e-4..2e-4)."""

    warmup_ratio: float = 0.1
    """Linear warm-up fraction (Rafailov et al. warm up for 150 steps, ~10% of a short run)."""

    disable_dropout: bool = True
    """Train with dropout off (LoRA's and the model's): the policy's log-probs are then the
    same function in the training forward as in the reference's and the evals' (TRL's DPOConfig
    default ``disable_dropout=True``). False trains with ``lora_dropout`` and the model's own."""

    reference: str = "auto"
    """The reference policy π_ref: "base" = the base model with adapters disabled; "init" =
    the policy as loaded from ``init_adapter`` (π_SFT, the paper's choice); "auto" = "init"
    when init_adapter is set, else "base" (they are the same model then: a fresh LoRA adapter
    starts at zero). Its log-probs are computed ONCE, before training."""

    def validate(self) -> None:
        super().validate()
        if not self.beta > 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        resolve_reference(self.reference, self.init_adapter)


# --------------------------------------------------------------------------------------------
# Log-probabilities
# --------------------------------------------------------------------------------------------


def sequence_logps(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lens: torch.Tensor
) -> torch.Tensor:
    """Summed log π(completion tokens | prompt) per row: [B,T] ids (right padded), [B] -> [B].

    Only the completion positions go through the LM head
    (:func:`rlhf.modeling.next_token_logits`), so a 32k vocabulary does not cost B·T·V memory.
    """
    B, T = input_ids.shape
    seq_lens = attention_mask.sum(-1)
    target = completion_mask(prompt_lens, seq_lens, T)[:, 1:]  # [B,T-1]: t+1 is a completion token
    rows = torch.arange(B, device=input_ids.device).unsqueeze(1).expand(B, T - 1)[target]  # [N]
    logits = next_token_logits(model, input_ids, attention_mask, target)  # [N,V]
    token_logps, _ = token_logprobs(logits, input_ids[:, 1:][target])  # [N]
    return torch.zeros(B, device=logits.device, dtype=torch.float32).index_add_(
        0, rows, token_logps
    )


@dataclass
class _Sequences:
    """Every (prompt, completion) of the data tokenized once; pairs index into them."""

    ids: list[list[int]]
    prompt_lens: list[int]

    def batch(self, index: Sequence[int], pad_id: int, device):
        ids, mask = pad_sequences([self.ids[i] for i in index], pad_id, side="right")
        plens = torch.tensor([self.prompt_lens[i] for i in index], dtype=torch.long)
        return ids.to(device), mask.to(device), plens.to(device)


def preference_pairs(
    rows: Sequence[PreferenceRow], offsets: Sequence[int]
) -> list[tuple[int, int]]:
    """All (chosen, rejected) pairs of ``rows`` as global sequence ids (ranking rows expand to
    every pair of different tiers, ties skipped)."""
    return [
        (offsets[r] + w, offsets[r] + lo) for r, row in enumerate(rows) for w, lo in row.pairs()
    ]


def _unique(index: Sequence[int]) -> tuple[list[int], dict[int, int]]:
    order = sorted(set(index))
    return order, {s: i for i, s in enumerate(order)}


@torch.no_grad()
def all_logps(
    model,
    seqs: _Sequences,
    index: Sequence[int],
    *,
    pad_id: int,
    batch_size: int,
    device,
    should_stop: ShouldStop | None = None,
) -> torch.Tensor:
    """log π of sequences ``index`` in eval mode (no dropout) -> [len(index)] float32 on CPU.
    ``should_stop`` (only before training: see :func:`rlhf.loop.stop_point`) is checked
    before each batch. Under torchrun each rank computes its share and gets them all (the
    stop is then checked once, after: the ranks' shares differ in batches)."""
    out = []
    mine = distributed.local_part(index)
    every_batch = should_stop if distributed.world_size() == 1 else None
    with eval_mode(model):
        for i in checked(range(0, len(mine), batch_size), every_batch):
            ids, mask, plens = seqs.batch(mine[i : i + batch_size], pad_id, device)
            out.append(sequence_logps(model, ids, mask, plens).cpu())
    gathered = distributed.gather_shards(torch.cat(out) if out else torch.zeros(0))
    if every_batch is None:
        stop_point(should_stop)
    return gathered


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@distributed.data_parallel
@stops_while_loading("dpo")
def train_dpo(
    config: DPOConfig,
    data: list[dict],
    *,
    output_dir: str | os.PathLike,
    on_step: OnStep | None = None,
    should_stop: ShouldStop | None = None,
    resume_from: str | os.PathLike | None = None,
    eval_data: list[dict] | None = None,
) -> TrainResult:
    """Train the LoRA adapter "policy" with DPO on preference rows; return the last checkpoint.

    Reference log-probs of every sequence are computed once before training (see
    ``DPOConfig.reference``) and saved with each checkpoint, so a resumed run uses the same
    ones. on_step(step, metrics): ``loss/dpo``, ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margin``, ``rewards/accuracy``, ``logps/chosen``, ``logps/rejected``,
    ``perf/pairs_per_s``, ``perf/tokens_per_s``, ``optim/lr``, ``optim/grad_norm``,
    ``progress/total_steps``, and at evals the held-out ``eval/rewards_margin``,
    ``eval/rewards_accuracy`` and ``eval/loss_dpo``. should_stop() is checked before every
    step, and while the model loads, the data are tokenized and the reference log-probs are
    computed (a stop there returns stopped=True at the resume point, with nothing written).
    Under ``torchrun`` it trains data-parallel with the same global batch (module docstring).
    """
    cfg = config
    cfg.validate()
    rows = preference_rows(data)
    if eval_data is not None:
        train_rows, eval_rows = rows, preference_rows(eval_data)
    else:
        train_idx, eval_idx = split_eval(len(rows), fraction=cfg.eval_fraction, seed=cfg.seed)
        train_rows, eval_rows = [rows[i] for i in train_idx], [rows[i] for i in eval_idx]
    output_dir = Path(output_dir)
    seed_everything(cfg.seed)

    resume = resume_point(resume_from, "dpo", cfg)
    stop_point(should_stop)
    model, tokenizer, device, _dtype = load_policy(cfg, adapter_name=ADAPTER)
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    pad_id = tokenizer.pad_token_id

    # tokenize every completion once: train rows first, then eval rows
    seqs = _Sequences([], [])
    offsets: list[int] = []
    for r in checked(list(train_rows) + list(eval_rows), should_stop):
        offsets.append(len(seqs.ids))
        for c in r.completions:
            ids, plen = encode_prompt_completion(
                tokenizer, r.prompt, c, max_seq_len=cfg.max_seq_len, chat_template=cfg.chat_template
            )
            if len(ids) <= plen:
                raise DataError(
                    f"prompt {r.prompt[:40]!r}: no completion tokens left after truncation "
                    f"to max_seq_len={cfg.max_seq_len}"
                )
            seqs.ids.append(ids)
            seqs.prompt_lens.append(plen)
    train_pairs = preference_pairs(train_rows, offsets[: len(train_rows)])
    eval_pairs = preference_pairs(eval_rows, offsets[len(train_rows) :])
    eval_bs = cfg.eval_batch_size or 2 * cfg.batch_size

    params = trainable_parameters(model)
    optimizer, scheduler = optimizer_and_schedule(params, cfg)

    ref_logps = None
    if resume.checkpoint is not None:
        load_adapter_weights(model, resume.checkpoint, ADAPTER)
        training_state = load_training_state(resume.checkpoint, optimizer, scheduler)
        ref_logps = training_state.get("extra", {}).get("ref_logps")
    reference = resolve_reference(cfg.reference, cfg.init_adapter)
    if ref_logps is None or len(ref_logps) != len(seqs.ids):
        # π_ref once, before training. "init": the policy adapter as loaded (resume: reload it)
        every = list(range(len(seqs.ids)))

        def reference_logps() -> torch.Tensor:  # of the adapter active when called
            return all_logps(
                model,
                seqs,
                every,
                pad_id=pad_id,
                batch_size=eval_bs,
                device=device,
                should_stop=should_stop,
            )

        with oom_guard("eval_batch_size or max_seq_len"):
            if reference == "base":
                with model.disable_adapter():
                    ref_logps = reference_logps()
            elif resume_from is None:
                ref_logps = reference_logps()
            else:
                with kept_trainable_state(model):
                    load_frozen_adapter(
                        model, source_adapter_dir(cfg.init_adapter, ADAPTER), "reference"
                    )
                    with active_adapter(model, "reference"):
                        ref_logps = reference_logps()
                    model.delete_adapter("reference")
                    model.set_adapter(ADAPTER)
    ref_logps = ref_logps.float()
    distributed.broadcast_parameters(params)

    run_lineage = lineage(
        cfg,
        [{"prompt": r.prompt, "completions": r.completions, "ranking": r.groups} for r in rows],
        parent=resume.parent(cfg),
        reference=reference,
    )
    resume.check_data(run_lineage)
    pairs_per_step = cfg.batch_size * cfg.grad_accum_steps

    def eval_metrics() -> dict[str, float]:
        if not eval_pairs:
            return {}
        used, pos = _unique([s for pair in eval_pairs for s in pair])
        with oom_guard("eval_batch_size or max_seq_len"):
            lp = all_logps(model, seqs, used, pad_id=pad_id, batch_size=eval_bs, device=device)
        c = torch.tensor([pos[w] for w, _ in eval_pairs])
        r = torch.tensor([pos[lo] for _, lo in eval_pairs])
        ref_c = ref_logps[[w for w, _ in eval_pairs]]
        ref_r = ref_logps[[lo for _, lo in eval_pairs]]
        loss, chosen, rejected = dpo_loss(
            lp[c], lp[r], ref_c, ref_r, cfg.beta, label_smoothing=cfg.label_smoothing
        )
        return {
            "eval/loss_dpo": float(loss),
            "eval/rewards_margin": float((chosen - rejected).mean()),
            "eval/rewards_accuracy": float((chosen > rejected).float().mean()),
        }

    def checkpoint(step: int, metrics: dict[str, float]) -> Path:
        return save_run_checkpoint(
            output_dir,
            kind="dpo",
            cfg=cfg,
            step=step,
            metrics=metrics,
            lineage=run_lineage,
            model=model,
            adapters=[ADAPTER],
            optimizer=optimizer,
            scheduler=scheduler,
            extra={"ref_logps": ref_logps},
        )

    def train_step(step: int) -> dict[str, float]:
        t_start = time.perf_counter()
        idx = batch_indices(
            len(train_pairs), seed=cfg.seed, start=(step - 1) * pairs_per_step, count=pairs_per_step
        )
        sums = dict.fromkeys(("loss", "chosen", "rejected", "acc", "lp_c", "lp_r", "tokens"), 0.0)
        mine = distributed.local_part(idx)
        with oom_guard(
            "batch_size (pairs per micro-batch) or max_seq_len (or turn on gradient_checkpointing)"
        ):
            for m in range(0, len(mine), cfg.batch_size):
                pairs = [train_pairs[i] for i in mine[m : m + cfg.batch_size]]
                used, pos = _unique([s for pair in pairs for s in pair])  # each sequence once
                ids, mask, plens = seqs.batch(used, pad_id, device)
                lp = sequence_logps(model, ids, mask, plens)  # [U]
                c = torch.tensor([pos[w] for w, _ in pairs], device=lp.device)
                r = torch.tensor([pos[lo] for _, lo in pairs], device=lp.device)
                ref_c = ref_logps[[w for w, _ in pairs]].to(lp.device)
                ref_r = ref_logps[[lo for _, lo in pairs]].to(lp.device)
                loss, chosen, rejected = dpo_loss(
                    lp[c], lp[r], ref_c, ref_r, cfg.beta, label_smoothing=cfg.label_smoothing
                )
                loss = loss * (len(pairs) / len(idx))  # the mean over the step's pairs
                check_finite(loss, step, name="DPO loss")
                loss.backward()
                sums["loss"] += float(loss.detach())
                sums["chosen"] += float(chosen.sum())
                sums["rejected"] += float(rejected.sum())
                sums["acc"] += float((chosen > rejected).float().sum())
                sums["lp_c"] += float(lp[c].detach().sum())
                sums["lp_r"] += float(lp[r].detach().sum())
                sums["tokens"] += sum(len(seqs.ids[i]) for i in used)
            grad_norm, lr = optimizer_step(
                optimizer, scheduler, params, max_grad_norm=cfg.max_grad_norm, step=step
            )
        sync_device(device)
        sums = distributed.all_reduce_sums(sums)
        dt = max(time.perf_counter() - t_start, 1e-9)
        n = len(idx)
        return {
            "loss/dpo": sums["loss"],
            "rewards/chosen": sums["chosen"] / n,
            "rewards/rejected": sums["rejected"] / n,
            "rewards/margin": (sums["chosen"] - sums["rejected"]) / n,
            "rewards/accuracy": sums["acc"] / n,
            "logps/chosen": sums["lp_c"] / n,
            "logps/rejected": sums["lp_r"] / n,
            "perf/pairs_per_s": n / dt,
            "perf/tokens_per_s": sums["tokens"] / dt,
            "optim/lr": lr,
            "optim/grad_norm": grad_norm,
            "progress/epoch": step * pairs_per_step / len(train_pairs),
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
