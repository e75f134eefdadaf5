"""Reward model: a LoRA adapter + scalar head trained on K-wise rankings (InstructGPT sec. 3.5).

Ouyang et al. 2022, "Training language models to follow instructions with human feedback"
(arXiv:2203.02155), section 3.5, equation 1::

    loss(θ) = -1/C(K,2) · E_(x, y_w, y_l) [ log σ( r_θ(x, y_w) - r_θ(x, y_l) ) ]

A labeler ranks K completions of one prompt; that gives up to C(K,2) comparisons. They are
highly correlated, so instead of shuffling them into the data set as separate examples (which
overfits in one epoch), every prompt is ONE batch element: its K completions are encoded once
(K forward passes, not 2·C(K,2)) and all of its pairs enter the loss, averaged per prompt.

Rankings are tiers, best first: ``[[2], [0, 3], [1]]`` means 2 > 0 = 3 > 1. Completions in
the same tier are ties and make no pair. ``{"prompt", "chosen", "rejected"}`` rows are the
K=2 case ``[[0], [1]]``.

Model. One base model (a causal LM, or an encoder such as a sentence-transformers MiniLM,
detected from its config) with a LoRA adapter named ``"reward"`` and a :class:`ScalarHead`:

- causal LM: the reward is the head applied to the last hidden state at the last non-pad
  token of ``prompt + completion + EOS`` (right padding), as in Ziegler et al. 2019 and
  InstructGPT (the reward is read where the response ends);
- encoder: ``[CLS] prompt [SEP] completion [SEP]`` pooled as the sentence-transformers
  pooling config says (mean over tokens for all-MiniLM-L6-v2), else the [CLS] state.

After training, the head's bias is shifted so that the rewards of the training completions
(the reference set) have mean 0, as InstructGPT does before RL (sec. 3.5: "normalized so that
the labeler demonstrations achieve a mean score of 0"); the shift is stored in the head.

Under ``torchrun`` each rank takes a contiguous share of a step's prompts; each prompt's loss
is divided by the number of prompts with pairs in the whole step, so the ranks' summed
gradients are one process's (:mod:`rlhf.distributed`). Held-out and reference rewards are
computed in shares and gathered.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from rlhf import distributed
from rlhf.checkpoint import (
    load_adapter_weights,
    load_head,
    load_training_state,
    read_state,
    resolve_checkpoint,
)
from rlhf.config import OfflineConfig, disable_dropout
from rlhf.data import encode_prompt_completion, pad_sequences, validate_rows
from rlhf.errors import ConfigError
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
    ScalarHead,
    active_adapter,
    adapter_dir,
    backbone_of,
    enable_gradient_checkpointing,
    eval_mode,
    fit_tokenizer,
    hidden_size_of,
    last_token_index,
    load_causal_lm,
    load_frozen_adapter,
    load_tokenizer,
    loading_model,
    lora_config,
    pick_device_dtype,
    resolve_device_dtype,
    source_adapter_dir,
    trainable_parameters,
)
from rlhf.rankings import ranking_pairs
from rlhf.sft import resolve_auto_batch, split_eval

# --------------------------------------------------------------------------------------------
# Pure helpers: rankings -> pairs (rlhf.rankings.ranking_pairs) -> loss
# --------------------------------------------------------------------------------------------


def pairwise_ranking_loss(rewards: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """The K-wise InstructGPT loss of ONE prompt: mean over its pairs of -log σ(r_w - r_l).

    rewards: [K] the rewards of the prompt's K completions (each encoded once).
    groups: the ranking as tiers of indices into ``rewards``, best first; ties are skipped.
    Returns a scalar; it equals the mean of the explicit pairwise losses. A ranking with no
    strict preference (all tied) gives 0 with a gradient of 0.
    """
    pairs = ranking_pairs(groups)
    if not pairs:
        return rewards.sum() * 0.0
    idx = torch.tensor(pairs, dtype=torch.long, device=rewards.device)  # [P, 2]
    margin = rewards[idx[:, 0]] - rewards[idx[:, 1]]  # [P]
    return -F.logsigmoid(margin).mean()


def batch_pair_index(
    rankings: Sequence[Sequence[Sequence[int]]], *, device=None, num_prompts: int | None = None
):
    """Flatten the pairs of a batch of rankings into index and weight tensors.

    rankings: one ranking (tiers) per prompt, with indices into the batch's flat reward
    vector. Returns ``(winners [P], losers [P], weights [P])`` where each prompt's pairs
    share weight ``1 / (num_prompts_with_pairs · num_pairs_of_that_prompt)``, so that
    ``Σ weights · pair_loss`` is the mean over prompts of each prompt's mean pair loss.
    ``num_prompts`` replaces num_prompts_with_pairs when the mean is over a larger batch
    than these rankings (the whole step: several micro-batches, several ranks).
    """
    winners: list[int] = []
    losers: list[int] = []
    weights: list[float] = []
    per_prompt = [ranking_pairs(groups) for groups in rankings]
    n_prompts = num_prompts or sum(1 for pairs in per_prompt if pairs)
    for pairs in per_prompt:
        for w, lo in pairs:
            winners.append(w)
            losers.append(lo)
            weights.append(1.0 / (n_prompts * len(pairs)))
    return (
        torch.tensor(winners, dtype=torch.long, device=device),
        torch.tensor(losers, dtype=torch.long, device=device),
        torch.tensor(weights, dtype=torch.float32, device=device),
    )


def batch_ranking_loss(
    rewards: torch.Tensor,
    rankings: Sequence[Sequence[Sequence[int]]],
    *,
    num_prompts: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The InstructGPT loss of a batch: the mean over prompts of :func:`pairwise_ranking_loss`.

    rewards: [N] rewards of every completion in the batch (prompts concatenated).
    rankings: per prompt, tiers of indices into ``rewards``.
    ``num_prompts``: divide by this many prompts instead of those here that have pairs (this
    batch is part of a step; see :func:`batch_pair_index`).
    Returns ``(loss, correct [P])``: the scalar loss and, per pair, whether r_w > r_l.
    """
    winners, losers, weights = batch_pair_index(
        rankings, device=rewards.device, num_prompts=num_prompts
    )
    if winners.numel() == 0:
        return rewards.sum() * 0.0, torch.zeros(0, dtype=torch.bool, device=rewards.device)
    margin = rewards[winners] - rewards[losers]  # [P]
    loss = -(weights.to(margin.dtype) * F.logsigmoid(margin)).sum()
    return loss, margin.detach() > 0


