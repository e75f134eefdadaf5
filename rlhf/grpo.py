"""Group Relative Policy Optimization (GRPO) with a LoRA policy.

Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
Language Models" (arXiv:2402.03300), section 4.1. For each prompt q, G completions
o_1..o_G are sampled from the current policy and scored r_1..r_G; there is no value model:
every token of o_i gets the group-normalised advantage (outcome supervision, sec. 4.1.2)::

    Â_i = (r_i - mean(r_1..r_G)) / std(r_1..r_G)

and the objective (eq. 3), maximised, is

    1/G Σ_i 1/|o_i| Σ_t [ min(ρ_it Â_i, clip(ρ_it, 1-ε, 1+ε) Â_i) - β D_KL(π_θ ‖ π_ref)_it ]

with ρ_it = π_θ(o_it | q, o_i<t) / π_θold(o_it | ...) and the per-token KL estimated by k3
(eq. 4: π_ref/π_θ - log π_ref/π_θ - 1). The reference is the policy the run starts from
(``init_adapter``, as a frozen adapter) or the base model with adapters disabled
(``config.reference``), so GRPO keeps one copy of the weights.

``loss_type`` picks how token terms are summed into the loss (:func:`grpo_loss`):

- "grpo": as above, each completion's mean over its own |o_i| tokens, then the mean over
  completions. Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective"
  (arXiv:2503.20783, sec. 3.1) show the 1/|o_i| is a length bias: a long wrong answer is
  penalised less per token than a short one, which favours growing incorrect responses.
- "dr_grpo" (Dr. GRPO, Liu et al. 2025, eq. 4): the token sums divided by one constant,
  ``max_new_tokens``, for every completion (then the mean over completions). The paper's Dr.
  GRPO also drops the std scaling of the advantages: ``scale_rewards=False``.
- "dapo": token-level, the sum over every token of the minibatch divided by its number of
  tokens (Yu et al. 2025, DAPO, arXiv:2503.14476, eq. 8). Rollouts, reward inputs and checkpoints are
shared with PPO (:mod:`rlhf.rl`).

Under ``torchrun`` each rank samples and scores its share of the prompts, every prompt's
whole group on one rank (the group statistics are per prompt); each minibatch's loss is
weighted by the minibatch's completions or tokens over all ranks (:func:`micro_batch_share`),
so the summed gradients are one process's (:mod:`rlhf.distributed`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf import distributed
from rlhf.checkpoint import load_training_state
from rlhf.errors import ConfigError
from rlhf.loop import (
    OnStep,
    ShouldStop,
    TrainResult,
    check_finite,
    oom_guard,
    optimizer_and_schedule,
    optimizer_step,
    run_steps,
    save_run_checkpoint,
    stops_while_loading,
    sync_device,
)
from rlhf.modeling import adapter_parameters
from rlhf.rl import (
    RewardFn,
    RLConfig,
    RLRun,
    kl_k1,
    kl_k3,
    local_chunks,
    loss_mask,
    make_rollout,
    masked_mean,
    minibatch_totals,
    penalise_missing_eos,
    response_logprobs,
    rollout_logprobs,
    rollout_metrics,
    start_rl_run,
    updating,
)

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


@dataclass
class GRPOConfig(RLConfig):
    """GRPO hyper-parameters. ``batch_size`` counts PROMPTS per step; each gets
    ``num_generations`` completions, so a step samples batch_size * num_generations."""

    learning_rate: float = 1e-5
    """Peak AdamW rate. DeepSeekMath uses 1e-6 for full fine-tuning; LoRA needs roughly 10x more
    (Hu et al. 2021)."""

    batch_size: int = 8
    """Prompts per step (DeepSeekMath: 1024 completions = 16 prompts x 64 on a cluster)."""

    num_generations: int = 8
    """G, completions sampled per prompt (DeepSeekMath: 64; TRL's default: 8)."""

    num_iterations: int = 1
    """μ, policy updates per batch of samples (DeepSeekMath: 1, so the ratio starts at 1)."""

    max_steps: int = 100
    """Steps (sampling + num_iterations * num_minibatches optimizer steps each)."""

    max_seq_len: int = 512
    """Prompt + completion tokens; prompts are cut from the left to max_seq_len - max_new_tokens."""

    beta: float = 0.04
    """KL coefficient β against the reference (DeepSeekMath sec. 4.2: 0.04). 0 drops the term."""

    scale_rewards: bool = True
    """Divide the advantages by the group's std (DeepSeekMath sec. 4.1.2). False keeps only the
    mean baseline: one of Dr. GRPO's two changes (Liu et al. 2025: the std scaling is a
    question-difficulty bias); the other is ``loss_type="dr_grpo"``."""

    loss_type: str = "grpo"
    """How token terms become the loss: "grpo" (each completion's token mean, DeepSeekMath eq.
    3), "dr_grpo" (token sums / max_new_tokens, Liu et al. 2025; with scale_rewards=False this
    is their Dr. GRPO) or "dapo" (token sum / tokens of the minibatch, Yu et al. 2025). TRL's
    GRPOConfig offers the same three."""

    def rollout_rows(self) -> tuple[str, int]:
        return "batch_size * num_generations", self.batch_size * self.num_generations

    def validate(self) -> None:
        super().validate()
        if self.num_generations < 2:
            raise ConfigError(
                f"num_generations must be >= 2 (a group needs a baseline), got {self.num_generations}"
            )
        if self.num_iterations <= 0:
            raise ConfigError(f"num_iterations must be > 0, got {self.num_iterations}")
        if self.beta < 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(
                f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}"
            )


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """Group-normalised advantages (Shao et al. 2024, sec. 4.1.2).

    rewards: [N * G], the G completions of each prompt consecutive. Returns [N * G]:
    ``(r - mean_group) / (std_group + eps)`` (unbiased std, as torch.std and TRL), or only
    ``r - mean_group`` when ``scale`` is False. A group whose rewards are all equal gets 0.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)  # [N, G]
    adv = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (grouped.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange: float,
    beta: float,
    loss_type: str = "grpo",
    max_new_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss (minus eq. 3 of Shao et al. 2024) for a batch of completions.

    logprobs, old_logprobs, ref_logprobs, mask: [B, T]; advantages: [B] (one per completion).
    Per token ``max(-ρÂ, -clip(ρ)Â) + β·k3``, then by ``loss_type`` (module docstring):
    "grpo" averages over each completion's tokens, then over completions; "dr_grpo" sums each
    completion's tokens and divides by ``max_new_tokens``, then averages over completions;
    "dapo" divides the sum over all tokens by their number. Returns ``(loss, stats)`` with
    clipfrac and the mean k3 (detached).
    """
    adv = advantages.to(logprobs.dtype).unsqueeze(1).expand_as(logprobs)  # [B, T]
    ratio = torch.exp(logprobs - old_logprobs)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    per_token = torch.maximum(pg1, pg2)
    kl = None
    if ref_logprobs is not None and beta > 0:
        kl = kl_k3(logprobs, ref_logprobs)
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = masked_mean(per_token, mask, dim=1).mean()
    elif loss_type == "dr_grpo":
        if not max_new_tokens:
            raise ValueError('loss_type="dr_grpo" needs max_new_tokens (the constant divisor)')
        loss = (per_token * mask.to(per_token.dtype)).sum(1).mean() / max_new_tokens
    elif loss_type == "dapo":
        loss = masked_mean(per_token, mask)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg2 > pg1).to(logprobs.dtype), mask),
            "kl_k3": masked_mean(kl, mask) if kl is not None else torch.zeros(()),
        }
    return loss, stats


