"""What PPO and GRPO share: the config fields of an RL run, rollouts, log-probs, the reward
inputs and the KL estimators. Each algorithm's own maths lives in its module
(:mod:`rlhf.ppo`, :mod:`rlhf.grpo`); neither imports the other.

- Rollouts sample from the policy at ``temperature`` with the KV cache, and the training
  log-probs use the same temperature, so π_old is the sampling distribution (Huang et al. 2024,
  "The N+ Implementation Details of RLHF with PPO", arXiv:2403.17031). The model runs in
  ``eval()`` mode: no dropout in RL, so the first minibatch's probability ratio is exactly 1.
- The reward is a Python function ``(prompt, completion) -> float`` or a reward model
  (:class:`Rewarder`); a reward model on the policy's base is loaded as a frozen adapter of the
  SAME model, so one copy of the weights serves policy, reward and reference (InstructGPT,
  Ouyang et al. 2022, arXiv:2203.02155, section 3.5).
- KL estimators k1, k2, k3 of KL(π‖π_ref) from samples of π (Schulman 2020, "Approximating KL
  Divergence"): k1 in PPO's per-token reward (Ziegler et al. 2019, arXiv:1909.08593), k3 in
  GRPO's loss (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, eq. 4).

Under ``torchrun`` (:mod:`rlhf.distributed`) each rank takes a contiguous share of a step's
prompts (with all of a prompt's GRPO group), samples and scores them alone, from its own seed;
the statistics that the algorithms define over the batch (PPO's whitening, the minibatch
losses' token means, the metrics) are reduced over the ranks.

Shapes: B = rows (responses), R = response tokens; a mask is 1 on real response tokens.
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

from rlhf import distributed
from rlhf.checkpoint import read_state, resolve_checkpoint
from rlhf.config import BaseConfig, disable_dropout, resolve_reference
from rlhf.data import encode_prompt, encode_prompts, validate_rows
from rlhf.errors import ConfigError, NonFiniteLossError, RewardFunctionError
from rlhf.loop import (
    Resume,
    ShouldStop,
    batch_indices,
    lineage,
    resume_point,
    seed_everything,
    stop_point,
    sync_device,
)
from rlhf.modeling import (
    active_adapter,
    enable_gradient_checkpointing,
    load_frozen_adapter,
    load_policy,
    next_token_logits,
    source_adapter_dir,
    token_logprobs,
)
from rlhf.reward import RewardScorer
from rlhf.sampling import (
    MergedAdapter,
    check_generation_cache,
    ended_with_eos,
    eos_token_ids,
    generate,
    resolve_generation_cache,
)

log = logging.getLogger(__name__)

REFERENCE = "reference"
"""Name of the frozen adapter that holds π_ref when it is the init policy (``reference="init"``)."""

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

    reference: str = "auto"
    """The KL reference π_ref: "base" = the base model with adapters disabled; "init" = the
    policy as loaded from ``init_adapter`` (π_SFT, as InstructGPT sec. 3.5 penalises the KL
    to the SFT model), kept as a frozen adapter "reference" of the same model, also after a
    resume; "auto" = "init" when init_adapter is set, else "base" (the same model then)."""

    missing_eos_penalty: float | None = None
    """If set, subtract this from the score of every response that hit ``max_new_tokens``
    without an EOS, so running into the cap never pays (Huang et al. 2024 replace the score of
    such a response by -1; TRL's ``missing_eos_penalty``, default None)."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass of the updates to save memory (Chen et al.
    2016, arXiv:1604.06174); the forwards then run in train mode with every dropout set to 0,
    so they compute what eval mode computes."""

    mask_truncated_completions: bool = False
    """Leave responses that hit ``max_new_tokens`` without an EOS out of the policy loss: a cut
    response is not an outcome to learn from (Yu et al. 2025, DAPO, arXiv:2503.14476,
    "overlong filtering"; TRL's ``mask_truncated_completions``, default False)."""

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
        resolve_reference(self.reference, self.init_adapter)
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ConfigError(f"missing_eos_penalty must be >= 0, got {self.missing_eos_penalty}")


# --------------------------------------------------------------------------------------------
# Pure helpers: masked mean and KL estimators
# --------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (all of them, or along ``dim``)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def penalise_missing_eos(
    scores: torch.Tensor, ended: torch.Tensor, penalty: float | None
) -> torch.Tensor:
    """scores [B] minus ``penalty`` where ``ended`` [B] (bool: the response ended with an EOS)
    is False; unchanged when ``penalty`` is None."""
    if penalty is None:
        return scores
    return scores - penalty * (~ended).to(scores.dtype)


