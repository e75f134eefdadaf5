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
   plus the score at the last response token. π_ref = the base model with adapters disabled.
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
- reference: the same model inside ``with model.disable_adapter():``.

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
  that are padding in every row of a micro-batch are cut off.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf.checkpoint import load_head, load_training_state, read_state, resolve_checkpoint
from rlhf.config import BaseConfig
from rlhf.data import encode_prompts, validate_rows
from rlhf.errors import ConfigError, NonFiniteLossError, RewardFunctionError
from rlhf.loop import (
    OnStep,
    Resume,
    ShouldStop,
    TrainResult,
    batch_indices,
    check_finite,
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
    ScalarHead,
    adapter_dir,
    adapter_parameters,
    add_lora,
    backbone_of,
    hidden_size_of,
    load_policy,
    next_token_logits,
    token_logprobs,
)
from rlhf.sampling import (
    MergedAdapter,
    check_generation_cache,
    ended_with_eos,
    eos_token_ids,
    generate,
    resolve_generation_cache,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class RLConfig(BaseConfig):
    """Fields PPO and GRPO share: rollouts by sampling, minibatches, ratio clipping, no
    dropout and no warm-up. ``batch_size`` counts PROMPTS per step."""

    num_minibatches: int = 1
    """Minibatches per batch of samples, one optimizer step each (GRPO: DeepSeekMath uses 1)."""

    max_new_tokens: int = 128
    """Response length cap; generation also stops at EOS (GRPO: TRL's GRPOConfig default
    max_completion_length is 256; 128 here)."""

    temperature: float = 1.0
    """Sampling temperature of the rollouts, also applied to the logits when log-probs are
    computed for training, so π_old is the sampling distribution (Huang et al. 2024; GRPO:
    TRL's default 1.0)."""

    cliprange: float = 0.2
    """Policy ratio clip ε (Schulman et al. 2017, Ziegler et al. 2019, DeepSeekMath: 0.2)."""

    chat_template: bool = False
    """Wrap prompts with the tokenizer's chat template (use the same setting as the SFT run)."""

    merge_for_generation: bool = True
    """Merge the policy adapter into the base weights while generating (no LoRA matmuls per
    token), then restore the exact base weights from a saved copy
    (:class:`rlhf.sampling.MergedAdapter`)."""

    generation_cache: str = "auto"
    """KV cache of the rollouts: "static" (fixed shape, so on CUDA the decoding step is
    compiled into a CUDA graph once, in the first step, and replayed every token after),
    "dynamic" (the plain growing cache, no compile) or "auto" (static on CUDA, else dynamic)."""

    lora_dropout: float = 0.0
    """No dropout in RL, so log-probs at sampling and update time agree (Huang et al. 2024)."""

    warmup_ratio: float = 0.0
    """No warm-up: Huang et al. 2024 anneal the rate linearly from its peak; DeepSeekMath
    trains GRPO at a constant rate."""

    def rollout_rows(self) -> tuple[str, int]:
        """(how it is computed, number of sampled responses per step)."""
        return "batch_size", self.batch_size

    def validate(self) -> None:
        super().validate()
        check_generation_cache(self.generation_cache)
        for name in ("num_minibatches", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        label, rows = self.rollout_rows()
        if rows % self.num_minibatches:
            raise ConfigError(
                f"{label} ({rows}) must be divisible by num_minibatches ({self.num_minibatches})"
            )
        mini = rows // self.num_minibatches
        if mini % self.grad_accum_steps:
            raise ConfigError(
                f"the minibatch size {label}/num_minibatches = {mini} must be divisible by "
                f"grad_accum_steps ({self.grad_accum_steps})"
            )
        if self.max_new_tokens >= self.max_seq_len:
            raise ConfigError(
                f"max_new_tokens ({self.max_new_tokens}) must be < max_seq_len ({self.max_seq_len})"
            )
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not self.cliprange > 0:
            raise ConfigError(f"cliprange must be > 0, got {self.cliprange}")


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

    missing_eos_penalty: float | None = None
    """If set, subtract this from the score of responses that hit max_new_tokens without an
    EOS (Huang et al. 2024 replaces their score by -1)."""

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


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (all of them, or along ``dim``)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


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
    (used for rewards, Huang et al. 2024).
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
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


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log π(a) - log π_ref(a): unbiased per-sample KL(π‖π_ref), high variance (Schulman,
    "Approximating KL Divergence", 2020). Used in the PPO reward (Ziegler et al. 2019)."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log π(a) - log π_ref(a))²: biased, low variance, always >= 0."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = r - 1 - log r with r = π_ref(a)/π(a): unbiased, low variance, always >= 0
    (Schulman 2020; the GRPO KL term, Shao et al. 2024 eq. 4)."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1.0


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
# Model plumbing shared with GRPO: log-probs and values (generation: rlhf.sampling)
# --------------------------------------------------------------------------------------------


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` uses them: [B, L]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_len: int,
    *,
    temperature: float,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [B, R] of the last ``response_len`` tokens of ``input_ids`` [B, L] under the
    active adapter, at ``temperature`` (Huang et al. 2024), and optionally the
    per-token entropy [B, R]. Only the R response positions go through the LM head
    (:func:`rlhf.modeling.next_token_logits`), which saves a [B, L, V] tensor."""
    B, L = input_ids.shape
    select = torch.zeros(B, L - 1, dtype=torch.bool, device=input_ids.device)
    select[:, -response_len:] = True  # position t predicts token t+1: the response tokens
    logits = next_token_logits(
        model,
        input_ids,
        attention_mask,
        select,
        position_ids=position_ids_from_mask(attention_mask),
    )  # [B*R, V]
    logp, entropy = token_logprobs(
        logits,
        input_ids[:, -response_len:].reshape(-1),
        temperature=temperature,
        with_entropy=with_entropy,
    )
    return logp.view(B, response_len), (
        entropy.view(B, response_len) if entropy is not None else None
    )


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
# Reward inputs, shared with GRPO
# --------------------------------------------------------------------------------------------

RewardFn = Callable[[str, str], float]


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


class Rewarder:
    """One score per (prompt, completion): a Python ``reward_fn`` or a reward model checkpoint.

    A reward model whose base is the policy's base (state.json lineage/config) is loaded as the
    frozen adapter "reward" + head into the SAME model (no second copy of the weights); any
    other reward model (e.g. an encoder) is loaded on its own.
    """

    def __init__(
        self, *, cfg: BaseConfig, model, tokenizer, device, reward_model=None, reward_fn=None
    ):
        if (reward_model is None) == (reward_fn is None):
            raise ConfigError("give exactly one of reward_model (a reward checkpoint) or reward_fn")
        self.reward_fn = reward_fn
        self.scorer = None
        self.checkpoint: Path | None = None
        self.shares_base = False
        self.description = (
            getattr(reward_fn, "__qualname__", repr(reward_fn)) if reward_fn else None
        )
        if reward_model is not None:
            if isinstance(reward_model, (str, Path)):
                from rlhf.reward import RewardScorer

                self.checkpoint = resolve_checkpoint(reward_model)
                state = read_state(self.checkpoint)
                rm_base = state.get("lineage", {}).get("base_model") or state.get("config", {}).get(
                    "model", ""
                )
                self.shares_base = bool(rm_base) and _same_model(str(rm_base), cfg.model)
                if self.shares_base:  # loaded as the frozen adapter "reward" of this model
                    self.scorer = RewardScorer.from_checkpoint(
                        self.checkpoint, model=model, tokenizer=tokenizer, device=device
                    )
                else:
                    self.scorer = RewardScorer.from_checkpoint(self.checkpoint, device=device)
                self.description = str(self.checkpoint)
            else:  # an already built scorer: scorer(prompts, completions) -> Tensor[B]
                self.scorer = reward_model
                self.description = type(reward_model).__name__

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        if self.reward_fn is not None:
            return torch.tensor(
                [
                    call_reward_fn(self.reward_fn, p, c)
                    for p, c in zip(prompts, completions, strict=True)
                ]
            )
        return torch.as_tensor(self.scorer(list(prompts), list(completions))).detach().float().cpu()


def call_reward_fn(fn: Callable[[str, str], float], prompt: str, completion: str) -> float:
    """``fn(prompt, completion)`` as a float; RewardFunctionError, naming the completion, when
    it raises or returns something that is not a number (NaN is caught by check_scores)."""
    try:
        value = fn(prompt, completion)
    except Exception as exc:
        raise RewardFunctionError(
            f"the reward function raised {type(exc).__name__}: {exc} "
            f"(completion {completion[:60]!r}); the run stopped, keeping its last checkpoint"
        ) from exc
    try:
        if value is None or isinstance(value, bool | str | bytes):
            raise TypeError
        return float(value)  # numbers, numpy scalars, one-number arrays and tensors
    except (TypeError, ValueError, RuntimeError):
        raise RewardFunctionError(
            f"the reward function returned {value!r} ({type(value).__name__}), not a number"
        ) from None


@dataclass
class RLRun:
    """What PPO and GRPO set up alike: prompts, the resume point, ONE policy model (adapter
    "policy", eval mode: no dropout in RL, Huang et al. 2024), the reward, the lineage and the
    generation helpers."""

    prompts: list[str]
    resume: Resume
    model: Any
    tokenizer: Any
    device: torch.device
    rewarder: Rewarder
    lineage: dict[str, Any]
    eos_ids: list[int]
    merger: MergedAdapter | None


def start_rl_run(
    kind: str,
    cfg,
    data: list[dict],
    *,
    resume_from,
    reward_model,
    reward_fn,
    should_stop: ShouldStop | None = None,
) -> RLRun:
    """Validate, seed, find the resume point, load the policy and the reward (see
    :class:`Rewarder`) for a PPO or GRPO run; ``should_stop`` is checked before each load
    (:func:`rlhf.loop.stop_point`)."""
    cfg.validate()
    rows = validate_rows(kind, data)
    seed_everything(cfg.seed)
    resume = resume_point(resume_from, kind, cfg)
    stop_point(should_stop)
    model, tokenizer, device, _dtype = load_policy(cfg, init_from=resume.checkpoint)
    model.eval()
    stop_point(should_stop)  # the reward model may be a second large model to load
    rewarder = Rewarder(
        cfg=cfg,
        model=model,
        tokenizer=tokenizer,
        device=device,
        reward_model=reward_model,
        reward_fn=reward_fn,
    )
    if resolve_generation_cache(cfg.generation_cache, device) == "static" and device.type == "cuda":
        log.info(
            "rollouts use a static KV cache: the first step compiles the decoding step into a "
            "CUDA graph (tens of seconds), later steps replay it"
        )
    run_lineage = lineage(cfg, rows, parent=resume.parent(cfg), reward=rewarder.description)
    resume.check_data(run_lineage)
    stop_point(should_stop)
    return RLRun(
        prompts=[r["prompt"] for r in rows],
        resume=resume,
        model=model,
        tokenizer=tokenizer,
        device=device,
        rewarder=rewarder,
        lineage=run_lineage,
        eos_ids=eos_token_ids(tokenizer, model),
        merger=MergedAdapter(model, "policy") if cfg.merge_for_generation else None,
    )


def check_scores(scores: torch.Tensor, step: int, completions: Sequence[str]) -> None:
    """Raise NonFiniteLossError when a reward is NaN/inf (before it reaches the loss)."""
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise NonFiniteLossError(
            f"the reward is {float(scores[i])} at step {step} for completion {i} "
            f"({completions[i][:60]!r}); fix the reward function or reward model. "
            "The last good checkpoint is kept."
        )


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# --------------------------------------------------------------------------------------------
# The PPO trainer
# --------------------------------------------------------------------------------------------


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


@dataclass
class Rollout:
    """One batch of sampled responses. Shapes: B rows, P prompt tokens (left padded), R response
    tokens (right padded after the first EOS)."""

    prompts: list[str]
    completions: list[str]
    input_ids: torch.Tensor  # [B, P+R] prompt + response
    attention_mask: torch.Tensor  # [B, P+R]
    prompt_len: int  # P
    response_mask: torch.Tensor  # [B, R] float, 1 on response tokens up to and including EOS
    ended: torch.Tensor  # [B] bool: the response ended with an EOS
    scores: torch.Tensor  # [B] rewards as given by the reward function / model
    rollout_s: float
    score_s: float

    @property
    def response_len(self) -> int:
        return self.input_ids.shape[1] - self.prompt_len

    def trimmed(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``rows`` of (input_ids, attention_mask) without the columns that are padding in every
        one of them, and the response length kept (positions are unchanged)."""
        P = self.prompt_len
        keep = max(int(self.response_mask[rows].sum(1).max()), 1)
        left = int(self.attention_mask[rows, :P].sum(1).max())
        cols = slice(P - left, P + keep)
        return self.input_ids[rows][:, cols], self.attention_mask[rows][:, cols], keep


def make_rollout(*, cfg, step: int, run: RLRun, repeats: int) -> Rollout:
    """Step ``step``'s rollout: ``cfg.batch_size`` prompts of the seeded data order, each
    ``repeats`` times in a row (GRPO's groups), one response each with the policy adapter,
    scored. Data order and sampling depend only on (seed, step), so a resumed run repeats
    them exactly."""
    model, tokenizer, device, eos_ids = run.model, run.tokenizer, run.device, run.eos_ids
    idx = batch_indices(
        len(run.prompts), seed=cfg.seed, start=(step - 1) * cfg.batch_size, count=cfg.batch_size
    )
    prompts = [run.prompts[i] for i in idx for _ in range(repeats)]
    torch.manual_seed(cfg.seed * 1_000_003 + step)
    t0 = time.perf_counter()
    query, query_mask = encode_prompts(
        tokenizer,
        prompts,
        max_len=cfg.max_seq_len - cfg.max_new_tokens,
        chat_template=cfg.chat_template,
        device=device,
    )
    model.set_adapter("policy")
    with run.merger.merged() if run.merger is not None else contextlib.nullcontext():
        responses, resp_mask = generate(
            model,
            tokenizer,
            query,
            query_mask,
            temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens,
            eos_ids=eos_ids,
            cache=resolve_generation_cache(cfg.generation_cache, device),
            max_cache_len=cfg.max_seq_len,  # one cache shape, one compiled graph, for the run
        )  # [B, R]; pad after the first EOS
    ended = ended_with_eos(responses, eos_ids)
    sync_device(device)
    rollout_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
    scores = run.rewarder(prompts, completions).to(device)  # [B]
    check_scores(scores, step, completions)
    sync_device(device)
    return Rollout(
        prompts=list(prompts),
        completions=completions,
        input_ids=torch.cat([query, responses], 1),
        attention_mask=torch.cat([query_mask, resp_mask], 1),
        prompt_len=query.shape[1],
        response_mask=resp_mask.float(),
        ended=ended,
        scores=scores,
        rollout_s=rollout_s,
        score_s=time.perf_counter() - t1,
    )


def rollout_metrics(ro: Rollout, *, lr: float, score_s: float, train_s: float) -> dict:
    """The metrics PPO and GRPO share: mean score, response lengths, the learning rate the
    step's updates used (as SFT, reward and DPO report it), timings and generated tokens per
    second of rollout."""
    mask = ro.response_mask
    return {
        "objective/reward": float(ro.scores.mean()),
        "response/length": float(mask.sum(1).mean()),
        "response/ended_with_eos": float(ro.ended.float().mean()),
        "optim/lr": float(lr),
        "perf/rollout_s": ro.rollout_s,
        "perf/score_s": score_s,
        "perf/train_s": train_s,
        "perf/tokens_per_s": float(mask.sum()) / max(ro.rollout_s, 1e-9),
    }


def list_mean(xs: list[float]) -> float:
    """The mean of a list of per-minibatch statistics (0 for none)."""
    return sum(xs) / max(len(xs), 1)


@torch.no_grad()
def rollout_logprobs(
    model,
    ro: Rollout,
    *,
    adapter: str | None,
    temperature: float,
    chunk: int,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [B, R] of the rollout's responses under ``adapter`` (None = the reference:
    adapters disabled), ``chunk`` rows at a time; optionally the per-token entropy."""
    B, R = ro.response_mask.shape
    logp = torch.zeros(B, R, device=ro.input_ids.device)
    ent = torch.zeros(B, R, device=ro.input_ids.device) if with_entropy else None
    ctx = model.disable_adapter() if adapter is None else contextlib.nullcontext()
    if adapter is not None:
        model.set_adapter(adapter)
    with ctx:
        for sl in _chunks(B, chunk):
            lp, e = response_logprobs(
                model,
                ro.input_ids[sl],
                ro.attention_mask[sl],
                R,
                temperature=temperature,
                with_entropy=with_entropy,
            )
            logp[sl] = lp
            if ent is not None:
                ent[sl] = e
    return logp, ent


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
    B = cfg.batch_size
    model, device = run.model, run.device
    # 1-2. rollout and score ------------------------------------------------------------------
    ro = make_rollout(cfg=cfg, step=step, run=run, repeats=1)
    t1 = time.perf_counter()
    scores = ro.scores
    if cfg.missing_eos_penalty is not None:
        scores = scores - cfg.missing_eos_penalty * (~ro.ended).float()
    mask = ro.response_mask  # [B, R]
    R = ro.response_len
    logprobs, entropy = rollout_logprobs(
        model, ro, adapter="policy", temperature=cfg.temperature, chunk=micro, with_entropy=True
    )
    ref_logprobs, _ = rollout_logprobs(
        model, ro, adapter=None, temperature=cfg.temperature, chunk=micro
    )
    with torch.no_grad():
        model.set_adapter("value")
        values = torch.zeros(B, R, device=device)
        for sl in _chunks(B, micro):
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

    # 3. PPO epochs over minibatches -----------------------------------------------------------
    t2 = time.perf_counter()
    stats: dict[str, list[float]] = {k: [] for k in ("pg", "vf", "clip", "vclip", "approxkl")}
    order_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    for _epoch in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=order_gen).to(device)
        for mb_start in range(0, B, minibatch):
            mb_idx = order[mb_start : mb_start + minibatch]
            for mi in mb_idx.split(micro):
                ids, am, keep = ro.trimmed(mi)
                m = mask[mi][:, :keep]

                model.set_adapter("policy")
                new_logp, _ = response_logprobs(model, ids, am, keep, temperature=cfg.temperature)
                pg_loss, clipfrac, approxkl = clipped_policy_loss(
                    new_logp, logprobs[mi][:, :keep], advantages[mi][:, :keep], m, cfg.cliprange
                )
                check_finite(pg_loss, step, name="loss/policy")
                (pg_loss / cfg.grad_accum_steps).backward()

                model.set_adapter("value")
                new_values = response_values(model, value_head, ids, am, keep)
                vf_loss, vclip = clipped_value_loss(
                    new_values, values[mi][:, :keep], returns[mi][:, :keep], m, cfg.cliprange_value
                )
                check_finite(vf_loss, step, name="loss/value")
                (cfg.vf_coef * vf_loss / cfg.grad_accum_steps).backward()

                stats["pg"].append(float(pg_loss.detach()))
                stats["vf"].append(float(vf_loss.detach()))
                stats["clip"].append(float(clipfrac))
                stats["vclip"].append(float(vclip))
                stats["approxkl"].append(float(approxkl))
            _, lr = optimizer_step(
                optimizer, scheduler, params, max_grad_norm=cfg.max_grad_norm, step=step
            )
    model.set_adapter("policy")
    sync_device(device)
    train_s = time.perf_counter() - t2

    seq_kl = kl.sum(1)  # [B] k1 summed over the response
    mean_kl = float(seq_kl.mean())
    kl_coef = kl_ctl.value
    kl_ctl.update(mean_kl, B)

    return {
        **rollout_metrics(ro, lr=lr, score_s=score_s, train_s=train_s),
        "objective/rlhf_reward": float((scores - kl_coef * seq_kl).mean()),
        "objective/kl": mean_kl,
        "objective/entropy": float(masked_mean(entropy, mask)),
        "objective/kl_coef": kl_coef,
        "loss/policy": list_mean(stats["pg"]),
        "loss/value": list_mean(stats["vf"]),
        "policy/clipfrac": list_mean(stats["clip"]),
        "policy/approxkl": list_mean(stats["approxkl"]),
        "value/clipfrac": list_mean(stats["vclip"]),
    }