def micro_batch_share(
    loss_type: str, micro_mask: torch.Tensor, *, rows: int, tokens: float
) -> float:
    """The weight of a micro-batch's :func:`grpo_loss` in its minibatch's loss, so that the
    weighted sum over micro-batches (and ranks) is the loss of the whole minibatch: its share
    of the completions (the loss is a mean over completions), or for "dapo" of the loss
    tokens. ``micro_mask`` [b, R]: the micro-batch's loss mask; ``rows``, ``tokens``: the
    minibatch's completions and loss tokens over every rank."""
    if loss_type == "dapo":
        return float(micro_mask.sum()) / max(float(tokens), 1.0)
    return micro_mask.shape[0] / rows


@distributed.data_parallel
@stops_while_loading("grpo")
def train_grpo(
    config: GRPOConfig,
    data: list[dict],
    *,
    output_dir,
    on_step: OnStep | None = None,
    should_stop: ShouldStop | None = None,
    resume_from=None,
    reward_model=None,
    reward_fn: RewardFn | None = None,
) -> TrainResult:
    """Train the policy adapter with GRPO on ``{"prompt"}`` rows.

    Reward inputs as :func:`rlhf.ppo.train_ppo` (exactly one of ``reward_model``, a reward
    checkpoint or scorer, and ``reward_fn(prompt, completion) -> float``). ``on_step`` gets
    objective/reward, objective/reward_std (mean within-group std), objective/kl (mean summed
    k1 per completion against the reference), objective/entropy, loss/policy, loss/kl (mean k3),
    policy/clipfrac, response/length, perf/rollout_s, perf/score_s, perf/train_s,
    perf/tokens_per_s and progress/total_steps. Checkpoints hold the adapter "policy".
    should_stop() is checked before every step and while the models load (a stop there returns
    stopped=True at the resume point, with nothing written).
    """
    cfg = config
    output_dir = Path(output_dir)
    run = start_rl_run(
        "grpo",
        cfg,
        data,
        resume_from=resume_from,
        reward_model=reward_model,
        reward_fn=reward_fn,
        should_stop=should_stop,
    )
    model, resume = run.model, run.resume
    params = adapter_parameters(model, "policy")
    optimizer, scheduler = optimizer_and_schedule(
        params, cfg, updates_per_step=cfg.num_iterations * cfg.num_minibatches
    )
    if resume.checkpoint is not None:
        load_training_state(resume.checkpoint, optimizer, scheduler)
    distributed.broadcast_parameters(params)

    def checkpoint(step: int, metrics: dict[str, float]) -> Path:
        return save_run_checkpoint(
            output_dir,
            kind="grpo",
            cfg=cfg,
            step=step,
            metrics=metrics,
            lineage=run.lineage,
            model=model,
            adapters=["policy"],
            optimizer=optimizer,
            scheduler=scheduler,
        )

    def train_step(step: int) -> dict[str, float]:
        with oom_guard(
            "batch_size, num_generations, max_new_tokens or max_seq_len "
            "(or raise num_minibatches / grad_accum_steps)"
        ):
            return _grpo_step(
                cfg=cfg,
                step=step,
                run=run,
                optimizer=optimizer,
                scheduler=scheduler,
                params=params,
            )

    return run_steps(
        cfg,
        resume=resume,
        train_step=train_step,
        checkpoint=checkpoint,
        on_step=on_step,
        should_stop=should_stop,
    )


