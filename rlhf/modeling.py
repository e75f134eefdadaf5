"""Base models, named LoRA adapters, scalar heads and the tiny test model.

One base model in memory per job; LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models", arXiv:2106.09685) give it its roles:

- policy: a trainable adapter ("policy");
- value: a trainable adapter + :class:`ScalarHead` (PPO, Schulman et al. 2017, arXiv:1707.06347);
- reward: a frozen adapter + :class:`ScalarHead` from a reward-model run (InstructGPT,
  Ouyang et al. 2022, arXiv:2203.02155, sec. 3.5);
- reference: the same base with adapters disabled (``with model.disable_adapter():``).

:func:`build_tiny_model` makes a small Llama-shaped causal LM (Touvron et al. 2023,
arXiv:2302.13971) with random weights and a byte-level BPE tokenizer (Radford et al. 2019,
GPT-2; Sennrich et al. 2016, arXiv:1508.07909) trained offline on a built-in corpus, and
saves it as an ordinary model folder so tests and the local demo load it through the same
``from_pretrained`` path as a real model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf import distributed
from rlhf.config import BaseConfig, same_setting
from rlhf.errors import ConfigError

# peft asks transformers a deprecated question on every get_peft_model; the answer is still right.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- device / dtype

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def pick_device_dtype(
    device: str = "auto", dtype: str = "auto"
) -> tuple[torch.device, torch.dtype]:
    """Choose where and in what precision to run: bf16 on a GPU that has it, fp32 on CPU; a
    torchrun rank takes the GPU of its LOCAL_RANK."""
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"device {device!r} requested but CUDA is not available; use device='auto' or 'cpu'"
            )
    dev = distributed.device_for(dev)  # under torchrun: "cuda" is this rank's GPU (LOCAL_RANK)
    if dtype == "auto":
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            dt = torch.bfloat16
        else:
            dt = torch.float32
    else:
        try:
            dt = _DTYPES[dtype]
        except KeyError:
            raise ConfigError(
                f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16"
            ) from None
    return dev, dt


def resolve_device_dtype(cfg: BaseConfig) -> tuple[torch.device, torch.dtype]:
    """pick_device_dtype for a config."""
    return pick_device_dtype(cfg.device, cfg.dtype)


# ---------------------------------------------------------------------------- loading


@contextlib.contextmanager
def loading_model(name_or_path: str | os.PathLike):
    """Turn a failed ``from_pretrained`` (a missing folder, a folder that is not a model, a hub
    id that cannot be reached offline) into a ConfigError that says what to give instead."""
    name = str(name_or_path)
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        raise ConfigError(f"the model folder {name} does not exist")
    try:
        yield
    except (OSError, ValueError, KeyError, ImportError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ConfigError(
            f"cannot load the model {str(name_or_path)!r} ({reason}); give a folder saved with "
            "save_pretrained (config.json, weights and tokenizer files) or a hub id this "
            "machine can download (not with HF_HUB_OFFLINE=1)"
        ) from exc


def load_tokenizer(name_or_path: str | os.PathLike):
    """AutoTokenizer with a pad token (falls back to eos) and right padding for training."""
    from transformers import AutoTokenizer

    with loading_model(name_or_path):
        tok = AutoTokenizer.from_pretrained(str(name_or_path))
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
    tok.padding_side = "right"
    return tok


def load_causal_lm(
    name_or_path: str | os.PathLike, *, device: torch.device | str, dtype: torch.dtype
):
    """AutoModelForCausalLM.from_pretrained on ``device`` in ``dtype`` (SDPA attention)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    with loading_model(name_or_path):
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(name_or_path), attn_implementation="sdpa", **kwargs
            )
        except (ValueError, ImportError):  # an architecture without SDPA support
            model = AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs)
    return model.to(device)


def load_policy(
    cfg: BaseConfig,
    *,
    adapter_name: str = "policy",
    trainable: bool = True,
    init_from: str | os.PathLike | None = None,
):
    """Tokenizer + base model + LoRA adapter for ``cfg``.

    The adapter starts from ``init_from`` (e.g. the checkpoint being resumed), else from
    cfg.init_adapter, else fresh. Returns (model: PeftModel, tokenizer, device, dtype).
    """
    device, dtype = resolve_device_dtype(cfg)
    tokenizer = load_tokenizer(cfg.model)
    base = load_causal_lm(cfg.model, device=device, dtype=dtype)
    fit_tokenizer(base, tokenizer)
    model = add_lora(base, cfg, adapter_name=adapter_name, trainable=trainable, init_from=init_from)
    return model, tokenizer, device, dtype