# --------------------------------------------------------------------------------------------
# Data: both row formats -> PreferenceRow
# --------------------------------------------------------------------------------------------


@dataclass
class PreferenceRow:
    """One prompt with K >= 2 completions and a ranking as tiers (best first)."""

    prompt: str
    completions: list[str]
    groups: list[list[int]]

    def pairs(self) -> list[tuple[int, int]]:
        return ranking_pairs(self.groups)


def preference_rows(data: Sequence[dict]) -> list[PreferenceRow]:
    """Validate and normalise reward/DPO rows (see :func:`rlhf.data.normalize_preference_row`).

    Accepts ``{"prompt", "completions": [...], "ranking": [[i], [j, k], ...]}`` (tiers, best
    first, every completion ranked exactly once) and ``{"prompt", "chosen", "rejected"}``.
    Raises DataError naming the row (or its JSONL line) on anything else.
    """
    return [
        PreferenceRow(r["prompt"], r["completions"], [list(t) for t in r["ranking"]])
        for r in validate_rows("reward", list(data))
    ]


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class RewardConfig(OfflineConfig):
    """Reward-model training. ``batch_size`` counts PROMPTS (each with all its K completions),
    as InstructGPT batches whole rankings (sec. 3.5; they use 64 prompts per batch)."""

    batch_size: int | Literal["auto"] = 8
    """Prompts per micro-batch, each with all its completions, or "auto": on a GPU the most
    prompts (up to 64) whose activations fit in the free memory, a prompt counting as its K
    completions padded to the longest sequence (:func:`rlhf.sft.pick_micro_batch`); 8 on a
    CPU. The pick is saved in the checkpoints' config and a resumed run keeps it."""

    learning_rate: float = 1e-4
    """Peak AdamW rate. InstructGPT trains the full 6B RM at 9e-6; LoRA adapters need ~10x
    more (Hu et al. 2021 use 1e-4..2e-4); 1e-4 is half the QLoRA SFT rate."""

    max_steps: int = 100
    """Optimizer steps. InstructGPT trains its RM for a single epoch (more overfits, sec. 3.5)."""

    base_kind: str = "auto"
    """"causal" (decoder LM, reward at the last token), "encoder" (BERT-like AutoModel, pooled),
    or "auto" = read it from the model config (``*ForCausalLM`` / is_decoder -> causal)."""

    pooling: str = "auto"
    """How a sequence becomes one vector: "last" (last non-pad token), "mean", "cls", or
    "auto" = "last" for causal LMs; for encoders the sentence-transformers pooling config
    (1_Pooling/config.json) when present, else "cls"."""

    normalize_reward: bool = True
    """After training, shift the head bias so that the rewards of the reference set (the
    training completions) have mean 0 (InstructGPT sec. 3.5, before RL)."""

    reference_max_completions: int = 4096
    """At most this many training completions (a seeded sample) form the reference set."""

    disable_dropout: bool = True
    """Train with dropout off (LoRA's and the model's), so a completion's reward is the same
    function in training as when scored (TRL's RewardConfig default ``disable_dropout=True``)."""

    def validate(self) -> None:
        super().validate()
        if self.base_kind not in ("auto", "causal", "encoder"):
            raise ConfigError(f"base_kind must be auto, causal or encoder, got {self.base_kind!r}")
        if self.pooling not in ("auto", "last", "mean", "cls"):
            raise ConfigError(f"pooling must be auto, last, mean or cls, got {self.pooling!r}")
        if self.reference_max_completions <= 0:
            raise ConfigError(
                f"reference_max_completions must be > 0, got {self.reference_max_completions}"
            )


