"""Sampling K completions per prompt from a policy checkpoint, for the labeling queue.

InstructGPT collects rankings over K = 4..9 sampled completions per prompt (Ouyang et al.
2022, arXiv:2203.02155, sec. 3.5); sampling uses temperature and nucleus (top-p) sampling
(Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", arXiv:1904.09751).

Speed: ``generate`` runs with a KV cache; a LoRA adapter is merged into the weights
before generating (one matmul per layer instead of three), either into a private copy of
the base model (:func:`sample`, which loads its own) or temporarily into a training
model (:class:`MergedAdapter`, used by PPO and GRPO rollouts, which restores the exact base
weights afterwards). With ``cache="static"`` the KV cache has a fixed shape (batch x
``max_cache_len``), and on CUDA transformers then compiles the decoding step with
``torch.compile(mode="reduce-overhead")``: one CUDA graph replay per token instead of a
Python call and a few hundred kernel launches per layer. The graph is compiled on the first
call (tens of seconds) and reused while the batch size and ``max_cache_len`` stay the same,
so rollouts pass a fixed ``max_cache_len`` (the run's ``max_seq_len``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhf.config import BaseConfig
from rlhf.data import PromptCollator, validate_rows
from rlhf.errors import ConfigError
from rlhf.loop import OnStep, ShouldStop, call_should_stop, oom_guard
from rlhf.modeling import (
    eval_mode,
    load_causal_lm,
    load_tokenizer,
    resolve_device_dtype,
    source_adapter_dir,
)

log = logging.getLogger(__name__)

GENERATION_CACHES = ("auto", "static", "dynamic")


def check_generation_cache(value: str) -> None:
    """ConfigError unless ``value`` is one of :data:`GENERATION_CACHES`."""
    if value not in GENERATION_CACHES:
        raise ConfigError(
            f"generation_cache must be one of {', '.join(GENERATION_CACHES)}, got {value!r}"
        )


def resolve_generation_cache(value: str, device: torch.device | str) -> str:
    """ "auto" -> "static" on CUDA (compiled decoding), "dynamic" elsewhere."""
    if value == "auto":
        return "static" if torch.device(device).type == "cuda" else "dynamic"
    return value


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

    generation_cache: str = "dynamic"
    """KV cache of ``generate``: "dynamic" (grows per token), "static" (fixed shape; on CUDA
    the decoding step is compiled into a CUDA graph, which costs a one-off compile of tens
    of seconds and pays off on large sampling jobs) or "auto" (static on CUDA, else dynamic)."""

    def validate(self) -> None:
        super().validate()
        check_generation_cache(self.generation_cache)
        if self.num_completions < 1:
            raise ConfigError(f"num_completions must be >= 1, got {self.num_completions}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


class MergedAdapter:
    """Generate with LoRA adapter ``name`` MERGED into the base weights (no LoRA matmuls per
    decoded token): ``with merger.merged(): model.generate(...)``.

    peft's unmerge subtracts the delta again, which in bf16 does not give back the same bits
    and would drift the frozen base (PPO's reference policy) over many steps; so the base
    weights of the adapted layers are saved once (on the CPU, pinned on CUDA) and copied back
    after every merge, which restores them exactly. Inside the block the model is in eval
    mode; its training flag is restored afterwards.
    """

    def __init__(self, model, name: str | None = None):
        from peft.tuners.lora import LoraLayer

        self.model = model
        self.name = name if name is not None else model.active_adapter
        self.layers = [
            m for m in model.modules() if isinstance(m, LoraLayer) and self.name in m.lora_A
        ]
        self.backup: list[torch.Tensor] | None = None

    @contextlib.contextmanager
    def merged(self) -> Iterator[Any]:
        if self.backup is None:
            self.backup = []
            for m in self.layers:
                w = m.get_base_layer().weight.detach().to("cpu", copy=True)
                self.backup.append(
                    w.pin_memory() if w.device.type == "cpu" and torch.cuda.is_available() else w
                )
        with eval_mode(self.model):
            for m in self.layers:
                m.merge(adapter_names=[self.name])
            try:
                yield self.model
            finally:
                for m, w in zip(self.layers, self.backup, strict=True):
                    m.unmerge()
                    m.get_base_layer().weight.data.copy_(w, non_blocking=True)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()


def merged_adapter(model, name: str | None = None):
    """``with merged_adapter(model):`` a one-off :class:`MergedAdapter` block (``name`` = the
    active adapter by default)."""
    return MergedAdapter(model, name).merged()


def eos_token_ids(tokenizer, model=None) -> list[int]:
    """Every token id that ends a completion (tokenizer EOS + the model's generation config)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(int(i) for i in gen_eos)
    return sorted(ids)


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
    eos_ids: Sequence[int] | None = None,
    cache: str = "dynamic",
    max_cache_len: int | None = None,
    compile: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample continuations of LEFT-padded prompts with a KV cache.

    input_ids/attention_mask [B,P] -> (completion_ids [B*K, N], completion_mask [B*K, N]); rows
    are grouped by prompt (K consecutive rows per prompt); the mask covers tokens up to and
    including the first EOS (any of ``eos_ids``, default :func:`eos_token_ids`) and the ids
    after it are set to pad. ``temperature`` 0 = greedy. Sampling is from the plain softmax at
    ``temperature`` (nucleus-filtered when ``top_p`` < 1): top-k, min-p, typical-p and
    repetition penalties that a model's own generation_config may set are switched off, so
    the distribution sampled is the one PPO/GRPO compute log-probs from (Huang et al. 2024).

    ``cache`` "static" uses a fixed-shape KV cache of ``max_cache_len`` positions (default:
    prompt + max_new_tokens) and lets transformers compile the decoding step (it does so on
    CUDA; ``compile=True`` forces it on any device, ``False`` never). Should the static path
    fail, for a reason other than memory, it is logged and this model object uses the dynamic
    cache from then on (the same tokens from the same seed, only slower).
    """
    eos = list(eos_ids) if eos_ids is not None else eos_token_ids(tokenizer, model)
    do_sample = temperature > 0
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": eos or None,
        "use_cache": True,
        "num_beams": 1,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
    }
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0, min_p=None, typical_p=1.0)
    if num_completions > 1:  # K consecutive copies (greedy refuses num_return_sequences > 1)
        input_ids = input_ids.repeat_interleave(num_completions, dim=0)
        attention_mask = attention_mask.repeat_interleave(num_completions, dim=0)
    if cache not in ("static", "dynamic"):
        raise ConfigError(f"cache must be static or dynamic, got {cache!r}")
    static = cache == "static" and not getattr(model, "_rlhf_static_cache_failed", False)
    if static:
        kwargs.update(
            cache_implementation="static",
            max_cache_len=max(max_cache_len or 0, input_ids.shape[1] + max_new_tokens),
        )
        if compile is False:
            kwargs["disable_compile"] = True
        elif compile:
            from transformers import CompileConfig

            config = CompileConfig()
            config._compile_all_devices = True  # transformers' switch for non-CUDA devices
            kwargs["compile_config"] = config
    rng = _rng_state() if static else None
    try:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        if not static:
            raise
        # a compile or static-cache failure: log it and keep the run going
        log.warning("static-cache generation failed; using the dynamic cache", exc_info=exc)
        model._rlhf_static_cache_failed = True
        for key in ("cache_implementation", "max_cache_len", "disable_compile", "compile_config"):
            kwargs.pop(key, None)
        _set_rng_state(rng)  # the retry samples what the failed attempt would have
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    completion = out[:, input_ids.shape[1] :]  # [B*K, N]
    mask = completion_mask_after_eos(completion, eos or None)
    return completion.masked_fill(mask == 0, tokenizer.pad_token_id), mask


def _rng_state():
    return torch.random.get_rng_state(), (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    )


def _set_rng_state(state) -> None:
    cpu, cuda = state
    torch.random.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _is_eos(completion: torch.Tensor, eos_ids: int | Sequence[int]) -> torch.Tensor:
    eos = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    return torch.isin(
        completion, torch.tensor(eos, dtype=completion.dtype, device=completion.device)
    )


def completion_mask_after_eos(
    completion: torch.Tensor, eos_ids: int | Sequence[int] | None
) -> torch.Tensor:
    """[B,N] generated ids -> [B,N] long mask: 1 up to and including the first EOS, 0 after."""
    if eos_ids is None:
        return torch.ones_like(completion)
    is_eos = _is_eos(completion, eos_ids).long()
    after = torch.cumsum(is_eos, dim=1) - is_eos  # number of EOS strictly before each position
    return (after == 0).long()


def ended_with_eos(completion: torch.Tensor, eos_ids: int | Sequence[int]) -> torch.Tensor:
    """[B,N] generated ids -> [B] bool: the completion has an EOS (it did not run out of tokens)."""
    return _is_eos(completion, eos_ids).any(dim=1)


def load_sampling_model(cfg: SampleConfig, checkpoint: str | os.PathLike | None = None):
    """Tokenizer and a base model with the checkpoint's policy adapter merged in (eval mode)."""
    device, dtype = resolve_device_dtype(cfg)
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, device=device, dtype=dtype)
    ckpt = checkpoint if checkpoint is not None else cfg.init_adapter
    if ckpt:  # a checkpoint, a run folder (its latest checkpoint) or a bare adapter folder
        from peft import PeftModel

        model = PeftModel.from_pretrained(
            model, str(source_adapter_dir(ckpt, "policy")), adapter_name="policy"
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
    is called after each batch; should_stop() ends early with the rows done so far (none
    when it is true before the model loads).
    """
    cfg = config
    cfg.validate()
    rows = validate_rows("sample", data)
    if call_should_stop(should_stop):
        return []
    model, tokenizer, device = load_sampling_model(cfg, checkpoint)
    collator = PromptCollator(
        tokenizer, max_prompt_len=cfg.max_seq_len, chat_template=cfg.chat_template
    )
    ckpt = checkpoint if checkpoint is not None else cfg.init_adapter
    if ckpt:  # record the checkpoint actually used (a run folder stands for its latest)
        adapter = source_adapter_dir(ckpt, "policy")
        ckpt = adapter.parent if adapter.name == "policy" else adapter
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
    cache = resolve_generation_cache(cfg.generation_cache, device)
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
                cache=cache,
                max_cache_len=cfg.max_seq_len + cfg.max_new_tokens,
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
