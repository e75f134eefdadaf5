"""One entry point for every run kind, used by the CLI (``python -m rlhf``) and the Celery tasks.

``run(kind, config, data, output_dir=...)`` validates the config (a dataclass or a plain
dict), then dispatches to the algorithm module, imported lazily so that a worker only loads
what it runs: SFT (:mod:`rlhf.sft`), reward model (:mod:`rlhf.reward`, InstructGPT,
Ouyang et al. 2022), DPO (:mod:`rlhf.dpo`, Rafailov et al. 2023), PPO (:mod:`rlhf.ppo`,
Schulman et al. 2017), GRPO (:mod:`rlhf.grpo`, Shao et al. 2024) and sampling
(:mod:`rlhf.sampling`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf.config import BaseConfig, config_class, config_from_dict
from rlhf.errors import ConfigError
from rlhf.loop import OnStep, ShouldStop, TrainResult

KINDS = ("sft", "reward", "dpo", "ppo", "grpo", "sample")

_ENTRY_POINTS = {
    "sft": "rlhf.sft:train_sft",
    "reward": "rlhf.reward:train_reward",
    "dpo": "rlhf.dpo:train_dpo",
    "ppo": "rlhf.ppo:train_ppo",
    "grpo": "rlhf.grpo:train_grpo",
    "sample": "rlhf.sampling:sample",
}

SAMPLES_FILE = "samples.jsonl"

DATA_PARALLEL_KINDS: frozenset[str] = frozenset({"sft", "reward", "dpo", "ppo", "grpo"})
"""The kinds whose trainer runs data-parallel under ``torchrun --nproc-per-node N``: it shards
the data by rank, all-reduces the LoRA gradients and writes from rank 0 only. Any other kind
refuses a world size above 1 (:func:`check_world_size`): N processes would each train alone and
write over each other's checkpoints."""


def check_world_size(kind: str) -> None:
    """ConfigError when this process is one of several (torchrun's WORLD_SIZE) and ``kind``
    cannot run data-parallel."""
    raw = os.environ.get("WORLD_SIZE", "") or "1"
    world = int(raw) if raw.isdigit() else 1
    if world > 1 and kind not in DATA_PARALLEL_KINDS:
        raise ConfigError(
            f"{kind} runs in one process in this version of the engine, and it was started as "
            f"{world} processes (WORLD_SIZE={world}); run it on 1 device"
        )


def _import(target: str) -> Callable:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise ConfigError(
                f"run kind needs {module_name}, which is not available in this install"
            ) from exc
        raise
    return getattr(module, attr)


def load_reward_fn(spec: str) -> Callable[[str, str], float]:
    """Import a reward function from "package.module:function" or "path/to/file.py:function".

    The function takes (prompt, completion) and returns a float.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(f"reward function must look like 'module:function', got {spec!r}")
    module_name, _, func_name = spec.rpartition(":")
    if not module_name or not func_name:
        raise ConfigError(f"reward function must look like 'module:function', got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ConfigError(f"reward function file {path} does not exist")
            module_spec = importlib.util.spec_from_file_location(f"_reward_fn_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as exc:  # a syntax error, a failing import inside the module, ...
        raise ConfigError(
            f"cannot import reward module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ConfigError(f"{module_name} has no function {func_name!r}")
    return fn


def check_output_dir(output_dir: str | os.PathLike, *, checkpoints: bool, resuming: bool) -> None:
    """Refuse, before any work, an output folder that is a file, or (for a run that writes
    ``checkpoints``) one that already holds a run's checkpoints when this run does not resume
    it: its checkpoints would mix with the new ones and "the latest checkpoint" of the folder
    could be the old run's. Sampling writes only samples.jsonl, so any folder will do."""
    from rlhf.checkpoint import latest_checkpoint

    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"the output folder {out} is a file; choose a folder")
    if checkpoints and not resuming and out.is_dir() and latest_checkpoint(out) is not None:
        raise ConfigError(
            f"{out} already holds checkpoints of a run; resume it (--resume) or choose a new folder"
        )


def coerce_config(kind: str, config: BaseConfig | dict[str, Any]) -> BaseConfig:
    """A config dataclass for ``kind`` from a dataclass or a dict (validated)."""
    if isinstance(config, dict):
        return config_from_dict(kind, config)
    expected = config_class(kind)
    if not isinstance(config, expected):
        raise ConfigError(f"a {kind} run needs a {expected.__name__}, got {type(config).__name__}")
    config.validate()
    return config


def run(
    kind: str,
    config: BaseConfig | dict[str, Any],
    data: list[dict[str, Any]],
    *,
    output_dir: str | os.PathLike,
    on_step: OnStep | None = None,
    should_stop: ShouldStop | None = None,
    resume_from: str | os.PathLike | None = None,
    reward_model: str | os.PathLike | None = None,
    reward_fn: Callable[[str, str], float] | str | None = None,
    eval_data: list[dict[str, Any]] | None = None,
) -> TrainResult | list[dict[str, Any]]:
    """Run ``kind`` ("sft", "reward", "dpo", "ppo", "grpo", "sample") and return its result.

    Training kinds return a TrainResult. "sample" returns the list of sampled rows and also
    writes them to ``output_dir/samples.jsonl`` (``resume_from``, when given, is the
    checkpoint to sample from). PPO/GRPO take ``reward_model`` (a reward checkpoint or run
    folder, or a scorer object ``scorer(prompts, completions) -> Tensor[B]`` such as a
    :class:`rlhf.reward.RewardScorer`) or ``reward_fn`` (a callable or a "module:function"
    string). ``eval_data`` (held-out rows) goes
    to the kinds that take it (sft, reward, dpo) instead of their own held-out split.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown run kind {kind!r}; expected one of {', '.join(KINDS)}")
    check_world_size(kind)
    cfg = coerce_config(kind, config)
    fn = _import(_ENTRY_POINTS[kind])
    if isinstance(reward_fn, str):
        reward_fn = load_reward_fn(reward_fn)
    check_output_dir(output_dir, checkpoints=kind != "sample", resuming=resume_from is not None)
    if kind != "sample" and os.environ.get("RANK", "0") in ("", "0"):  # rank 0 writes
        # a crash mid-save left a .tmp-step-* folder: this run owns the folder
        from rlhf.checkpoint import clean_incomplete

        clean_incomplete(output_dir)

    if kind == "sample":
        from rlhf.data import write_jsonl

        rows = fn(cfg, data, checkpoint=resume_from, on_step=on_step, should_stop=should_stop)
        write_jsonl(Path(output_dir) / SAMPLES_FILE, rows)
        return rows

    kwargs: dict[str, Any] = {
        "output_dir": output_dir,
        "on_step": on_step,
        "should_stop": should_stop,
        "resume_from": resume_from,
    }
    if kind in ("ppo", "grpo"):
        if reward_model is None and reward_fn is None:
            raise ConfigError(
                f"a {kind} run needs a reward model (--reward-model DIR) or a reward function (--reward-fn module:function)"
            )
        kwargs["reward_model"] = reward_model
        kwargs["reward_fn"] = reward_fn
    elif reward_model is not None or reward_fn is not None:
        raise ConfigError(f"a {kind} run takes no reward model or reward function")
    if eval_data is not None:
        if kind not in ("sft", "reward", "dpo"):
            raise ConfigError(f"a {kind} run takes no eval data")
        kwargs["eval_data"] = eval_data
    return fn(cfg, data, **kwargs)
