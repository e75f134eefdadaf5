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
  the KV cache; with ``merge_for_generation`` the policy adapter is merged into the base
  weights (no LoRA matmuls per decoded token) and the base weights are then restored exactly
  from a saved CPU copy (:class:`MergedGeneration`), so the reference never drifts;
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
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rlhf.checkpoint import (
    load_head,
    load_training_state,
    read_state,
    resolve_checkpoint,
    save_checkpoint,
)
from rlhf.config import BaseConfig, config_to_dict
from rlhf.data import encode_prompt, pad_sequences, validate_rows
from rlhf.errors import ConfigError, NonFiniteLossError
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
)
from rlhf.modeling import (
    ScalarHead,
    adapter_dir,
    add_lora,
    hidden_size_of,
    load_causal_lm,
    load_tokenizer,
    resolve_device_dtype,
)

# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class PPOConfig(BaseConfig):
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

    cliprange: float = 0.2
    """Policy ratio clip ε (Schulman et al. 2017 and Ziegler et al. 2019: 0.2)."""

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

    chat_template: bool = False
    """Wrap prompts with the tokenizer's chat template (use the same setting as the SFT run)."""

    merge_for_generation: bool = True
    """Merge the policy adapter into the base weights while generating (no LoRA matmuls per
    token), then restore the exact base weights from a saved copy."""

    lora_dropout: float = 0.0
    """LoRA dropout; 0 because PPO runs without dropout (Huang et al. 2024)."""

    warmup_ratio: float = 0.0
    """No warm-up: Huang et al. 2024 anneal the rate linearly from its peak."""

    def validate(self) -> None:
        super().validate()
        for name in ("num_minibatches", "ppo_epochs", "max_new_tokens", "kl_horizon"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.batch_size % self.num_minibatches:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be divisible by num_minibatches "
                f"({self.num_minibatches})"
            )
        mini = self.batch_size // self.num_minibatches
        if mini % self.grad_accum_steps:
            raise ConfigError(
                f"the minibatch size batch_size/num_minibatches = {mini} must be divisible by "
                f"grad_accum_steps ({self.grad_accum_steps})"
            )
        if self.max_new_tokens >= self.max_seq_len:
            raise ConfigError(
                f"max_new_tokens ({self.max_new_tokens}) must be < max_seq_len ({self.max_seq_len})"
            )
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if not self.kl_target > 0:
            raise ConfigError(f"kl_target must be > 0, got {self.kl_target}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError(f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if not self.cliprange > 0 or not self.cliprange_value > 0:
            raise ConfigError("cliprange and cliprange_value must be > 0")
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
# Model plumbing shared with GRPO: prompts, generation, log-probs, values
# --------------------------------------------------------------------------------------------


def encode_prompts(
    tokenizer, prompts: Sequence[str], *, max_len: int, chat_template: bool, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise prompts as SFT does (:func:`rlhf.data.encode_prompt`), keep their last
    ``max_len`` tokens and LEFT-pad them so generated tokens line up on the right.
    Returns ``(ids [B, P], mask [B, P])``."""
    seqs = [
        encode_prompt(tokenizer, p, max_len=max_len, chat_template=chat_template) for p in prompts
    ]
    ids, mask = pad_sequences(seqs, tokenizer.pad_token_id, side="left")
    return ids.to(device), mask.to(device)


def eos_token_ids(tokenizer, model) -> list[int]:
    """Every token id that ends a response (tokenizer EOS + the model's generation config)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(int(i) for i in gen_eos)
    return sorted(ids)


def response_mask_after_eos(
    responses: torch.Tensor, eos_ids: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [B, R] that is 1 up to and including the first EOS, and a [B] bool "ended with EOS"."""
    is_eos = torch.zeros_like(responses, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= responses == e
    seen_before = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # an EOS strictly before t
    return (~seen_before).long(), is_eos.any(1)


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
    per-token entropy [B, R]. Only the R + 1 last positions get logits (``logits_to_keep``),
    which saves a [B, L, V] tensor."""
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    try:
        out = model(**kwargs, logits_to_keep=response_len + 1)
    except TypeError:  # an architecture without logits_to_keep: all positions get logits
        out = model(**kwargs)
    logits = out.logits[:, -response_len - 1 : -1].float() / temperature  # [B, R, V]
    targets = input_ids[:, -response_len:]  # [B, R]
    lse = torch.logsumexp(logits, dim=-1)  # [B, R]
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, entropy


def response_values(model, head, input_ids, attention_mask, response_len: int) -> torch.Tensor:
    """Values [B, R] of the states before each response token, from the active adapter's last
    hidden state and ``head`` (no LM-head logits are computed)."""
    backbone = model.get_base_model().base_model  # the decoder without its LM head
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state  # [B, L, H]
    return head(hidden[:, -response_len - 1 : -1]).float()  # [B, R]


class MergedGeneration:
    """Generate with adapter ``name`` MERGED into the base weights (no LoRA matmuls per token).

    peft's unmerge subtracts the delta again, which in bf16 does not give back the same bits and
    would drift the frozen base (the reference policy) over many steps; so the base weights of
    the adapted layers are saved once (on the CPU, pinned on CUDA) and copied back after every
    merge, which restores them exactly.
    """

    def __init__(self, model, name: str):
        from peft.tuners.lora import LoraLayer

        self.name = name
        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer) and name in m.lora_A]
        self.backup: list[torch.Tensor] | None = None

    @contextlib.contextmanager
    def merged(self):
        if self.backup is None:
            self.backup = []
            for m in self.layers:
                w = m.get_base_layer().weight.detach().to("cpu", copy=True)
                self.backup.append(
                    w.pin_memory() if w.device.type == "cpu" and torch.cuda.is_available() else w
                )
        for m in self.layers:
            m.merge(adapter_names=[self.name])
        try:
            yield
        finally:
            for m, w in zip(self.layers, self.backup, strict=True):
                m.unmerge()
                m.get_base_layer().weight.data.copy_(w, non_blocking=True)
            if torch.cuda.is_available():
                torch.cuda.synchronize()


@torch.no_grad()
def generate_responses(
    model,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    pad_token_id: int,
    eos_ids: Sequence[int],
    merger: MergedGeneration | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample responses for left-padded prompts with the KV cache, pure sampling at
    ``temperature``: top-k, top-p, min-p and repetition penalties that a model's own
    generation_config may set are switched off, so the sampling distribution is the one the
    log-probs are computed from (Huang et al. 2024). An immediate EOS is allowed.

    Returns ``(response_ids [B, R], response_mask [B, R], ended [B])``; tokens after the first
    EOS are set to pad and masked out.
    """
    ctx = merger.merged() if merger is not None else contextlib.nullcontext()
    with ctx:
        out = model.generate(
            input_ids=query_ids,
            attention_mask=query_mask,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            min_p=None,
            typical_p=1.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_token_id,
            eos_token_id=list(eos_ids),
            use_cache=True,
        )
    responses = out[:, query_ids.shape[1] :]
    mask, ended = response_mask_after_eos(responses, eos_ids)
    responses = responses.masked_fill(mask == 0, pad_token_id)
    return responses, mask, ended


# --------------------------------------------------------------------------------------------
# Policy model, value role and reward, shared with GRPO
# --------------------------------------------------------------------------------------------

RewardFn = Callable[[str, str], float]


def load_policy_model(cfg: BaseConfig, *, resume: Path | None):
    """Tokenizer + base model + adapter "policy" (from the checkpoint being resumed, else from
    ``cfg.init_adapter``, else fresh). The model is put in eval mode: no dropout in RL."""
    device, dtype = resolve_device_dtype(cfg)
    tokenizer = load_tokenizer(cfg.model)
    base = load_causal_lm(cfg.model, device=device, dtype=dtype)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    model = add_lora(base, cfg, "policy", init_from=resume)
    model.eval()
    return model, tokenizer, device, dtype


def adapter_parameters(model, name: str) -> list[nn.Parameter]:
    """The LoRA parameters of adapter ``name`` (made trainable), in a stable order."""
    params = [p for n, p in model.named_parameters() if f".{name}." in n]
    for p in params:
        p.requires_grad_(True)
    return params


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
                if self.shares_base:
                    self.scorer = RewardScorer.from_checkpoint(
                        self.checkpoint, model=model, tokenizer=tokenizer, device=device
                    )
                    for n, p in model.named_parameters():  # the reward adapter stays frozen
                        if ".reward." in n:
                            p.requires_grad_(False)
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
                [float(self.reward_fn(p, c)) for p, c in zip(prompts, completions, strict=True)]
            )
        return torch.as_tensor(self.scorer(list(prompts), list(completions))).detach().float().cpu()


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
    """
    cfg = config
    cfg.validate()
    rows = validate_rows("ppo", data)
    prompts = [r["prompt"] for r in rows]
    output_dir = Path(output_dir)
    seed_everything(cfg.seed)

    resume = resolve_checkpoint(resume_from) if resume_from is not None else None
    saved = read_state(resume) if resume is not None else None
    if saved is not None and saved.get("kind") != "ppo":
        raise ConfigError(f"{resume} is a {saved.get('kind')!r} checkpoint, not a PPO one")

    model, tokenizer, device, _dtype = load_policy_model(cfg, resume=resume)
    rewarder = Rewarder(
        cfg=cfg,
        model=model,
        tokenizer=tokenizer,
        device=device,
        reward_model=reward_model,
        reward_fn=reward_fn,
    )

    # value role: adapter "value" + head, from the checkpoint / the reward model / fresh
    if resume is not None:
        model = add_lora(model, cfg, "value", init_from=resume)
        value_head = load_head(resume, "value")
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
    optimizer = make_optimizer(params, cfg)
    updates_per_step = cfg.ppo_epochs * cfg.num_minibatches
    total_updates = cfg.max_steps * updates_per_step
    scheduler = warmup_cosine(
        optimizer, int(round(cfg.warmup_ratio * total_updates)), total_updates
    )
    kl_ctl = (
        AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        if cfg.adaptive_kl
        else FixedKLController(cfg.kl_coef)
    )

    start_step = 0
    parent = cfg.init_adapter
    if resume is not None:
        training_state = load_training_state(resume, optimizer, scheduler)
        kl_ctl.value = float(training_state.get("extra", {}).get("kl_coef", kl_ctl.value))
        start_step = int(saved["step"])
        parent = saved.get("lineage", {}).get("parent", parent)
    run_lineage = lineage(cfg, rows, parent=parent, reward=rewarder.description)

    eos_ids = eos_token_ids(tokenizer, model)
    merger = MergedGeneration(model, "policy") if cfg.merge_for_generation else None
    minibatch = cfg.batch_size // cfg.num_minibatches
    micro = minibatch // cfg.grad_accum_steps

    def checkpoint(step: int, metrics: dict[str, float]) -> Path:
        state = {
            "kind": "ppo",
            "config": config_to_dict(cfg),
            "metrics": metrics,
            "lineage": run_lineage,
            "adapters": ["policy", "value"],
            "heads": ["value"],
        }
        return save_checkpoint(
            output_dir,
            step=step,
            model=model,
            adapter_names=["policy", "value"],
            heads={"value": value_head},
            optimizer=optimizer,
            scheduler=scheduler,
            state=state,
            extra={"kl_coef": kl_ctl.value},
        )

    metrics: dict[str, float] = {}
    last_ckpt: Path | None = None
    step = start_step
    hint = "batch_size, max_new_tokens or max_seq_len (or raise num_minibatches / grad_accum_steps)"
    while step < cfg.max_steps:
        if call_should_stop(should_stop):
            last_ckpt = checkpoint(step, metrics)
            return TrainResult(checkpoint_dir=last_ckpt, step=step, metrics=metrics, stopped=True)
        step += 1
        with oom_guard(hint):
            metrics = _ppo_step(
                cfg=cfg,
                step=step,
                model=model,
                tokenizer=tokenizer,
                value_head=value_head,
                rewarder=rewarder,
                prompts=prompts,
                device=device,
                eos_ids=eos_ids,
                merger=merger,
                minibatch=minibatch,
                micro=micro,
                kl_ctl=kl_ctl,
                optimizer=optimizer,
                scheduler=scheduler,
                params=params,
            )
        metrics["progress/total_steps"] = float(cfg.max_steps)
        if on_step is not None:
            on_step(step, dict(metrics))
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            last_ckpt = checkpoint(step, metrics)

    if step > start_step or last_ckpt is None:
        last_ckpt = checkpoint(step, metrics)
    return TrainResult(checkpoint_dir=last_ckpt, step=step, metrics=metrics, stopped=False)


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


def make_rollout(
    *,
    cfg,
    step: int,
    model,
    tokenizer,
    rewarder: Rewarder,
    prompts: list[str],
    device,
    eos_ids,
    merger,
) -> Rollout:
    """Generate one response per prompt with the policy adapter and score it."""
    t0 = time.perf_counter()
    query, query_mask = encode_prompts(
        tokenizer,
        prompts,
        max_len=cfg.max_seq_len - cfg.max_new_tokens,
        chat_template=cfg.chat_template,
        device=device,
    )
    model.set_adapter("policy")
    responses, resp_mask, ended = generate_responses(
        model,
        query,
        query_mask,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        pad_token_id=tokenizer.pad_token_id,
        eos_ids=eos_ids,
        merger=merger,
    )  # [B, R]
    _sync(device)
    rollout_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
    scores = rewarder(prompts, completions).to(device)  # [B]
    check_scores(scores, step, completions)
    _sync(device)
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
    model,
    tokenizer,
    value_head,
    rewarder,
    prompts,
    device,
    eos_ids,
    merger,
    minibatch,
    micro,
    kl_ctl,
    optimizer,
    scheduler,
    params,
) -> dict[str, float]:
    B = cfg.batch_size
    # data order and sampling depend only on (seed, step): a resumed run repeats them exactly
    idx = batch_indices(len(prompts), seed=cfg.seed, start=(step - 1) * B, count=B)
    torch.manual_seed(cfg.seed * 1_000_003 + step)

    # 1-2. rollout and score ------------------------------------------------------------------
    ro = make_rollout(
        cfg=cfg,
        step=step,
        model=model,
        tokenizer=tokenizer,
        rewarder=rewarder,
        prompts=[prompts[i] for i in idx],
        device=device,
        eos_ids=eos_ids,
        merger=merger,
    )
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
    _sync(device)
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
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if not math.isfinite(float(grad_norm)):
                raise NonFiniteLossError(
                    f"gradient norm is {float(grad_norm)} at step {step}; lower learning_rate or "
                    "max_grad_norm. The last good checkpoint is kept."
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    model.set_adapter("policy")
    _sync(device)
    train_s = time.perf_counter() - t2

    seq_kl = kl.sum(1)  # [B] k1 summed over the response
    mean_kl = float(seq_kl.mean())
    kl_coef = kl_ctl.value
    kl_ctl.update(mean_kl, B)

    def mean(xs: list[float]) -> float:
        return sum(xs) / max(len(xs), 1)

    return {
        "objective/reward": float(ro.scores.mean()),
        "objective/rlhf_reward": float((scores - kl_coef * seq_kl).mean()),
        "objective/kl": mean_kl,
        "objective/entropy": float(masked_mean(entropy, mask)),
        "objective/kl_coef": kl_coef,
        "loss/policy": mean(stats["pg"]),
        "loss/value": mean(stats["vf"]),
        "policy/clipfrac": mean(stats["clip"]),
        "policy/approxkl": mean(stats["approxkl"]),
        "value/clipfrac": mean(stats["vclip"]),
        "response/length": float(mask.sum(1).mean()),
        "response/ended_with_eos": float(ro.ended.float().mean()),
        "optim/lr": float(scheduler.get_last_lr()[0]),
        "perf/rollout_s": ro.rollout_s,
        "perf/score_s": score_s,
        "perf/train_s": train_s,
        "perf/tokens_per_s": float(mask.sum()) / max(ro.rollout_s, 1e-9),
    }


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
