"""One scaffold for the stop + resume tests: the same run uninterrupted, and stopped after
`stop_after` steps then resumed from its own output folder."""

from __future__ import annotations

from pathlib import Path


def full_and_resumed(train, cfg, data, tmp_path: Path, *, stop_after: int, **inputs):
    """Returns (full metrics by step, resumed metrics by step, the stopped run's result,
    the resumed run's result). `resumed` holds only the steps run after the resume."""
    full: dict[int, dict] = {}
    train(cfg, data, output_dir=tmp_path / "full", on_step=full.__setitem__, **inputs)
    first: dict[int, dict] = {}
    stopped = train(
        cfg,
        data,
        output_dir=tmp_path / "cut",
        on_step=first.__setitem__,
        should_stop=lambda: len(first) >= stop_after,
        **inputs,
    )
    resumed: dict[int, dict] = {}
    result = train(
        cfg,
        data,
        output_dir=tmp_path / "cut",
        on_step=resumed.__setitem__,
        resume_from=tmp_path / "cut",
        **inputs,
    )
    return full, resumed, stopped, result