def loss_mask(
    response_mask: torch.Tensor, ended: torch.Tensor, *, mask_truncated: bool
) -> torch.Tensor:
    """The tokens the policy loss sees: response_mask [B, R], with the rows of truncated
    responses (``ended`` [B] False) zeroed when ``mask_truncated``."""
    if not mask_truncated:
        return response_mask
    return response_mask * ended.to(response_mask.dtype).unsqueeze(1)


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


# --------------------------------------------------------------------------------------------
# Log-probs of responses (generation: rlhf.sampling)
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
    """Log-probs [B, R] of the rollout's responses under ``adapter`` (None = adapters
    disabled: the base model), ``chunk`` rows at a time; optionally the per-token entropy."""
    B, R = ro.response_mask.shape
    logp = torch.zeros(B, R, device=ro.input_ids.device)
    ent = torch.zeros(B, R, device=ro.input_ids.device) if with_entropy else None
    # active_adapter puts the active adapter and every requires_grad flag back afterwards
    ctx = model.disable_adapter() if adapter is None else active_adapter(model, adapter)
    with ctx:
        for sl in row_chunks(B, chunk):
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


def row_chunks(n: int, size: int) -> list[slice]:
    """Slices of ``size`` rows (the last one shorter) covering ``range(n)``."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# --------------------------------------------------------------------------------------------
# Reward inputs
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
    """One score per response: a Python ``reward_fn``, a reward model checkpoint or a scorer.

    A reward model whose base is the policy's base (state.json lineage/config) is loaded as the
    frozen adapter "reward" + head into the SAME model (no second copy of the weights); any
    other reward model (e.g. an encoder) is loaded on its own.

    What a causal reward model reads (:attr:`reads`): with the policy's tokenizer, the
    generated token ids themselves ("ids"), with an EOS only where one was generated; with
    another tokenizer, the decoded text tokenized again ("text+eos"), EOS appended only to
    responses that ended. Either way a response cut at ``max_new_tokens`` is never scored as a
    finished one: the reward model was trained on completions that end with EOS and reads the
    reward at the last token. An encoder reward model and a scorer object get the text ("text").
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
        self.reads = "text"
        self.description = (
            getattr(reward_fn, "__qualname__", repr(reward_fn)) if reward_fn else None
        )
        if reward_model is not None:
            if isinstance(reward_model, (str, Path)):
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
        if isinstance(self.scorer, RewardScorer) and self.scorer.encoder.base_kind == "causal":
            same = self.scorer.encoder.tokenizer is tokenizer or (
                self.scorer.encoder.tokenizer.get_vocab() == tokenizer.get_vocab()
            )
            self.reads = "ids" if same else "text+eos"

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        *,
        responses: Sequence[Sequence[int]] | None = None,
        ended: Sequence[bool] | None = None,
    ) -> torch.Tensor:
        """Scores [B] (float32, CPU). ``responses``: each response's generated ids up to and
        including its EOS; ``ended``: whether it has one. Without them a causal reward model
        gets the text with an EOS appended, as in its training."""
        if self.reward_fn is not None:
            return torch.tensor(
                [
                    call_reward_fn(self.reward_fn, p, c)
                    for p, c in zip(prompts, completions, strict=True)
                ]
            )
        if self.reads == "text" or responses is None or ended is None:
            out = self.scorer(list(prompts), list(completions))
            return torch.as_tensor(out).detach().float().cpu()
        encoder = self.scorer.encoder
        eos = encoder.tokenizer.eos_token_id
        seqs = []
        for i, prompt in enumerate(prompts):
            if self.reads == "ids":
                ids = list(responses[i])
            else:
                ids = encoder.tokenizer(completions[i], add_special_tokens=False)["input_ids"]
                ids = ids + ([eos] if ended[i] and eos is not None else [])
            seqs.append(
                reward_input_ids(
                    encoder.tokenizer,
                    prompt,
                    ids,
                    max_seq_len=encoder.max_seq_len,
                    chat_template=encoder.chat_template,
                )
            )
        return score_token_ids(self.scorer, seqs)