def fit_tokenizer(model, tokenizer) -> None:
    """Grow the embeddings to the tokenizer (an added pad token) and set the model's pad id."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in the backward pass (Chen et al. 2016, arXiv:1604.06174)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


# ---------------------------------------------------------------------------- LoRA


def lora_config(cfg: BaseConfig, task_type: str = "CAUSAL_LM"):
    """peft.LoraConfig from the config's LoRA fields."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        bias="none",
        task_type=task_type,
    )


def adapter_dir(ckpt_dir: str | os.PathLike, name: str) -> Path:
    """Folder holding adapter ``name`` in a checkpoint (``ckpt/name/`` or ``ckpt/`` itself)."""
    ckpt = Path(ckpt_dir)
    for candidate in (ckpt / name, ckpt):
        if (candidate / "adapter_config.json").exists():
            return candidate
    raise ConfigError(
        f"no adapter {name!r} in {ckpt} (expected {ckpt / name / 'adapter_config.json'})"
    )


def source_adapter_dir(init: str | os.PathLike, adapter_name: str) -> Path:
    """The adapter folder to start from: a checkpoint, a run folder (its latest checkpoint) or
    a bare PEFT adapter folder; adapter ``adapter_name`` if present, else "policy"."""
    from rlhf.checkpoint import resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(init)
    except ConfigError:
        ckpt = Path(init)
    name = adapter_name if (ckpt / adapter_name / "adapter_config.json").exists() else "policy"
    return adapter_dir(ckpt, name)


def add_lora(
    model, cfg: BaseConfig, adapter_name: str = "policy", *, trainable: bool = True, init_from=None
):
    """Add a LoRA adapter named ``adapter_name`` and make it the active one.

    ``model`` is a plain transformers model (wrapped into a PeftModel) or a PeftModel that
    already has other adapters. The adapter starts from ``init_from`` (a checkpoint folder)
    or, for the policy, from ``cfg.init_adapter``; otherwise fresh (B = 0, so the adapted
    model starts equal to the base, Hu et al. 2021 sec. 4.1).
    """
    from peft import PeftModel, get_peft_model

    init = (
        init_from
        if init_from is not None
        else (cfg.init_adapter if adapter_name == "policy" else None)
    )
    if init:
        path = source_adapter_dir(init, adapter_name)
        _warn_if_lora_differs(path, cfg)
        if isinstance(model, PeftModel):
            model.load_adapter(str(path), adapter_name=adapter_name, is_trainable=trainable)
        else:
            model = PeftModel.from_pretrained(
                model, str(path), adapter_name=adapter_name, is_trainable=trainable
            )
    else:
        lcfg = lora_config(cfg)
        try:
            if isinstance(model, PeftModel):
                model.add_adapter(adapter_name, lcfg)
            else:
                model = get_peft_model(model, lcfg, adapter_name=adapter_name)
        except ValueError as exc:  # e.g. target_modules that match no layer of this model
            raise ConfigError(f"target_modules {cfg.target_modules!r}: {exc}") from exc
    model.set_adapter(adapter_name)
    if not trainable:
        for name, p in model.named_parameters():
            if f".{adapter_name}." in name:
                p.requires_grad_(False)
    return model