def _grpo_step(
    *,
    cfg,
    step,
    run: RLRun,
    optimizer,
    scheduler,
    params,
) -> dict[str, float]:
    G = cfg.num_generations
    model, device = run.model, run.device
    ro = make_rollout(cfg=cfg, step=step, run=run, repeats=G)  # [n*G], groups consecutive
    N = cfg.batch_size * G  # rows of the step over all ranks; this rank holds `local` of them
    start, end = distributed.shard_bounds(
        cfg.batch_size, distributed.rank(), distributed.world_size()
    )
    local = range(start * G, end * G)
    minibatch = N // cfg.num_minibatches
    micro = minibatch // cfg.grad_accum_steps
    mask = ro.response_mask  # [n*G, R]

    t1 = time.perf_counter()
    scores = penalise_missing_eos(ro.scores, ro.ended, cfg.missing_eos_penalty)  # [n*G]
    advantages = group_advantages(scores, G, scale=cfg.scale_rewards)  # groups are on one rank
    pg_mask = loss_mask(mask, ro.ended, mask_truncated=cfg.mask_truncated_completions)
    # π_old: needed when the policy moves before a sample is used (several minibatches or
    # iterations); with one update per batch the ratio is 1 and logπ.detach() stands in.
    reuse = cfg.num_iterations * cfg.num_minibatches > 1
    old_logprobs, entropy = rollout_logprobs(
        model, ro, adapter="policy", temperature=cfg.temperature, chunk=micro, with_entropy=True
    )
    ref_logprobs, _ = rollout_logprobs(
        model, ro, adapter=run.reference_adapter, temperature=cfg.temperature, chunk=micro
    )
    model.set_adapter("policy")
    sync_device(device)
    score_s = ro.score_s + time.perf_counter() - t1

    t2 = time.perf_counter()
    order_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    orders = [
        torch.randperm(N, generator=order_gen) if reuse else torch.arange(N)
        for _ in range(cfg.num_iterations)
    ]
    tokens = minibatch_totals(orders, minibatch, local, [pg_mask])[:, 0]  # [updates]
    stats = torch.zeros(len(tokens), 3, dtype=torch.float64)  # loss, clipfrac, k3
    update = 0
    with updating(model, cfg):
        for order in orders:
            for rows in order.split(minibatch):
                n_tokens = max(float(tokens[update]), 1.0)
                for mi in local_chunks(rows, local, micro, device):
                    ids, am, keep = ro.trimmed(mi)
                    m = pg_mask[mi][:, :keep]
                    logp, _ = response_logprobs(model, ids, am, keep, temperature=cfg.temperature)
                    old = old_logprobs[mi][:, :keep] if reuse else logp.detach()
                    loss, st = grpo_loss(
                        logp,
                        old,
                        ref_logprobs[mi][:, :keep],
                        advantages[mi],
                        m,
                        cliprange=cfg.cliprange,
                        beta=cfg.beta,
                        loss_type=cfg.loss_type,
                        max_new_tokens=cfg.max_new_tokens,
                    )
                    check_finite(loss, step, name="loss/policy")
                    share = micro_batch_share(
                        cfg.loss_type, pg_mask[mi], rows=len(rows), tokens=n_tokens
                    )
                    (loss * share).backward()
                    token_share = float(m.sum()) / n_tokens
                    stats[update] += torch.tensor(
                        [
                            float(loss.detach()) * share,
                            float(st["clipfrac"]) * token_share,
                            float(st["kl_k3"]) * token_share,
                        ],
                        dtype=torch.float64,
                    )
                _, lr = optimizer_step(
                    optimizer, scheduler, params, max_grad_norm=cfg.max_grad_norm, step=step
                )
                update += 1
    sync_device(device)
    train_s = time.perf_counter() - t2
    loss_mean, clipfrac, k3 = distributed.all_reduce_(stats).mean(0).tolist()

    metrics, total = rollout_metrics(
        ro,
        lr=lr,
        score_s=score_s,
        train_s=train_s,
        sums={
            "group_std": float(ro.scores.view(-1, G).std(dim=1).double().sum()),
            "kl": float((kl_k1(old_logprobs, ref_logprobs) * mask).sum(1).double().sum()),
            "entropy": float((entropy * mask).double().sum()),
        },
    )
    return {
        **metrics,
        "objective/reward_std": total["group_std"] / cfg.batch_size,
        "objective/kl": total["kl"] / total["_rows"],
        "objective/entropy": total["entropy"] / max(total["_tokens"], 1.0),
        "loss/policy": loss_mean,
        "loss/kl": k3,
        "policy/clipfrac": clipfrac,
    }