def reward_input_ids(
    tokenizer, prompt: str, completion_ids: Sequence[int], *, max_seq_len: int, chat_template: bool
) -> list[int]:
    """What a causal reward model reads for one response: the prompt as in its training
    (:func:`rlhf.data.encode_prompt`: special tokens, chat template, cut from the left to
    ``max_seq_len - 1``) followed by ``completion_ids`` as given, then cut to ``max_seq_len``."""
    p_ids = encode_prompt(
        tokenizer, prompt, max_len=max(1, max_seq_len - 1), chat_template=chat_template
    )
    return (p_ids + list(completion_ids))[:max_seq_len]


@torch.no_grad()
def score_token_ids(scorer, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    """Rewards [N] (float32, CPU) of token-id sequences under a
    :class:`rlhf.reward.RewardScorer`, in its batches, with its adapter active."""
    out = []
    with active_adapter(scorer.rm.peft_model, scorer.adapter_name):
        for i in range(0, len(seqs), scorer.batch_size):
            ids, mask = scorer.encoder.batch(seqs[i : i + scorer.batch_size], scorer.device)
            out.append(scorer.rm(ids, mask).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


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
    reference_adapter: str | None = None  # π_ref's adapter; None = adapters disabled (the base)


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
    if cfg.batch_size < distributed.world_size():
        raise ConfigError(
            f"batch_size ({cfg.batch_size} prompts) must be at least the number of processes "
            f"({distributed.world_size()}): each one samples its own share of the prompts"
        )
    rows = validate_rows(kind, data)
    seed_everything(cfg.seed)
    resume = resume_point(resume_from, kind, cfg)
    stop_point(should_stop)
    model, tokenizer, device, _dtype = load_policy(cfg, init_from=resume.checkpoint)
    if cfg.gradient_checkpointing:  # checkpointing acts in train mode: make it dropout-free
        disable_dropout(model)
        enable_gradient_checkpointing(model)
    model.eval()
    reference = resolve_reference(cfg.reference, cfg.init_adapter)
    if reference == "init":  # π_SFT from init_adapter, also when the policy comes from a resume
        load_frozen_adapter(model, source_adapter_dir(cfg.init_adapter, "policy"), REFERENCE)
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
    run_lineage = lineage(
        cfg, rows, parent=resume.parent(cfg), reward=rewarder.description, reference=reference
    )
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
        reference_adapter=REFERENCE if reference == "init" else None,
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


# --------------------------------------------------------------------------------------------
# Rollouts
# --------------------------------------------------------------------------------------------


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


def rollout_seed(seed: int, step: int, rank: int) -> int:
    """The sampling seed of step ``step`` on rank ``rank``: each rank samples its own prompts
    from its own stream (rank 0's is the one-process seed)."""
    return seed * 1_000_003 + step + rank * 7_919_000_003


def make_rollout(*, cfg, step: int, run: RLRun, repeats: int) -> Rollout:
    """Step ``step``'s rollout: ``cfg.batch_size`` prompts of the seeded data order (under
    torchrun this rank's contiguous share of them), each ``repeats`` times in a row (GRPO's
    groups), one response each with the policy adapter, scored. Data order and sampling depend
    only on (seed, step, rank), so a resumed run repeats them exactly."""
    model, tokenizer, device, eos_ids = run.model, run.tokenizer, run.device, run.eos_ids
    idx = batch_indices(
        len(run.prompts), seed=cfg.seed, start=(step - 1) * cfg.batch_size, count=cfg.batch_size
    )
    prompts = [run.prompts[i] for i in distributed.local_part(idx) for _ in range(repeats)]
    torch.manual_seed(rollout_seed(cfg.seed, step, distributed.rank()))
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
    lengths = resp_mask.sum(1).tolist()  # up to and including the EOS, when there is one
    scores = run.rewarder(
        prompts,
        completions,
        responses=[row[:n] for row, n in zip(responses.tolist(), lengths, strict=True)],
        ended=ended.tolist(),
    ).to(device)  # [B]
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


def rollout_metrics(
    ro: Rollout, *, lr: float, score_s: float, train_s: float, sums: dict[str, float]
) -> dict:
    """The metrics PPO and GRPO share: mean score, response lengths, the learning rate the
    step's updates used (as SFT, reward and DPO report it), timings (the ranks' mean) and
    generated tokens per second of rollout; and ``sums`` (each algorithm's own sums) reduced
    over the ranks with them, in one all-reduce. Returns (metrics, reduced sums)."""
    mask = ro.response_mask
    total = distributed.all_reduce_sums(
        {
            **sums,
            "_rows": len(ro.prompts),
            "_score": float(ro.scores.double().sum()),
            "_tokens": float(mask.sum()),
            "_ended": float(ro.ended.sum()),
            "_rollout_s": ro.rollout_s,
            "_score_s": score_s,
            "_train_s": train_s,
        }
    )
    rows, world = total["_rows"], distributed.world_size()
    metrics = {
        "objective/reward": total["_score"] / rows,
        "response/length": total["_tokens"] / rows,
        "response/ended_with_eos": total["_ended"] / rows,
        "optim/lr": float(lr),
        "perf/rollout_s": total["_rollout_s"] / world,
        "perf/score_s": total["_score_s"] / world,
        "perf/train_s": total["_train_s"] / world,
        "perf/tokens_per_s": total["_tokens"] / max(total["_rollout_s"] / world, 1e-9),
    }
    return metrics, total


def minibatch_totals(
    orders: Sequence[torch.Tensor], minibatch: int, local: range, masks: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Tokens of every minibatch over all ranks: [len(orders) * minibatches, len(masks)].

    ``orders``: each pass's permutation of the global rows; ``local``: the global rows this
    rank holds (row ``local.start`` is its row 0); ``masks``: [b, R] masks of this rank's rows.
    A minibatch's loss is a mean over the tokens of all its rows, wherever they are."""
    counts = torch.stack([m.sum(1).double().cpu() for m in masks], 1)  # [b, len(masks)]
    out = []
    for order in orders:
        for rows in order.split(minibatch):
            mine = [int(r) - local.start for r in rows if int(r) in local]
            out.append(counts[mine].sum(0))
    return distributed.all_reduce_(torch.stack(out))


def local_chunks(rows: torch.Tensor, local: range, size: int, device) -> list[torch.Tensor]:
    """The global ``rows`` (of a minibatch) this rank holds, as its own row indexes on
    ``device`` (order kept), in micro-batches of ``size``; none when it holds none."""
    keep = (rows >= local.start) & (rows < local.stop)
    mine = (rows[keep] - local.start).to(device)
    return list(mine.split(size)) if len(mine) else []


@contextlib.contextmanager
def updating(model, cfg):
    """The policy updates: in train mode when ``cfg.gradient_checkpointing`` (checkpointing
    acts only there; :func:`start_rl_run` set every dropout to 0), else in eval mode."""
    if not cfg.gradient_checkpointing:
        yield
        return
    model.train()
    try:
        yield
    finally:
        model.eval()


def use_adapter(model, name: str, cfg) -> None:
    """Make adapter ``name`` the active one for an update forward (in train mode again when
    :func:`updating` put the model there)."""
    model.set_adapter(name)
    if cfg.gradient_checkpointing:
        model.train()
