"""Run configuration: one ``@dataclass`` per algorithm, all sharing :class:`BaseConfig`.

Each algorithm's dataclass subclasses :class:`BaseConfig` and lives in its own module
(``rlhf.sft.SFTConfig``, ``rlhf.reward.RewardConfig``, ...). ``CONFIG_CLASSES`` maps a run
kind to ``"module:Class"``; modules are imported lazily so that ``rlhf.config`` stays light.

Defaults for the LoRA fields follow Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models" (arXiv:2106.09685) and the QLoRA recipe of Dettmers et al. 2023
(arXiv:2305.14314: adapters on all linear layers, r=16..64, dropout 0.05). Optimiser
defaults follow Loshchilov & Hutter 2019 (AdamW, arXiv:1711.05101) and the InstructGPT SFT
recipe of Ouyang et al. 2022 (arXiv:2203.02155, appendix C: cosine decay, warm-up).

``config_from_dict(kind, d)`` turns a plain dict (a JSON file, a web form) into the
dataclass and raises :class:`rlhf.errors.ConfigError` with a message a person can act on:
an unknown field (with a "did you mean" suggestion), a value of the wrong type, or a value
out of range (checked by the dataclass's ``validate()``).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from rlhf.errors import ConfigError

CONFIG_CLASSES: dict[str, str] = {
    "sft": "rlhf.sft:SFTConfig",
    "reward": "rlhf.reward:RewardConfig",
    "dpo": "rlhf.dpo:DPOConfig",
    "ppo": "rlhf.ppo:PPOConfig",
    "grpo": "rlhf.grpo:GRPOConfig",
    "sample": "rlhf.sampling:SampleConfig",
}


@dataclass
class BaseConfig:
    """Fields every run shares. Subclasses add their own and extend :meth:`validate`."""

    model: str = ""
    """Base model: a Hugging Face hub id or a local folder saved with ``save_pretrained``."""

    init_adapter: str | None = None
    """Checkpoint folder to start the policy adapter from (e.g. an SFT run); None = fresh LoRA."""

    lora_r: int = 16
    """LoRA rank. 16 is the QLoRA default range (Dettmers et al. 2023) and PEFT's common choice."""

    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r); alpha = 2r as in Hu et al. 2021's GPT-3 runs."""

    lora_dropout: float = 0.05
    """Dropout on the LoRA input; 0.05 as in QLoRA (Dettmers et al. 2023) for models under 13B."""

    target_modules: list[str] | str = "all-linear"
    """Modules that get adapters; "all-linear" = every linear layer but the LM head (QLoRA)."""

    learning_rate: float = 2e-4
    """Peak AdamW learning rate; 2e-4 is the QLoRA LoRA rate for small models (Dettmers et al. 2023)."""

    batch_size: int = 8
    """Examples per micro-batch (per optimizer step: batch_size * grad_accum_steps)."""

    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""

    max_steps: int = 100
    """Optimizer steps to run."""

    max_seq_len: int = 512
    """Tokens kept per example (prompt + completion); longer rows are truncated."""

    warmup_ratio: float = 0.03
    """Fraction of max_steps for linear warm-up before cosine decay (0.03 as in QLoRA / Alpaca)."""

    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (1.0, the usual transformer setting, e.g. InstructGPT)."""

    weight_decay: float = 0.0
    """AdamW decoupled weight decay (Loshchilov & Hutter 2019); 0 is standard for LoRA."""

    seed: int = 0
    """Seed for weights, data order, dropout and sampling."""

    save_every: int = 0
    """Save a checkpoint every N optimizer steps (0 = only at the end / on stop)."""

    device: str = "auto"
    """Where to run: "auto" (CUDA if present, else CPU), "cpu", "cuda", "cuda:1", ..."""

    dtype: str = "auto"
    """Weights dtype: "auto" (bf16 on a GPU that supports it, else fp32), "float32", "bfloat16", "float16"."""

    def validate(self) -> None:
        """Raise ConfigError on values out of range. Subclasses call ``super().validate()``."""
        if not self.model:
            raise ConfigError("model is required: a hub id or a local model folder")
        for f in dataclasses.fields(self):  # NaN passes every < and > check below
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
        if not self.target_modules:
            raise ConfigError('target_modules must name at least one module, or be "all-linear"')
        if isinstance(self.batch_size, str) and self.batch_size != "auto":
            raise ConfigError(
                f'batch_size must be a positive integer or "auto", got {self.batch_size!r}'
            )
        _positive(
            self,
            "lora_r",
            "lora_alpha",
            "batch_size",
            "grad_accum_steps",
            "max_steps",
            "max_seq_len",
        )
        _in_range(self, "lora_dropout", 0.0, 1.0, hi_open=True)
        _in_range(self, "warmup_ratio", 0.0, 1.0)
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.save_every < 0:
            raise ConfigError(f"save_every must be >= 0, got {self.save_every}")
        if self.dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
            raise ConfigError(
                f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}"
            )
        if not (
            self.device == "auto" or self.device == "cpu" or self.device.startswith(("cuda", "mps"))
        ):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")


@dataclass
class OfflineConfig(BaseConfig):
    """Fields of the runs that learn from a fixed data set (SFT, reward model, DPO): a
    held-out split, the chat template and gradient checkpointing."""

    eval_fraction: float = 0.1
    """Fraction of rows (prompts) held out for the eval/* metrics (at least one row when there
    are 2+ rows; 0 = none; ignored when ``eval_data`` is passed to the trainer)."""

    eval_every: int = 0
    """Compute held-out metrics every N steps (0 = at checkpoints and at the end only)."""

    eval_batch_size: int = 0
    """Rows per eval forward pass (0 = batch_size; DPO: sequences, 0 = 2 * batch_size)."""

    chat_template: bool = False
    """Wrap PLAIN-TEXT prompts with the tokenizer's chat template as one user turn (+ the
    assistant header); the policy's SFT run, its reward model and its RL runs must agree on it.
    A conversation row (``messages``) is always rendered with the template, whatever this says
    (rlhf.data.render_conversation)."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (Chen et al. 2016, arXiv:1604.06174)."""

    def validate(self) -> None:
        super().validate()
        _in_range(self, "eval_fraction", 0.0, 1.0, hi_open=True)
        for name in ("eval_every", "eval_batch_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")


DROPOUT_ATTRIBUTES = (
    "dropout",
    "attention_dropout",
    "hidden_dropout",
    "activation_dropout",
    "attn_pdrop",
    "resid_pdrop",
    "embd_pdrop",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
)
"""Float settings through which transformers models apply dropout without an ``nn.Dropout``
(e.g. Llama's attention reads ``self.attention_dropout`` in training mode)."""


def disable_dropout(model: Any) -> None:
    """Turn dropout off in ``model`` for good, also in ``train()`` mode: p = 0 on every
    ``nn.Dropout`` (LoRA's included) and 0.0 for the :data:`DROPOUT_ATTRIBUTES` of every module
    and of every model config. What a config's ``disable_dropout`` applies (TRL's
    ``disable_dropout_in_model``). torch is imported here only, so ``rlhf.config`` stays light."""
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        targets = [module, getattr(module, "config", None)]
        for target in targets:
            for name in DROPOUT_ATTRIBUTES:
                if isinstance(getattr(target, name, None), float):
                    setattr(target, name, 0.0)


REFERENCES = ("auto", "base", "init")


def resolve_reference(reference: str, init_adapter: str | None) -> str:
    """The reference policy π_ref of a run that has a ``reference`` field (DPO, PPO, GRPO):
    "base" (the base model with adapters disabled) or "init" (the policy as loaded from
    ``init_adapter``, π_SFT); "auto" = "init" when there is an init_adapter, else "base" (they
    are the same model then: a fresh LoRA adapter starts at zero). ConfigError for a value
    out of range, or "init" without an init_adapter."""
    if reference not in REFERENCES:
        raise ConfigError(f"reference must be auto, base or init, got {reference!r}")
    if reference == "init" and not init_adapter:
        raise ConfigError("reference='init' needs init_adapter (the SFT checkpoint)")
    if reference == "auto":
        return "init" if init_adapter else "base"
    return reference


def same_setting(a: Any, b: Any) -> bool:
    """Two values of one config field, compared as settings: a list of module names (e.g.
    target_modules) in another order is the same set."""

    def norm(v: Any) -> Any:
        return sorted(v) if isinstance(v, list | tuple) else v

    return norm(a) == norm(b)


def _positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value == "auto":  # resolved at run time where a config allows it (SFT, reward)
            continue
        if value <= 0:
            raise ConfigError(f"{name} must be > 0, got {value}")


def _in_range(cfg: Any, name: str, lo: float, hi: float, *, hi_open: bool = False) -> None:
    value = getattr(cfg, name)
    if value < lo or value > hi or (hi_open and value == hi):
        bracket = ")" if hi_open else "]"
        raise ConfigError(f"{name} must be in [{lo}, {hi}{bracket}, got {value}")


def config_class(kind: str) -> type:
    """The config dataclass for a run kind ("sft", "reward", "dpo", "ppo", "grpo", "sample")."""
    try:
        target = CONFIG_CLASSES[kind]
    except KeyError:
        raise ConfigError(
            f"unknown run kind {kind!r}; expected one of {', '.join(CONFIG_CLASSES)}"
        ) from None
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise ConfigError(
            f"run kind {kind!r} needs {module_name}, which is not available in this install"
        ) from None
    return getattr(module, class_name)


def config_from_dict(kind: str, d: dict[str, Any]) -> BaseConfig:
    """Build and validate the config for ``kind`` from a plain dict.

    Raises ConfigError on an unknown field ("did you mean ...?"), a wrong type, or a value
    that ``validate()`` rejects. Ints are accepted where floats are expected.
    """
    cls = config_class(kind)
    if not isinstance(d, dict):
        raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
        if key not in fields:
            close = _alias(key, fields) or difflib.get_close_matches(
                key, list(fields), n=1, cutoff=0.5
            )
            hint = (
                f"; did you mean {close[0]!r}?"
                if close
                else f"; known fields: {', '.join(sorted(fields))}"
            )
            raise ConfigError(f"unknown field {key!r}{hint}")
        kwargs[key] = _coerce(key, value, hints[key])
    try:
        cfg = cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(str(exc)) from None
    cfg.validate()
    return cfg


_ALIASES = {"lr": "learning_rate", "bs": "batch_size", "steps": "max_steps", "base_model": "model"}


def _alias(key: str, fields: dict) -> list[str]:
    name = _ALIASES.get(key)
    return [name] if name in fields else []


def config_to_dict(cfg: BaseConfig) -> dict[str, Any]:
    """A JSON-ready dict of every field (inverse of config_from_dict)."""
    return dataclasses.asdict(cfg)


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widened to float)."""
    ok, out = _match(value, tp)
    if not ok:
        raise ConfigError(
            f"field {name!r} must be {_type_name(tp)}, got {type(value).__name__} {value!r}"
        )
    return out


def _match(value: Any, tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, out = _match(value, arg)
            if ok:
                return True, out
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp)), value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        outs = []
        for item in value:
            ok, out = _match(item, item_tp)
            if not ok:
                return False, value
            outs.append(out)
        return True, list(outs) if origin is list else tuple(outs)
    if origin is dict:
        return isinstance(value, dict), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        return False, value
    if tp is int:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, int):
            return True, value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return False, value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is typing.Literal:
        return " or ".join(f'"{a}"' if isinstance(a, str) else repr(a) for a in typing.get_args(tp))
    if origin is list:
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, str(tp)
    )


__all__ = [
    "BaseConfig",
    "OfflineConfig",
    "CONFIG_CLASSES",
    "config_class",
    "config_from_dict",
    "config_to_dict",
    "disable_dropout",
    "resolve_reference",
    "field",
    "same_setting",
]
