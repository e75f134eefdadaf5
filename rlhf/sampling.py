"""Sampling K completions per prompt from a policy checkpoint, for the labeling queue.

InstructGPT collects rankings over K = 4..9 sampled completions per prompt (Ouyang et al.
2022, arXiv:2203.02155, sec. 3.5); sampling uses temperature and nucleus (top-p) sampling
(Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", arXiv:1904.09751).

Speed: ``generate`` runs with a KV cache; a LoRA adapter is merged into the weights
before generating (one matmul per layer instead of three), either into a private copy of
the base model (:func:`sample`, which loads its own) or temporarily into a training
model (:func:`merged_adapter`, which restores the exact base weights afterwards).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from rlhf.config import BaseConfig
from rlhf.data import PromptCollator, validate_rows
from rlhf.errors import ConfigError
from rlhf.loop import OnStep, ShouldStop, call_should_stop, oom_guard
from rlhf.modeling import adapter_dir, load_causal_lm, load_tokenizer, resolve_device_dtype


@dataclass
class SampleConfig(BaseConfig):
    """Sampling settings. ``batch_size`` = prompts per ``generate`` call (each gives K rows);
    ``max_seq_len`` caps the prompt length (kept from the right); ``init_adapter`` is the
    policy checkpoint to sample from (None = the base model)."""

    num_completions: int = 4
    """K completions per prompt; 4 is the low end of InstructGPT's K = 4..9 (Ouyang et al. 2022, sec. 3.5)."""

    temperature: float = 1.0
    """Softmax temperature; 1.0 samples from the model's distribution; 0 = greedy decoding."""

    top_p: float = 1.0
    """Nucleus sampling mass (Holtzman et al. 2020); 1.0 = off, as in InstructGPT's sampling."""

    max_new_tokens: int = 128
    """Most tokens generated per completion (generation also stops at EOS)."""

    chat_template: bool = False
    """Wrap prompts with the tokenizer's chat template (must match how the policy was trained)."""

    def validate(self) -> None:
        super().validate()
        if self.num_completions < 1:
            raise ConfigError(f"num_completions must be >= 1, got {self.num_completions}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@contextlib.contextmanager
def merged_adapter(model, *, exact: bool = True) -> Iterator[Any]:
    """Temporarily merge the active LoRA adapter(s) of a PeftModel for fast ``generate``.

    With ``exact=True`` the base weights of merged layers are copied first and put back on
    exit, so repeated merge/unmerge never drifts the frozen base (bf16 rounding); with
    ``exact=False`` peft's ``unmerge_adapter`` is used (no extra memory). The model is put
    in eval mode inside the block and its training flag is restored afterwards.
    """
    from peft.tuners.lora import LoraLayer

    was_training = model.training
    model.eval()
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    if exact:
        for module in model.modules():
            if isinstance(module, LoraLayer):
                w = module.get_base_layer().weight
                saved.append((w, w.detach().clone()))
    model.merge_adapter()
    try:
        yield model
    finally:
        if exact:
            for module in model.modules():
                if isinstance(module, LoraLayer):
                    module.merged_adapters = []
            with torch.no_grad():
                for w, copy in saved:
                    w.copy_(copy)
        else:
            model.unmerge_adapter()
        if was_training:
            model.train()


@torch.no_grad()
def generate(
    model,
    tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    num_completions: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample continuations of LEFT-padded prompts with a KV cache.

    input_ids/attention_mask [B,P] -> (completion_ids [B*K, N], completion_mask [B*K, N]); rows
    are grouped by prompt (K consecutive rows per prompt); the mask covers tokens up to and
    including the first EOS.
    """
    do_sample = temperature > 0
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "use_cache": True,
        # explicit, so that a hub model's generation_config (repetition penalty, top-k, beams)
        # does not silently change the distribution being sampled
        "num_beams": 1,
        "repetition_penalty": 1.0,
    }
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    if (
        num_completions > 1
    ):  # K consecutive copies per prompt (greedy refuses num_return_sequences > 1)
        input_ids = input_ids.repeat_interleave(num_completions, dim=0)
        attention_mask = attention_mask.repeat_interleave(num_completions, dim=0)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    completion = out[:, input_ids.shape[1] :]  # [B*K, N]
    return completion, completion_mask_after_eos(completion, tokenizer.eos_token_id)


def completion_mask_after_eos(completion: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """[B,N] generated ids -> [B,N] long mask: 1 up to and including the first EOS, 0 after."""
    if eos_id is None:
        return torch.ones_like(completion)
    is_eos = (completion == eos_id).long()
    after = torch.cumsum(is_eos, dim=1) - is_eos  # number of EOS strictly before each position
    return (after == 0).long()


def load_sampling_model(cfg: SampleConfig, checkpoint: str | os.PathLike | None = None):
    """Tokenizer and a base model with the checkpoint's policy adapter merged in (eval mode)."""
    device, dtype = resolve_device_dtype(cfg)
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, device=device, dtype=dtype)
    ckpt = checkpoint if checkpoint is not None else cfg.init_adapter
    if ckpt:
        from peft import PeftModel

        from rlhf.checkpoint import resolve_checkpoint

        try:
            ckpt_dir = resolve_checkpoint(ckpt)
        except ConfigError:
            ckpt_dir = ckpt  # a bare adapter folder
        model = PeftModel.from_pretrained(
            model, str(adapter_dir(ckpt_dir, "policy")), adapter_name="policy"
        )
        model = model.merge_and_unload()
    model.eval()
    return model, tokenizer, device


def sample(
    config: SampleConfig,
    data: list[dict[str, Any]],
    *,
    checkpoint: str | os.PathLike | None = None,
    on_step: OnStep | None = None,
    should_stop: ShouldStop | None = None,
) -> list[dict[str, Any]]:
    """K completions for each {"prompt"} row.

    Returns one dict per prompt (with the row's other keys, e.g. an id, carried through):
    {"prompt", "completions": [{"text", "num_tokens"}, ...],
    "generation": {model, checkpoint, temperature, top_p, max_new_tokens, seed}}. Reproducible:
    batch b is sampled after ``torch.manual_seed(seed + b)``. on_step(batch_number, metrics)
    is called after each batch; should_stop() ends early with the rows done so far.
    """
    cfg = config
    cfg.validate()
    rows = validate_rows("sample", data)
    model, tokenizer, device = load_sampling_model(cfg, checkpoint)
    collator = PromptCollator(
        tokenizer, max_prompt_len=cfg.max_seq_len, chat_template=cfg.chat_template
    )
    ckpt = checkpoint if checkpoint is not None else cfg.init_adapter
    generation = {
        "model": cfg.model,
        "checkpoint": str(ckpt) if ckpt else None,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "max_new_tokens": cfg.max_new_tokens,
        "num_completions": cfg.num_completions,
        "seed": cfg.seed,
    }
    K = cfg.num_completions
    n_batches = (len(rows) + cfg.batch_size - 1) // cfg.batch_size
    results: list[dict[str, Any]] = []
    for b in range(n_batches):
        if call_should_stop(should_stop):
            break
        chunk = rows[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        batch = collator(chunk)
        torch.manual_seed(cfg.seed + b)
        t0 = time.perf_counter()
        with oom_guard("batch_size, num_completions or max_new_tokens"):
            ids, mask = generate(
                model,
                tokenizer,
                batch["input_ids"].to(device),
                batch["attention_mask"].to(device),
                num_completions=K,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_new_tokens=cfg.max_new_tokens,
            )
        dt = time.perf_counter() - t0
        counts = mask.sum(dim=1).tolist()
        for i, row in enumerate(chunk):
            completions = []
            for j in range(K):
                r = i * K + j
                n = int(counts[r])
                text = tokenizer.decode(ids[r, :n].tolist(), skip_special_tokens=True)
                completions.append({"text": text, "num_tokens": n})
            # other keys of the row (e.g. a prompt id) are carried through unchanged
            results.append(
                {
                    **row,
                    "prompt": row["prompt"],
                    "completions": completions,
                    "generation": dict(generation),
                }
            )
        if on_step is not None:
            on_step(
                b + 1,
                {
                    "perf/tokens_per_s": float(sum(counts)) / max(dt, 1e-9),
                    "sample/mean_tokens": float(sum(counts)) / max(len(counts), 1),
                    "progress/total_steps": float(n_batches),
                },
            )
    return results