def _warn_if_lora_differs(path: Path, cfg: BaseConfig) -> None:
    """An adapter loaded to start from keeps its own shape (rank, scale, modules): say so when
    the run's config asks for another one, which is then not used."""
    try:
        saved = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return
    asked = {"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "target_modules": cfg.target_modules}
    differs = []
    for key, value in asked.items():
        have = saved.get(key)
        if key == "target_modules" and (value == "all-linear" or have is None):
            continue  # "all-linear" is resolved per model; the adapter lists the result
        if not same_setting(have, value):
            differs.append(f"{key} {have} (config: {value})")
    if differs:
        logger.warning(
            "the adapter in %s keeps its own %s; the config's values are not used",
            path,
            ", ".join(differs),
        )


def trainable_parameters(model) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adapter_parameters(model, name: str) -> list[nn.Parameter]:
    """The LoRA parameters of adapter ``name`` (made trainable), in a stable order."""
    params = [p for n, p in model.named_parameters() if f".{name}." in n]
    for p in params:
        p.requires_grad_(True)
    return params


def freeze_adapter(model, name: str) -> None:
    """Make every parameter of adapter ``name`` frozen."""
    for n, p in model.named_parameters():
        if f".{name}." in n:
            p.requires_grad_(False)


@contextlib.contextmanager
def eval_mode(model):
    """Run a block in eval mode (no dropout), then put the train/eval mode back."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def kept_trainable_state(model):
    """Run a block that may switch adapters (peft's ``set_adapter`` and ``load_adapter`` flip
    ``requires_grad`` and the train/eval mode), then put back every parameter's
    ``requires_grad`` flag and the train/eval mode."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


@contextlib.contextmanager
def active_adapter(model, name: str):
    """Run a block with adapter ``name`` active, in eval mode, then restore everything.

    The previous active adapter, every parameter's ``requires_grad`` flag and the train/eval
    mode are put back on exit, so e.g. a PPO policy model comes back exactly as it was: same
    active adapter ("policy"), same trainable parameters.
    """
    previous = model.active_adapter
    switch = previous != name
    with kept_trainable_state(model):
        if switch:
            model.set_adapter(name)
        model.eval()
        try:
            yield model
        finally:
            if switch:
                if isinstance(previous, str):
                    model.set_adapter(previous)
                else:  # several active adapters
                    model.base_model.set_adapter(list(previous))


def load_frozen_adapter(model, folder: str | os.PathLike, adapter_name: str) -> None:
    """Load a saved adapter into PeftModel ``model`` under ``adapter_name``, frozen, leaving
    the active adapter, the other parameters' ``requires_grad`` and the train/eval mode as
    they were."""
    previous = model.active_adapter
    with kept_trainable_state(model):
        model.load_adapter(str(folder), adapter_name=adapter_name, is_trainable=False)
        if model.active_adapter != previous:
            model.set_adapter(previous)
    freeze_adapter(model, adapter_name)


# ---------------------------------------------------------------------------- log-probs


def backbone_of(model):
    """The transformer body under a (Peft-wrapped) model: a causal LM's decoder without its LM
    head; an encoder itself. LoRA layers are injected in place, so calling the body uses the
    active adapter."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(base, "base_model_prefix", "")
    inner = getattr(base, prefix, None) if prefix else None
    if isinstance(inner, nn.Module) and inner is not base:
        return inner
    return base


def _backbone_and_lm_head(model):
    """(decoder, lm_head) of a (Peft-wrapped) causal LM, or None when logits need the full
    forward: models that soft-cap or rescale their logits after the head (Gemma 2's
    final_logit_softcapping, Cohere's logit_scale, Granite's and MiniCPM3's logits_scaling,
    Falcon-H1's lm_head_multiplier, ...). The known ones are read from the config;
    any other is caught by :func:`_fast_head_matches`, checked once per model, so a family
    this list does not know cannot make log-probs silently wrong."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or any(
        getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_POSTPROCESSING
    ):
        return None
    backbone = backbone_of(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None or backbone is base:
        return None
    if not _fast_head_matches(model, base, backbone, head):
        return None
    return backbone, head


# Config fields of families whose logits are not lm_head(last hidden state).
_LOGIT_POSTPROCESSING = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "lm_head_multiplier",
)


def _fast_head_matches(model, base, backbone, head) -> bool:
    """Whether lm_head(backbone(x)) gives the model's own logits, on a 4-token probe in eval
    mode (cached on the base model). False sends every call through the full forward."""
    known = getattr(base, "_rlhf_fast_head_matches", None)
    if known is not None:
        return known
    modes = {m: m.training for m in model.modules()}
    vocab = int(getattr(base.config, "vocab_size", 0) or 0)
    ids = torch.arange(min(4, max(vocab, 1)), device=head.weight.device).unsqueeze(0) % max(
        vocab, 1
    )
    try:
        model.eval()
        with torch.no_grad():
            full = model(input_ids=ids, use_cache=False).logits.float()
            fast = head(backbone(input_ids=ids, use_cache=False).last_hidden_state).float()
        scale = float(full.abs().max()) or 1.0
        matches = fast.shape == full.shape and bool(
            torch.allclose(fast, full, rtol=1e-2, atol=1e-3 * scale)
        )
    finally:
        for m, training in modes.items():
            m.training = training
    if not matches:
        logger.info(
            "%s post-processes its logits after the LM head: log-probs use the full forward",
            type(base).__name__,
        )
    base._rlhf_fast_head_matches = matches
    return matches


def next_token_logits(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    select: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits [N, V] at the positions ``select`` [B, T-1] marks (position t predicts token
    t+1), in row-major order, under the active adapter.

    The LM head runs only on those N positions ([N,H] -> [N,V] instead of [B,T,V]), which
    saves the head's time and the logits' memory on prompts. Models that post-process their
    logits take the ordinary forward (with ``logits_to_keep`` from the first selected column).
    """
    kwargs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "use_cache": False,
    }
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    parts = _backbone_and_lm_head(model)
    if parts is None:
        T = input_ids.shape[1]
        used = select.any(0).nonzero()
        first = int(used[0]) if used.numel() else T - 1
        try:
            logits = model(**kwargs, logits_to_keep=T - first).logits  # positions first..T-1
        except TypeError:  # an architecture without logits_to_keep: all positions
            logits = model(**kwargs).logits[:, first:]
        return logits[:, :-1][select[:, first:]]
    backbone, head = parts
    hidden = backbone(**kwargs).last_hidden_state  # [B,T,H]
    return head(hidden[:, :-1][select])  # [N,V]


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / temperature)[target] per row ([..., V], [...] -> [...]), in fp32,
    and optionally the entropy of each row's distribution (no gradient)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, entropy


# ---------------------------------------------------------------------------- heads


class ScalarHead(nn.Module):
    """A linear map hidden -> 1 for rewards and values: ``head(h[B,T,H]) -> [B,T]``.

    Initialised with std 1/sqrt(H+1) as the reward head of Ziegler et al. 2019
    ("Fine-Tuning Language Models from Human Preferences", arXiv:1909.08593). Kept in fp32;
    inputs are cast to fp32.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.linear.weight, std=1.0 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden_states.to(self.linear.weight.dtype)).squeeze(-1)  # [B, T]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row ([B,T] -> [B]); works with right or left padding."""
    T = attention_mask.shape[-1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return (positions * attention_mask.long()).argmax(dim=-1)


def hidden_size_of(model) -> int:
    config = model.config
    for name in ("hidden_size", "n_embd", "d_model"):
        if hasattr(config, name):
            return int(getattr(config, name))
    raise ConfigError("cannot find the hidden size in the model config")


# ---------------------------------------------------------------------------- tiny model

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|eos|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS_SEED = """
The quick brown fox jumps over the lazy dog. A labeler reads two answers and picks the better one.
Reinforcement learning from human feedback trains a reward model on rankings, then tunes a policy.
The policy writes a completion for each prompt; the reward model scores it; the optimizer updates it.
Write a short poem about the sea. The sea is wide and blue, and the waves come in and go out again.
Summarize the following text in one sentence. Translate this sentence into French, please.
What is the capital of France? Paris is the capital of France. What is two plus two? It is four.
Question: Why is the sky blue? Answer: Sunlight is scattered by the air, and blue light scatters most.
Please explain how a neural network learns. It computes a loss and follows the gradient downhill.
I like apples, bananas, cherries and grapes. She said hello to everyone in the room and sat down.
def add(a, b): return a + b  # numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 yes no true false
The helpful assistant answers clearly and politely; the harmful answer is rejected by the labelers.
Once upon a time there was a small model that wanted to learn to talk like people do.
"""


def _tiny_corpus() -> list[str]:
    lines = [line.strip() for line in _CORPUS_SEED.strip().splitlines() if line.strip()]
    words = " ".join(lines).split()
    corpus = list(lines)
    # deterministic word shuffles give the BPE trainer enough pair statistics
    for k in range(1, 8):
        corpus.append(" ".join(words[k :: k + 1] + words[:: k + 2]))
    return corpus


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock (fcntl) so parallel test processes build a folder once."""
    import fcntl

    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_tiny_model(
    path: str | os.PathLike,
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
) -> Path:
    """Build (or reuse) a small Llama-shaped causal LM with random weights at ``path``.

    The tokenizer is a byte-level BPE trained offline on a built-in corpus, with pad/bos/eos
    tokens and a simple chat template. The folder loads with ``from_pretrained(path)``.
    Cached: when ``path`` already holds a model built with the same arguments it is returned
    at once. Written to a temporary folder and renamed into place.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    args = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "seed": seed,
        "version": 2,
    }
    marker = path / "tiny_model.json"
    if marker.exists() and (path / "config.json").exists():
        try:
            if json.loads(marker.read_text()) == args:
                return path
        except (OSError, ValueError):
            pass
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file; give a folder for the tiny model")
    if path.is_dir() and not marker.exists() and any(path.iterdir()):
        # only a folder this function built (with other arguments) is ever replaced
        raise ConfigError(f"{path} is not empty and holds no tiny model; choose another folder")
    if hidden_size % num_heads:
        raise ConfigError(
            f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})"
        )

    tokenizer = _train_tokenizer(vocab_size)
    devnull_seed_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        initializer_range=hidden_size**-0.5,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(devnull_seed_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id

    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path.parent / f".{path.name}.lock"):
        # another process may have built it while we trained the tokenizer
        if (
            marker.exists()
            and (path / "config.json").exists()
            and json.loads(marker.read_text()) == args
        ):
            return path
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "tiny_model.json").write_text(json.dumps(args))
            if path.exists():  # a build with other arguments
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return path