# --------------------------------------------------------------------------------------------
# Model: base (+ LoRA adapter "reward") + ScalarHead
# --------------------------------------------------------------------------------------------

ADAPTER = "reward"
HEAD = "reward"
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def detect_base_kind(name_or_path: str) -> str:
    """ "causal" for decoder LMs (``*ForCausalLM`` architectures or ``is_decoder``), else "encoder"."""
    from transformers import AutoConfig

    with loading_model(name_or_path):
        config = AutoConfig.from_pretrained(str(name_or_path))
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(
            f"{name_or_path}: encoder-decoder models are not supported as reward models"
        )
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith(_CAUSAL_SUFFIXES) for a in archs) or getattr(config, "is_decoder", False):
        return "causal"
    if archs:
        return "encoder"
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    mt = config.model_type
    causal = mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return "causal" if causal else "encoder"


def default_pooling(name_or_path: str, base_kind: str) -> str:
    """ "last" for causal LMs; for encoders the sentence-transformers pooling mode, else "cls"."""
    if base_kind == "causal":
        return "last"
    pooling_cfg = Path(str(name_or_path)) / "1_Pooling" / "config.json"
    if not pooling_cfg.exists():
        try:
            from transformers.utils import cached_file

            found = cached_file(
                str(name_or_path),
                "1_Pooling/config.json",
                _raise_exceptions_for_missing_entries=False,
            )
            pooling_cfg = Path(found) if found else pooling_cfg
        except Exception:  # offline hub id without that file: fall back
            pass
    if pooling_cfg.exists():
        modes = json.loads(pooling_cfg.read_text())
        if modes.get("pooling_mode_mean_tokens"):
            return "mean"
        if modes.get("pooling_mode_cls_token"):
            return "cls"
    return "cls"


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B,T,H] hidden states -> [B,H]: "last" non-pad token, "mean" over tokens, or "cls" (token 0)."""
    if pooling == "last":
        idx = last_token_index(attention_mask)  # [B]
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    if pooling == "mean":
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B,T,1]
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    if pooling == "cls":
        return hidden[:, 0]
    raise ConfigError(f"unknown pooling {pooling!r}")


def segment_ids(input_ids: torch.Tensor, sep_token_id: int) -> torch.Tensor:
    """Token type ids [B,T] of ``[CLS] A [SEP] B [SEP]`` rows: 0 up to and including the first
    [SEP], 1 after it (padding after the second part is masked anyway)."""
    sep = (input_ids == sep_token_id).long()
    return ((sep.cumsum(1) - sep) > 0).long()


class RewardModel(nn.Module):
    """A PeftModel body + :class:`ScalarHead`: ``forward(input_ids, attention_mask) -> [B]``.

    The body is run with whatever adapter is active; use :func:`active_adapter` to pick one.
    """

    def __init__(
        self,
        peft_model,
        head: ScalarHead,
        *,
        base_kind: str,
        pooling: str,
        sep_token_id: int | None = None,
    ):
        super().__init__()
        self.peft_model = peft_model
        self.head = head
        self.base_kind = base_kind
        self.pooling = pooling
        config = peft_model.get_base_model().config
        # an encoder trained on sentence pairs (BERT, MiniLM) reads the completion as segment 1
        self.sep_token_id = (
            sep_token_id
            if base_kind == "encoder" and getattr(config, "type_vocab_size", 0) >= 2
            else None
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        body = backbone_of(self.peft_model)
        if self.base_kind == "causal":
            out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        elif self.sep_token_id is not None:
            out = body(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=segment_ids(input_ids, self.sep_token_id),
            )
        else:
            out = body(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [B,T,H]
        pooled = pool_hidden(hidden, attention_mask, self.pooling)  # [B,H]
        return self.head(pooled.unsqueeze(1)).squeeze(1)  # [B]


class RewardEncoder:
    """Text -> token ids for the reward model, the same in training and scoring.

    causal: ``prompt (+ chat template) + completion + EOS`` (rlhf.data.encode_prompt_completion:
    the prompt is cut from the left, so the completion's end, where the reward is read, stays);
    encoder: the text pair ``[CLS] prompt [SEP] completion [SEP]`` (a conversation as its plain
    text, turn by turn), cut by :func:`pair_budget`: the prompt loses its START, so
    the latest turn, which the completion answers, is what stays; the model reads the two parts
    as segments 0 and 1 (:class:`RewardModel` passes the token type ids).
    """

    def __init__(self, tokenizer, *, base_kind: str, max_seq_len: int, chat_template: bool = False):
        self.tokenizer = tokenizer
        self.base_kind = base_kind
        self.max_seq_len = max_seq_len
        self.chat_template = chat_template

    def encode(self, prompt: str, completion: str) -> list[int]:
        if self.base_kind == "causal":
            ids, _ = encode_prompt_completion(
                self.tokenizer,
                prompt,
                completion,
                max_seq_len=self.max_seq_len,
                chat_template=self.chat_template,
            )
            return ids
        # A conversation (rlhf.data.ChatPrompt) is read as its plain text. The cut is made in
        # tokens, then mapped back to characters so that the tokenizer builds the pair itself
        # (its own special tokens and segments, whatever the family).
        tok = self.tokenizer
        p = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        c = tok(completion, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        specials = tok.num_special_tokens_to_add(pair=True)
        p_keep, c_keep = pair_budget(len(p), len(c), self.max_seq_len - specials)
        prompt = prompt[p[len(p) - p_keep][0] :] if p_keep else ""
        completion = completion[: c[c_keep - 1][1]] if c_keep else ""
        return tok(prompt, completion, truncation=True, max_length=self.max_seq_len)["input_ids"]

    def batch(self, seqs: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = pad_sequences(seqs, self.tokenizer.pad_token_id, side="right")
        return ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)


def pair_budget(prompt_len: int, completion_len: int, budget: int) -> tuple[int, int]:
    """How many tokens of (prompt, completion) fit ``budget``: the completion keeps its start
    and at least half the budget when it needs it, the prompt the rest, taken from its END
    (the latest turn). Cutting the pair's longest side from the right, the tokenizer's
    default, dropped the last human turn of about half of long HH dialogues at 128 tokens."""
    budget = max(budget, 0)
    completion = min(completion_len, max(budget - prompt_len, budget // 2))
    return min(prompt_len, budget - completion), completion


def load_reward_base(name_or_path: str, base_kind: str, *, device, dtype):
    """The base model: AutoModelForCausalLM for "causal", AutoModel for "encoder"."""
    if base_kind == "causal":
        return load_causal_lm(name_or_path, device=device, dtype=dtype)
    from transformers import AutoModel

    with loading_model(name_or_path):
        return AutoModel.from_pretrained(str(name_or_path), dtype=dtype).to(device)


def _task_type(base_kind: str) -> str:
    return "CAUSAL_LM" if base_kind == "causal" else "FEATURE_EXTRACTION"


def build_reward_model(cfg: RewardConfig):
    """Tokenizer + base + fresh LoRA adapter "reward" + head, on the config's device/dtype.

    Returns ``(reward_model: RewardModel, encoder: RewardEncoder, device)``.
    """
    from peft import get_peft_model

    device, dtype = resolve_device_dtype(cfg)
    base_kind = detect_base_kind(cfg.model) if cfg.base_kind == "auto" else cfg.base_kind
    pooling = default_pooling(cfg.model, base_kind) if cfg.pooling == "auto" else cfg.pooling
    tokenizer = load_tokenizer(cfg.model)
    base = load_reward_base(cfg.model, base_kind, device=device, dtype=dtype)
    fit_tokenizer(base, tokenizer)
    peft_model = get_peft_model(
        base, lora_config(cfg, task_type=_task_type(base_kind)), adapter_name=ADAPTER
    )
    head = ScalarHead(hidden_size_of(base)).to(device)
    rm = RewardModel(
        peft_model, head, base_kind=base_kind, pooling=pooling, sep_token_id=tokenizer.sep_token_id
    )
    encoder = RewardEncoder(
        tokenizer, base_kind=base_kind, max_seq_len=cfg.max_seq_len, chat_template=cfg.chat_template
    )
    return rm, encoder, device


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def score_sequences(
    rm: RewardModel,
    encoder: RewardEncoder,
    seqs: Sequence[Sequence[int]],
    *,
    batch_size: int,
    device,
):
    """Rewards [N] (float32, on CPU) of pre-tokenized sequences, in eval mode. Under
    torchrun every rank scores its share and gets all N."""
    out = []
    mine = distributed.local_part(seqs)
    with eval_mode(rm):
        for i in range(0, len(mine), batch_size):
            ids, mask = encoder.batch(mine[i : i + batch_size], device)
            out.append(rm(ids, mask).float().cpu())
    return distributed.gather_shards(torch.cat(out) if out else torch.zeros(0))


def ranking_accuracy(
    rewards: torch.Tensor, rows: Sequence[PreferenceRow]
) -> tuple[float, float, int]:
    """Over all explicit pairs of ``rows`` (rewards flat, rows concatenated): fraction with
    r_w > r_l, the mean per-prompt K-wise loss, and the number of pairs."""
    rankings, offset = [], 0
    for row in rows:
        rankings.append([[offset + i for i in tier] for tier in row.groups])
        offset += len(row.completions)
    loss, correct = batch_ranking_loss(rewards, rankings)
    n = int(correct.numel())
    return (float(correct.float().mean()) if n else float("nan")), float(loss), n


@distributed.data_parallel
@stops_while_loading("reward")
def train_reward(
    config: RewardConfig,
    data: list[dict],
    *,
    output_dir: str | os.PathLike,
    on_step: OnStep | None = None,
    should_stop: ShouldStop | None = None,
    resume_from: str | os.PathLike | None = None,
    eval_data: list[dict] | None = None,
) -> TrainResult:
    """Train a reward model (LoRA adapter "reward" + head "reward") on ranked completions.

    Each optimizer step takes ``batch_size * grad_accum_steps`` prompts; every completion of a
    prompt is encoded once and all of its C(K,2) pairs enter the loss (InstructGPT sec. 3.5).
    on_step(step, metrics): ``loss/reward``, ``reward/train_accuracy``, ``reward/margin``,
    ``perf/comparisons_per_s``, ``perf/tokens_per_s``, ``optim/lr``, ``optim/grad_norm``,
    ``progress/total_steps``, and at evals ``reward/accuracy`` (held-out pairs) and
    ``loss/reward_eval``. Held-out rows: ``eval_data`` if given, else an ``eval_fraction`` split.
    Before every checkpoint the head bias is shifted so the reference set has mean reward 0.
    should_stop() is checked before every step, and while the model loads and the data are
    tokenized (a stop there returns stopped=True at the resume point, with nothing written).
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

    resume = resume_point(resume_from, "reward", cfg)
    stop_point(should_stop)
    rm, encoder, device = build_reward_model(cfg)
    peft_model, head = rm.peft_model, rm.head
    if cfg.disable_dropout:
        disable_dropout(peft_model)
    head.linear.bias.requires_grad_(
        False
    )  # the pairwise loss ignores a shift; set by normalisation
    if cfg.init_adapter:  # e.g. the SFT policy, as InstructGPT starts its RM from the SFT model
        load_adapter_weights(peft_model, source_adapter_dir(cfg.init_adapter, ADAPTER), ADAPTER)

    def encode(rs: Sequence[PreferenceRow]) -> list[list[list[int]]]:
        return [
            [encoder.encode(r.prompt, c) for c in r.completions] for r in checked(rs, should_stop)
        ]

    train_seqs, eval_seqs = encode(train_rows), encode(eval_rows)
    cfg = resolve_auto_batch(  # a batch pads every sequence to the longest one
        cfg,
        peft_model,
        device,
        tokens_per_row=max(map(len, train_seqs), default=1)
        * max((len(s) for seqs in train_seqs for s in seqs), default=1),
        saved_config=resume.state.get("config"),
    )
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(peft_model)
    params = trainable_parameters(peft_model) + [head.linear.weight]
    optimizer, scheduler = optimizer_and_schedule(params, cfg)

    if resume.checkpoint is not None:
        load_adapter_weights(peft_model, resume.checkpoint, ADAPTER)
        head.load_state_dict(load_head(resume.checkpoint, HEAD).state_dict())
        load_training_state(resume.checkpoint, optimizer, scheduler)
    distributed.broadcast_parameters(params)

    run_lineage = lineage(
        cfg,
        [{"prompt": r.prompt, "completions": r.completions, "ranking": r.groups} for r in rows],
        parent=resume.parent(cfg),
    )
    resume.check_data(run_lineage)
    eval_bs = cfg.eval_batch_size or cfg.batch_size
    prompts_per_step = cfg.batch_size * cfg.grad_accum_steps

    # reference set for the bias: a seeded sample of the training completions
    flat_train = [s for seqs in train_seqs for s in seqs]
    ref_order = torch.randperm(
        len(flat_train), generator=torch.Generator().manual_seed(cfg.seed + 104729)
    ).tolist()
    reference = [flat_train[i] for i in ref_order[: cfg.reference_max_completions]]

    def eval_metrics() -> dict[str, float]:
        if not eval_rows:
            return {}
        with oom_guard("eval_batch_size or max_seq_len"):
            rewards = score_sequences(
                rm,
                encoder,
                [s for seqs in eval_seqs for s in seqs],
                batch_size=eval_bs * 4,
                device=device,
            )
        acc, loss, n = ranking_accuracy(rewards, eval_rows)
        return {"reward/accuracy": acc, "loss/reward_eval": loss, "reward/eval_pairs": float(n)}

    def normalise() -> dict[str, float]:
        if not cfg.normalize_reward:
            return {}
        with oom_guard("eval_batch_size or max_seq_len"):
            mean = float(
                score_sequences(rm, encoder, reference, batch_size=eval_bs * 4, device=device)
                .double()
                .mean()
            )
        with torch.no_grad():
            head.linear.bias -= mean
        return {"reward/reference_mean_before_shift": mean}

    def checkpoint(step: int, metrics: dict[str, float]) -> Path:
        shift = normalise()
        return save_run_checkpoint(
            output_dir,
            kind="reward",
            cfg=cfg,
            step=step,
            metrics={**metrics, **shift},
            lineage=run_lineage,
            model=peft_model,
            adapters=[ADAPTER],
            heads={HEAD: head},
            optimizer=optimizer,
            scheduler=scheduler,
            info={
                "reward": {
                    "base_kind": rm.base_kind,
                    "pooling": rm.pooling,
                    "chat_template": cfg.chat_template,
                    "max_seq_len": cfg.max_seq_len,
                    "head_bias": float(head.linear.bias.detach()),
                    "reference_size": len(reference),
                    "normalized": cfg.normalize_reward,
                }
            },
        )

    def train_step(step: int) -> dict[str, float]:
        t_start = time.perf_counter()
        idx = batch_indices(
            len(train_rows),
            seed=cfg.seed,
            start=(step - 1) * prompts_per_step,
            count=prompts_per_step,
        )
        ranked = sum(1 for r in idx if train_rows[r].pairs())  # the loss is a mean over these
        mine = distributed.local_part(idx)
        loss_sum, n_pairs, n_correct, n_tokens, margin_sum = 0.0, 0, 0, 0, 0.0
        with oom_guard(
            "batch_size (prompts per micro-batch) or max_seq_len (or turn on gradient_checkpointing)"
        ):
            for m in range(0, len(mine), cfg.batch_size):
                chunk = mine[m : m + cfg.batch_size]
                seqs, rankings = [], []
                for r in chunk:  # every completion once; pairs index into the flat batch
                    off = len(seqs)
                    seqs.extend(train_seqs[r])
                    rankings.append([[off + i for i in tier] for tier in train_rows[r].groups])
                ids, mask = encoder.batch(seqs, device)
                rewards = rm(ids, mask)  # [N]
                loss, correct = batch_ranking_loss(rewards.float(), rankings, num_prompts=ranked)
                check_finite(loss, step, name="reward loss")
                loss.backward()
                loss_sum += float(loss.detach())
                winners, losers, _ = batch_pair_index(rankings)
                margin_sum += float((rewards[winners] - rewards[losers]).detach().float().sum())
                n_pairs += int(correct.numel())
                n_correct += int(correct.sum())
                n_tokens += sum(len(q) for q in seqs)
            grad_norm, lr = optimizer_step(
                optimizer, scheduler, params, max_grad_norm=cfg.max_grad_norm, step=step
            )
        sync_device(device)
        sums = distributed.all_reduce_sums(
            {
                "loss": loss_sum,
                "pairs": n_pairs,
                "correct": n_correct,
                "tokens": n_tokens,
                "margin": margin_sum,
            }
        )
        n_pairs = sums["pairs"]
        dt = max(time.perf_counter() - t_start, 1e-9)
        return {
            "loss/reward": sums["loss"],
            "reward/train_accuracy": sums["correct"] / max(n_pairs, 1),
            "reward/margin": sums["margin"] / max(n_pairs, 1),
            "perf/comparisons_per_s": n_pairs / dt,
            "perf/tokens_per_s": sums["tokens"] / dt,
            "optim/lr": lr,
            "optim/grad_norm": grad_norm,
            "progress/epoch": step * prompts_per_step / len(train_rows),
        }

    rm.train()
    return run_steps(
        cfg,
        resume=resume,
        train_step=train_step,
        checkpoint=checkpoint,
        on_step=on_step,
        should_stop=should_stop,
        eval_metrics=eval_metrics,
    )


# --------------------------------------------------------------------------------------------
# Scoring (used by PPO, GRPO and evaluation)
# --------------------------------------------------------------------------------------------


class RewardScorer:
    """Scores (prompt, completion) pairs with a trained reward model: ``scorer(prompts,
    completions) -> Tensor[B]`` (float32, on the model's device), no gradients.

    Two ways to load (:meth:`from_checkpoint`):

    - standalone: its own base model (causal LM or encoder) with the "reward" adapter;
    - shared: ``model=`` a PeftModel on the SAME causal base (e.g. PPO's policy). The reward
      adapter is loaded into it under the name "reward" (frozen) and the head kept here.
      Each call runs inside :func:`active_adapter`: it switches the model to "reward" and
      eval mode, scores, then restores the previously active adapter (e.g. "policy"), every
      parameter's ``requires_grad`` flag and the train/eval mode. Scores carry no graph.
    """

    def __init__(
        self,
        rm: RewardModel,
        encoder: RewardEncoder,
        *,
        device,
        adapter_name: str = ADAPTER,
        batch_size: int = 32,
        info: dict | None = None,
    ):
        self.rm = rm
        self.encoder = encoder
        self.device = torch.device(device)
        self.adapter_name = adapter_name
        self.batch_size = batch_size
        self.info = info or {}

    @property
    def head(self) -> ScalarHead:
        return self.rm.head

    @classmethod
    def from_checkpoint(
        cls, ckpt_dir, *, model=None, tokenizer=None, device=None, batch_size: int = 32
    ) -> RewardScorer:
        """Load a reward checkpoint (a step folder, or a run folder = its latest checkpoint)."""
        from peft import PeftModel

        ckpt = resolve_checkpoint(ckpt_dir)
        state = read_state(ckpt)
        if state.get("kind") != "reward":
            raise ConfigError(f"{ckpt} is a {state.get('kind')!r} checkpoint, not a reward model")
        info = dict(state.get("reward", {}))
        saved_cfg = state.get("config", {})
        base_name = state.get("lineage", {}).get("base_model") or saved_cfg.get("model")
        base_kind = info.get("base_kind", "causal")
        max_seq_len = int(info.get("max_seq_len", saved_cfg.get("max_seq_len", 512)))
        folder = adapter_dir(ckpt, ADAPTER)

        if model is not None:
            if base_kind != "causal":
                raise ConfigError(
                    f"the reward model in {ckpt} sits on an encoder ({base_name}); "
                    "load it without model= (standalone)"
                )
            if not isinstance(model, PeftModel):
                raise ConfigError("model= must be a peft PeftModel on the reward model's base")
            dev = next(model.parameters()).device
            if ADAPTER not in model.peft_config:
                load_frozen_adapter(model, folder, ADAPTER)
            peft_model = model
            if tokenizer is None:
                tokenizer = load_tokenizer(base_name)
        else:
            dev, dtype = pick_device_dtype(
                str(device) if device is not None else "auto", saved_cfg.get("dtype", "auto")
            )
            tokenizer = tokenizer or load_tokenizer(base_name)
            base = load_reward_base(base_name, base_kind, device=dev, dtype=dtype)
            fit_tokenizer(base, tokenizer)
            peft_model = PeftModel.from_pretrained(
                base, str(folder), adapter_name=ADAPTER, is_trainable=False
            )
            peft_model.eval()
        head = load_head(ckpt, HEAD, device=dev)
        if head.hidden_size != hidden_size_of(peft_model.get_base_model()):
            raise ConfigError(
                f"reward head expects hidden size {head.hidden_size}, the model has "
                f"{hidden_size_of(peft_model.get_base_model())}: not the same base model"
            )
        head.requires_grad_(False)
        rm = RewardModel(
            peft_model,
            head,
            base_kind=base_kind,
            pooling=info.get("pooling", "last"),
            sep_token_id=tokenizer.sep_token_id,
        )
        encoder = RewardEncoder(
            tokenizer,
            base_kind=base_kind,
            max_seq_len=max_seq_len,
            chat_template=bool(info.get("chat_template", False)),
        )
        return cls(
            rm, encoder, device=dev, batch_size=batch_size, info={**info, "checkpoint": str(ckpt)}
        )

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        seqs = [self.encoder.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        with active_adapter(self.rm.peft_model, self.adapter_name):
            out = []
            for i in range(0, len(seqs), self.batch_size):
                ids, mask = self.encoder.batch(seqs[i : i + self.batch_size], self.device)
                out.append(self.rm(ids, mask).float())
        return torch.cat(out) if out else torch.zeros(0, device=self.device)
