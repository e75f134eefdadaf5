"""PPO for language models with LoRA roles on ONE base model.

Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (arXiv:1707.06347), applied to
language models as in Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences" (arXiv:1909.08593) and Ouyang et al. 2022 (InstructGPT, arXiv:2203.02155), with
the implementation details of Huang et al. 2024, "The N+ Implementation Details of RLHF with
PPO: A Case Study on TL;DR Summarization" (arXiv:2403.17031).

One PPO step (``train_ppo``):

1. Rollout: ``batch_size`` prompts, left-padded, ``generate`` with the KV cache and the policy
   adapter (merged into the base weights for the duration when ``merge_for_generation``).
2. Score: ``reward_fn(prompt, completion)`` or the reward model (a frozen LoRA adapter
   ``"reward"`` + head on the SAME base model when it shares it, else its own model) gives
   one score per completion.
3. Per-token reward (Ziegler et al. 2019, eq. 2): ``r_t = -β (log π(a_t) - log π_ref(a_t))``,
   plus the score at the last response token. π_ref = the init (SFT) policy, or the base model
   with adapters disabled when there is none (``config.reference``).
4. GAE (Schulman et al. 2016, arXiv:1506.02438) with γ = 1, λ = 0.95 on the values of the
   ``"value"`` adapter + :class:`ScalarHead`; advantages whitened over the batch.
5. ``ppo_epochs`` passes over ``num_minibatches`` minibatches: clipped policy loss and
   clipped value loss (Huang et al. 2024), one optimizer step each.

Roles on one copy of the base weights:

- policy: LoRA adapter ``"policy"`` (trainable; from ``config.init_adapter`` if set),
- value: LoRA adapter ``"value"`` + ScalarHead (trainable; initialised from the reward
  model's adapter and head when the reward model shares the base, as InstructGPT does),
- reward: frozen adapter ``"reward"`` + head (:class:`rlhf.reward.RewardScorer`) or a Python
  function,
- reference: the SFT policy the run starts from (``config.init_adapter``) as a frozen adapter
  ``"reference"`` (InstructGPT sec. 3.5: the KL is to the SFT model), else the same model
  inside ``with model.disable_adapter():`` (``config.reference``).

Dropout is off during PPO (the model stays in ``eval()`` mode, Huang et al. 2024) so
that the first minibatch's probability ratio is exactly 1.

Speed and memory:

- all prompts of a step are generated in ONE ``generate`` call under ``torch.no_grad`` with
  the KV cache, on CUDA a static one whose decoding step is compiled into a CUDA graph
  (``generation_cache``); with ``merge_for_generation`` the policy adapter is merged into the base
  weights (no LoRA matmuls per decoded token) and the base weights are then restored exactly
  from a saved CPU copy (:class:`rlhf.sampling.MergedAdapter`), so the reference never drifts;
- sampling is plain softmax sampling at ``temperature`` (no top-k/top-p), and the training
  log-probs use the same temperature, so π_old is the sampling distribution;
- log-probs take logits of the response positions only (``logits_to_keep``) and values read
  the decoder's last hidden state without any LM-head logits;
- in the update, the policy loss and the value loss are back-propagated one after the other
  (they touch disjoint parameters), so only one activation graph is alive at a time; columns
  that are padding in every row of a micro-batch are cut off; ``gradient_checkpointing``
  recomputes the activations in the backward pass.

Each loss is a token mean over its whole minibatch, so ``grad_accum_steps`` and the number of
processes change nothing but memory and speed: under ``torchrun`` each rank rolls out its
share of the prompts and the advantages are whitened over the global batch
(:mod:`rlhf.distributed`).

The rollout, the log-probs, the reward inputs and the KL estimators are shared with GRPO
(:mod:`rlhf.rl`); this module holds what is PPO's own: GAE, the clipped losses, the value
role and the KL controllers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf import distributed
from rlhf.checkpoint import load_head, load_training_state
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
from rlhf.modeling import (
    ScalarHead,
    adapter_dir,
    adapter_parameters,
    add_lora,
    backbone_of,
    hidden_size_of,
)
from rlhf.rl import (
    RewardFn,
    RLConfig,
    RLRun,
    kl_k1,
    local_chunks,
    loss_mask,
    make_rollout,
    masked_mean,
    minibatch_totals,
    penalise_missing_eos,
    position_ids_from_mask,
    response_logprobs,
    rollout_logprobs,
    rollout_metrics,
    row_chunks,
    start_rl_run,
    updating,
    use_adapter,
)
from rlhf.rl import call_reward_fn as call_reward_fn  # re-exported: tests/rlhf/test_user_errors.py

# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class PPOConfig(RLConfig):
    """PPO hyper-parameters. ``batch_size`` is the ROLLOUT batch: prompts per PPO step."""

    learning_rate: float = 5e-5
    """Peak AdamW rate. Huang et al. 2024 use 3e-6 for full fine-tuning; LoRA needs roughly
    10x more (Hu et al. 2021 train adapters at 1e-4..2e-4), and RL needs less than SFT."""

    batch_size: int = 64
    """Prompts per PPO step (the rollout batch). Ziegler et al. 2019 and Huang et al. 2024
    use 512 on many GPUs; 64 fits one GPU and keeps steps short."""

    num_minibatches: int = 4
    """Minibatches per rollout batch; one optimizer step each (InstructGPT splits its batch into
    minibatches; Huang et al. 2024's TL;DR runs use 1..4)."""

    ppo_epochs: int = 4
    """Passes over each rollout batch (Ziegler et al. 2019 and Huang et al. 2024: 4)."""

    max_steps: int = 100
    """PPO steps (rollout + ppo_epochs * num_minibatches optimizer steps each)."""

    max_seq_len: int = 512
    """Prompt + response tokens; prompts are cut from the left to max_seq_len - max_new_tokens."""

    max_new_tokens: int = 64
    """Response length cap (Huang et al. 2024 use 53 tokens for TL;DR; Ziegler et al. 24)."""

    temperature: float = 0.7
    """Sampling temperature for rollouts, also applied to the logits when log-probs are computed
    for training (Ziegler et al. 2019 and Huang et al. 2024 use 0.7)."""

    kl_coef: float = 0.05
    """β of the per-token KL penalty against the reference (Huang et al. 2024: 0.05; InstructGPT
    uses 0.02). With ``adaptive_kl`` it is the initial value."""

    adaptive_kl: bool = False
    """Adapt β towards ``kl_target`` with the proportional controller of Ziegler et al. 2019."""

    kl_target: float = 6.0
    """Target KL (nats per response) of the adaptive controller (Ziegler et al. 2019: 6)."""

    kl_horizon: int = 10000
    """Horizon of the adaptive controller in samples (Ziegler et al. 2019: 10000)."""

    gamma: float = 1.0
    """Discount (Ziegler et al. 2019 and InstructGPT: 1; the reward arrives at the end)."""

    lam: float = 0.95
    """GAE λ (Ziegler et al. 2019 and Huang et al. 2024: 0.95)."""

    cliprange_value: float = 0.2
    """Value clip around the rollout values (Ziegler et al. 2019 and Huang et al. 2024: 0.2)."""

    vf_coef: float = 0.1
    """Weight of the value loss (Ziegler et al. 2019 and Huang et al. 2024: 0.1)."""

    whiten_advantages: bool = True
    """Normalise advantages to mean 0, std 1 over the batch (Huang et al. 2024)."""

    whiten_rewards: bool = False
    """Normalise per-token rewards (scale only) before GAE (Huang et al. 2024: off for TL;DR)."""

    init_value_from_reward: bool = True
    """Start the value adapter and head from the reward model when it shares the base model
    (InstructGPT sec. 3.5: "we initialize the value function from the RM")."""

    def validate(self) -> None:
        super().validate()
        for name in ("ppo_epochs", "kl_horizon"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if not self.kl_target > 0:
            raise ConfigError(f"kl_target must be > 0, got {self.kl_target}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError(f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if not self.cliprange_value > 0:
            raise ConfigError(f"cliprange_value must be > 0, got {self.cliprange_value}")
        if self.vf_coef < 0:
            raise ConfigError(f"vf_coef must be >= 0, got {self.vf_coef}")


# --------------------------------------------------------------------------------------------
# Pure helpers (shapes: B = batch, T = response tokens; mask is 1 on real response tokens)
# --------------------------------------------------------------------------------------------


def masked_var(x: torch.Tensor, mask: torch.Tensor, *, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over masked positions (Bessel-corrected by default, as in TRL/Huang)."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n > 1:
            var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8):
    """Normalise ``x`` to unit (masked, unbiased) variance and, if ``shift_mean``, mean 0.

    Masked-out positions are 0 in the result. With ``shift_mean=False`` the mean is kept
    (used for rewards, Huang et al. 2024). The moments are those of the whole batch: under
    torchrun, of every rank's rows (sums reduced over the ranks).
    """
    if distributed.world_size() == 1:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        m = mask.to(x.dtype)
        sums = distributed.all_reduce_(torch.stack([(x * m).sum(), m.sum()]).double())
        n = float(sums[1])
        mean = (sums[0] / max(n, 1.0)).to(x.dtype)
        sq = distributed.all_reduce_(((x - mean) ** 2 * m).sum().double())
        var = (sq / max(n, 1.0) * (n / (n - 1) if n > 1 else 1.0)).to(x.dtype)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over response tokens.

    rewards, values, mask: [B, T]; the episode ends after the last masked token (its next
    value is 0). Returns ``(advantages [B, T], returns [B, T])`` with ``returns = adv + V``;
    both are 0 where mask is 0.

        δ_t = r_t + γ V_{t+1} - V_t,      A_t = δ_t + γ λ A_{t+1}
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    B, T = rewards.shape
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = adv
        # a masked position passes nothing back, so padding after the end is ignored
        next_value = values[:, t]
        next_adv = adv
    returns = (advantages + values) * mask
    return advantages, returns


def per_token_rewards(
    score: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ziegler et al. 2019 eq. 2: ``r_t = -β·k1_t``, plus the score at the last response token.

    score: [B]; logprobs, ref_logprobs, mask: [B, T] (mask 1 on response tokens, right padded).
    Returns ``(rewards [B, T], kl [B, T])`` where ``kl`` is the per-token k1 (masked).
    A response with no token (all-zero mask) gets nothing.
    """
    maskf = mask.to(logprobs.dtype)
    kl = kl_k1(logprobs, ref_logprobs) * maskf
    rewards = -kl_coef * kl
    lengths = mask.long().sum(1)  # [B]
    last = (lengths - 1).clamp(min=0)  # [B]
    has_tokens = (lengths > 0).to(rewards.dtype)
    rewards = rewards.clone()
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += (
        score.to(rewards.dtype) * has_tokens
    )
    return rewards, kl


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO-clip surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise.

    All inputs [B, T]. ``loss = mean_masked max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε))`` with
    ``ρ = exp(logπ - logπ_old)``. Returns ``(loss, clipfrac, approx_kl)`` where clipfrac is the
    fraction of tokens where the clipped term was the larger one, and approx_kl is the mean k3
    of π_old against π (a diagnostic).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(pg1, pg2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((pg2 > pg1).to(logprobs.dtype), mask)
        approx_kl = masked_mean(ratio - 1.0 - log_ratio, mask)
    return loss, clipfrac, approx_kl


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (Ziegler et al. 2019; Huang et al. 2024).

    ``0.5 · mean_masked max((V - R)², (V_old + clip(V - V_old, ±ε_v) - R)²)``.
    Returns ``(loss, clipfrac)``.
    """
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf1 = (values - returns) ** 2
    vf2 = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(vf1, vf2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((vf2 > vf1).to(values.dtype), mask)
    return loss, clipfrac


class AdaptiveKLController:
    """Proportional controller for β (Ziegler et al. 2019, section 2.2)::

        e_t = clip(KL_t / KL_target - 1, -0.2, 0.2),     β_{t+1} = β_t (1 + K_β e_t),

    with ``K_β = n_steps / horizon`` (n_steps = samples in the batch).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


class FixedKLController:
    """β that never changes (the default; InstructGPT and Huang et al. 2024 use a fixed β)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


def response_values(model, head, input_ids, attention_mask, response_len: int) -> torch.Tensor:
    """Values [B, R] of the states before each response token, from the active adapter's last
    hidden state and ``head`` (no LM-head logits are computed)."""
    hidden = backbone_of(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state  # [B, L, H]
    return head(hidden[:, -response_len - 1 : -1]).float()  # [B, R]


# --------------------------------------------------------------------------------------------
# The PPO trainer
# --------------------------------------------------------------------------------------------


@distributed.data_parallel
@stops_while_loading("ppo")
def train_ppo(
    config: PPOConfig,
    data: list[dict],
    *,
    output_dir,
    on_step: OnStep | None = None,
    should_stop: ShouldStop | None = None,
    resume_from=None,
    reward_model=None,
    reward_fn: RewardFn | None = None,
) -> TrainResult:
    """Train the policy adapter with PPO on ``{"prompt"}`` rows; see the module docstring.

    ``reward_model``: a reward-model checkpoint folder (or run folder), or a scorer object
    ``scorer(prompts, completions) -> Tensor[B]``. ``reward_fn(prompt, completion) -> float``:
    a Python reward (rule-based rewards). Give exactly one.

    ``on_step(step, metrics)`` after every PPO step with objective/reward, objective/kl,
    objective/entropy, objective/kl_coef, loss/policy, loss/value, policy/clipfrac,
    policy/approxkl, value/clipfrac, response/length, perf/rollout_s, perf/score_s,
    perf/train_s, perf/tokens_per_s (generated tokens per second of rollout) and
    progress/total_steps. Checkpoints hold the adapters "policy" and "value" and the head
    "value"; the KL coefficient of the adaptive controller is restored on resume.
    should_stop() is checked before every step and while the models load (a stop there returns
    stopped=True at the resume point, with nothing written).
    """
    cfg = config
    output_dir = Path(output_dir)
    run = start_rl_run(
        "ppo",
        cfg,
        data,
        resume_from=resume_from,
        reward_model=reward_model,
        reward_fn=reward_fn,
        should_stop=should_stop,
    )
    model, device, resume, rewarder = run.model, run.device, run.resume, run.rewarder

    # value role: adapter "value" + head, from the checkpoint / the reward model / fresh
    if resume.checkpoint is not None:
        model = add_lora(model, cfg, "value", init_from=resume.checkpoint)
        value_head = load_head(resume.checkpoint, "value")
    elif rewarder.shares_base and cfg.init_value_from_reward:
        model.load_adapter(
            str(adapter_dir(rewarder.checkpoint, "reward")), adapter_name="value", is_trainable=True
        )
        value_head = load_head(rewarder.checkpoint, "reward")
    else:
        model = add_lora(model, cfg, "value")
        value_head = ScalarHead(hidden_size_of(model))
    value_head = value_head.to(device=device, dtype=torch.float32)
    model.eval()

    policy_params = adapter_parameters(model, "policy")
    value_params = adapter_parameters(model, "value") + list(value_head.parameters())
    params = policy_params + value_params
    distributed.broadcast_parameters(params)
    optimizer, scheduler = optimizer_and_schedule(
        params, cfg, updates_per_step=cfg.ppo_epochs * cfg.num_minibatches
    )
    kl_ctl = (
        AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        if cfg.adaptive_kl
        else FixedKLController(cfg.kl_coef)
    )
    if resume.checkpoint is not None:
        training_state = load_training_state(resume.checkpoint, optimizer, scheduler)
        kl_ctl.value = float(training_state.get("extra", {}).get("kl_coef", kl_ctl.value))
    minibatch = cfg.batch_size // cfg.num_minibatches
    micro = minibatch // cfg.grad_accum_steps

    def checkpoint(step: int, metrics: dict[str, float]) -> Path:
        return save_run_checkpoint(
            output_dir,
            kind="ppo",
            cfg=cfg,
            step=step,
            metrics=metrics,
            lineage=run.lineage,
            model=model,
            adapters=["policy", "value"],
            heads={"value": value_head},
            optimizer=optimizer,
            scheduler=scheduler,
            extra={"kl_coef": kl_ctl.value},
        )

    def train_step(step: int) -> dict[str, float]:
        with oom_guard(
            "batch_size, max_new_tokens or max_seq_len (or raise num_minibatches / grad_accum_steps)"
        ):
            return _ppo_step(
                cfg=cfg,
                step=step,
                run=run,
                value_head=value_head,
                minibatch=minibatch,
                micro=micro,
                kl_ctl=kl_ctl,
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


def _ppo_step(
    *,
    cfg,
    step,
    run: RLRun,
    value_head,
    minibatch,
    micro,
    kl_ctl,
    optimizer,
    scheduler,
    params,
) -> dict[str, float]:
    model, device = run.model, run.device
    # 1-2. rollout and score (under torchrun: this rank's share of the prompts) ---------------
    ro = make_rollout(cfg=cfg, step=step, run=run, repeats=1)
    B = len(ro.prompts)
    local = range(
        *distributed.shard_bounds(cfg.batch_size, distributed.rank(), distributed.world_size())
    )
    t1 = time.perf_counter()
    scores = penalise_missing_eos(ro.scores, ro.ended, cfg.missing_eos_penalty)  # [B]
    mask = ro.response_mask  # [B, R]
    pg_mask = loss_mask(mask, ro.ended, mask_truncated=cfg.mask_truncated_completions)
    R = ro.response_len
    logprobs, entropy = rollout_logprobs(
        model, ro, adapter="policy", temperature=cfg.temperature, chunk=micro, with_entropy=True
    )
    ref_logprobs, _ = rollout_logprobs(
        model, ro, adapter=run.reference_adapter, temperature=cfg.temperature, chunk=micro
    )
    with torch.no_grad():
        model.set_adapter("value")
        values = torch.zeros(B, R, device=device)
        for sl in row_chunks(B, micro):
            values[sl] = response_values(
                model, value_head, ro.input_ids[sl], ro.attention_mask[sl], R
            )
        rewards, kl = per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_ctl.value)
        if cfg.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = compute_gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)
    sync_device(device)
    score_s = ro.score_s + time.perf_counter() - t1

    # 3. PPO epochs over minibatches of the global batch; each loss is a token mean over its
    # whole minibatch (all ranks, all micro-batches), so accumulation and ranks change nothing
    t2 = time.perf_counter()
    order_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    orders = [torch.randperm(cfg.batch_size, generator=order_gen) for _ in range(cfg.ppo_epochs)]
    totals = minibatch_totals(orders, minibatch, local, [pg_mask, mask])  # [updates, 2]
    stats = torch.zeros(len(totals), 5, dtype=torch.float64)  # pg, vf, clip, vclip, approxkl
    update = 0
    with updating(model, cfg):
        for order in orders:
            for mb_idx in order.split(minibatch):
                n_pg, n_v = (max(float(n), 1.0) for n in totals[update])
                for mi in local_chunks(mb_idx, local, micro, device):
                    ids, am, keep = ro.trimmed(mi)
                    m = mask[mi][:, :keep]
                    pgm = pg_mask[mi][:, :keep]
                    pg_share, v_share = float(pgm.sum()) / n_pg, float(m.sum()) / n_v

                    use_adapter(model, "policy", cfg)
                    new_logp, _ = response_logprobs(
                        model, ids, am, keep, temperature=cfg.temperature
                    )
                    pg_loss, clipfrac, approxkl = clipped_policy_loss(
                        new_logp,
                        logprobs[mi][:, :keep],
                        advantages[mi][:, :keep],
                        pgm,
                        cfg.cliprange,
                    )
                    check_finite(pg_loss, step, name="loss/policy")
                    (pg_loss * pg_share).backward()

                    use_adapter(model, "value", cfg)
                    new_values = response_values(model, value_head, ids, am, keep)
                    vf_loss, vclip = clipped_value_loss(
                        new_values,
                        values[mi][:, :keep],
                        returns[mi][:, :keep],
                        m,
                        cfg.cliprange_value,
                    )
                    check_finite(vf_loss, step, name="loss/value")
                    (cfg.vf_coef * vf_loss * v_share).backward()

                    stats[update] += torch.tensor(
                        [
                            float(pg_loss.detach()) * pg_share,
                            float(vf_loss.detach()) * v_share,
                            float(clipfrac) * pg_share,
                            float(vclip) * v_share,
                            float(approxkl) * pg_share,
                        ],
                        dtype=torch.float64,
                    )
                _, lr = optimizer_step(
                    optimizer, scheduler, params, max_grad_norm=cfg.max_grad_norm, step=step
                )
                update += 1
    model.set_adapter("policy")
    sync_device(device)
    train_s = time.perf_counter() - t2
    pg, vf, clip, vclip, approxkl = distributed.all_reduce_(stats).mean(0).tolist()

    seq_kl = kl.sum(1)  # [B] k1 summed over the response
    kl_coef = kl_ctl.value
    metrics, total = rollout_metrics(
        ro,
        lr=lr,
        score_s=score_s,
        train_s=train_s,
        sums={
            "kl": float(seq_kl.double().sum()),
            "rlhf_reward": float((scores - kl_coef * seq_kl).double().sum()),
            "entropy": float((entropy * mask).double().sum()),
        },
    )
    mean_kl = total["kl"] / total["_rows"]
    kl_ctl.update(mean_kl, cfg.batch_size)

    return {
        **metrics,
        "objective/rlhf_reward": total["rlhf_reward"] / total["_rows"],
        "objective/kl": mean_kl,
        "objective/entropy": total["entropy"] / max(total["_tokens"], 1.0),
        "objective/kl_coef": kl_coef,
        "loss/policy": pg,
        "loss/value": vf,
        "policy/clipfrac": clip,
        "policy/approxkl": approxkl,
        "value/clipfrac": vclip,
    }
