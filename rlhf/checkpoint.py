"""Checkpoints: PEFT adapter folders (safetensors) + heads + exact-resume state + state.json.

Layout of ``output_dir/step-0000123/``::

    state.json                    {kind, config, step, metrics, lineage: {base_model, parent, data_hash, ...},
                                   world_size: processes that trained it (torchrun), ...}
    <adapter>/adapter_model.safetensors, adapter_config.json   one folder per adapter (peft save_pretrained)
    heads/<name>.safetensors      scalar heads (ScalarHead state dicts)
    training_state.pt             optimizer, scheduler and RNG states (read with weights_only=True)

A checkpoint is written to a temporary folder next to it and renamed into place with
``os.replace``, so a crash never leaves a half-written folder that looks whole (only folders
named ``step-*`` that contain ``state.json`` count). What such a crash does leave (a
``.tmp-step-*`` folder, or a ``.old-step-*`` one when a step was being re-saved) is
removed, or put back, by :func:`clean_incomplete` when the run starts again. Exact resume
follows the practice of saving optimizer, scheduler and every RNG state (as in Hugging Face
``Trainer``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf.errors import ConfigError

STEP_DIR = re.compile(r"^step-(\d+)$")
PARTIAL_DIR = re.compile(r"^\.(tmp|old)-(step-\d+)-")
"""What save_checkpoint leaves behind when it dies mid-save: the folder being written
(``.tmp-step-N-<random>``) or, while a step is re-saved, its previous copy
(``.old-step-N-<pid>``)."""
STATE_FILE = "state.json"
TRAINING_STATE_FILE = "training_state.pt"

log = logging.getLogger(__name__)


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def rng_state() -> dict[str, Any]:
    """Every RNG state the engine uses (python, torch CPU, torch CUDA)."""
    state: dict[str, Any] = {
        "python": _py_state_to_plain(random.getstate()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_plain(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def save_checkpoint(
    output_dir: str | os.PathLike,
    *,
    step: int,
    model=None,
    adapter_names: list[str] | tuple[str, ...] = (),
    heads: dict[str, nn.Module] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    state: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``output_dir/step-XXXXXXX`` atomically and return its path.

    ``state`` goes to state.json (the step is filled in); ``extra`` (tensors or plain data)
    goes with the optimizer/scheduler/RNG states into training_state.pt. An existing folder
    for the same step is replaced only after the new one is complete.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=output_dir))
    try:
        for name in adapter_names:
            model.save_pretrained(str(tmp), selected_adapters=[name])
            if name == "default":  # peft writes the default adapter at the top level
                (tmp / "default").mkdir()
                for f in ("adapter_model.safetensors", "adapter_config.json"):
                    if (tmp / f).exists():
                        os.replace(tmp / f, tmp / "default" / f)
            _drop_readme(tmp / name)
        _drop_readme(tmp)
        if heads:
            from safetensors.torch import save_file

            (tmp / "heads").mkdir()
            for name, head in heads.items():
                tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
                save_file(tensors, str(tmp / "heads" / f"{name}.safetensors"))
        training_state: dict[str, Any] = {"rng": rng_state()}
        if optimizer is not None:
            training_state["optimizer"] = optimizer.state_dict()
        if scheduler is not None:
            training_state["scheduler"] = scheduler.state_dict()
        if extra:
            training_state["extra"] = extra
        torch.save(training_state, tmp / TRAINING_STATE_FILE)
        full_state = dict(state)
        full_state["step"] = step
        (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=2, default=_json_default))
        if final.exists():
            trash = output_dir / f".old-{final.name}-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _drop_readme(folder: Path) -> None:
    readme = folder / "README.md"  # peft's generated model card; not needed here
    if readme.exists():
        readme.unlink()


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot write {type(obj).__name__} to state.json")


def clean_incomplete(output_dir: str | os.PathLike) -> list[str]:
    """Remove what a crash during :func:`save_checkpoint` left in ``output_dir`` and return
    the names removed. A ``.tmp-step-*`` folder is a checkpoint that was never renamed into
    place: removed. A ``.old-step-*`` folder is the previous copy of a step being re-saved:
    put back as ``step-*`` when the crash came before the new copy took its place, else
    removed. Call it only when no other process is saving into ``output_dir`` (a run
    starting or resuming there owns the folder)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    removed = []
    for child in sorted(output_dir.iterdir()):
        m = PARTIAL_DIR.match(child.name)
        if not m or not child.is_dir():
            continue
        final = output_dir / m.group(2)
        if m.group(1) == "old" and (child / STATE_FILE).exists() and not final.exists():
            os.replace(child, final)
            log.warning("put back %s from %s (a crash while it was re-saved)", final, child.name)
            continue
        shutil.rmtree(child)
        removed.append(child.name)
        log.warning("removed %s, left by a crash while a checkpoint was saved", child)
    return removed


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        m = STEP_DIR.match(child.name)
        if m and (child / STATE_FILE).exists():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step under ``output_dir``, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder itself, or the latest checkpoint in a run's output folder."""
    path = Path(path)
    if (path / STATE_FILE).exists():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise ConfigError(f"no checkpoint found in {path} (expected step-*/state.json)")
    return latest


def read_state(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's state.json as a dict."""
    return json.loads((Path(ckpt_dir) / STATE_FILE).read_text())


def load_training_state(
    ckpt_dir: str | os.PathLike,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    *,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG states saved by save_checkpoint (weights_only=True).

    Returns the loaded dict (its ``"extra"`` holds what the trainer added).
    """
    path = Path(ckpt_dir) / TRAINING_STATE_FILE
    if not path.exists():
        return {}
    state = torch.load(path, map_location="cpu", weights_only=True)
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng and "rng" in state:
        set_rng_state(state["rng"])
    return state


def load_adapter_weights(model, ckpt_dir: str | os.PathLike, adapter_name: str) -> None:
    """Copy saved adapter weights into adapter ``adapter_name`` of ``model``.

    ``ckpt_dir`` is a checkpoint (its ``adapter_name/`` folder is read) or an adapter folder
    itself, whatever name it was saved under (e.g. an SFT "policy" adapter starting a reward
    model's "reward" adapter)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from rlhf.modeling import adapter_dir

    folder = adapter_dir(ckpt_dir, adapter_name)
    weights = load_file(str(folder / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ConfigError(
            f"adapter {adapter_name!r} in {folder} does not fit this model: {unexpected[:3]}; "
            "same base model and lora_r?"
        )


def load_head(ckpt_dir: str | os.PathLike, name: str, *, device=None):
    """A ScalarHead saved under heads/<name>.safetensors."""
    from safetensors.torch import load_file

    from rlhf.modeling import ScalarHead

    path = Path(ckpt_dir) / "heads" / f"{name}.safetensors"
    if not path.exists():
        raise ConfigError(f"no head {name!r} in {ckpt_dir} (expected {path})")
    tensors = load_file(str(path))
    head = ScalarHead(tensors["linear.weight"].shape[1])
    head.load_state_dict(tensors)
    if device is not None:
        head.to(device)
    return head
