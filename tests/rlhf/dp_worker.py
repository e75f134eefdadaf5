"""One process of a data-parallel test run: the engine's trainers called as torchrun would call
them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the environment), for a list of
jobs, with rank 0's metrics written to a JSON file.

``run_jobs(jobs)`` in the test process itself is the one-process run of the same jobs.
``torch.multiprocessing.spawn(spawned, args=(world, port, jobs, out))`` is the N-process run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

EXACT_ROLLOUTS = "exact_rollouts"
"""A job flag: sample each response alone, seeded by its prompt and its place in its group,
so that the rollouts do not depend on how the batch is split over ranks."""


def reward_len(prompt: str, completion: str) -> float:
    """A rule-based reward: short answers with many distinct characters."""
    return len(set(completion)) / 10.0 - 0.05 * len(completion.split())


def _row_by_row_generate(real_generate):
    """``rlhf.rl.generate`` sampling every row alone from a seed of (call, prompt ids,
    repeat), so that 1 and N processes sample the same responses (batched multinomial
    sampling depends on the batch's shape)."""
    calls = {"n": 0}

    def generate(model, tokenizer, query, query_mask, **kwargs):
        calls["n"] += 1
        rows, seen = [], {}
        for ids, mask in zip(query, query_mask, strict=True):
            prompt = ids[mask.bool()].unsqueeze(0)
            key = tuple(prompt[0].tolist())
            seen[key] = seen.get(key, -1) + 1
            torch.manual_seed(hash((calls["n"], key, seen[key])) % (2**31))
            out, _ = real_generate(
                model, tokenizer, prompt, torch.ones_like(prompt), **{**kwargs, "cache": "dynamic"}
            )
            rows.append(out[0])
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id
        responses = torch.full((len(rows), width), pad, dtype=torch.long, device=query.device)
        for i, r in enumerate(rows):
            responses[i, : len(r)] = r
        from rlhf.sampling import completion_mask_after_eos

        mask = completion_mask_after_eos(responses, kwargs.get("eos_ids"))
        return responses.masked_fill(mask == 0, pad), mask

    return generate


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job: {"kind", "config", "data", "out", "stop_after"?, "resume"?,
    "exact_rollouts"?}; returns {"metrics": {step: metrics}, "step", "stopped",
    "checkpoint"} (metrics on rank 0 only)."""
    from unittest import mock

    from rlhf import rl
    from rlhf.runner import run

    seen: dict[int, dict] = {}
    stop_after = job.get("stop_after")
    kwargs: dict[str, Any] = {}
    if job["kind"] in ("ppo", "grpo"):
        kwargs["reward_fn"] = reward_len
    if stop_after:
        kwargs["should_stop"] = lambda: len(seen) >= stop_after
    patch = (
        mock.patch.object(rl, "generate", _row_by_row_generate(rl.generate))
        if job.get(EXACT_ROLLOUTS)
        else mock.patch.object(rl, "generate", rl.generate)
    )
    with patch:
        result = run(
            job["kind"],
            dict(job["config"]),
            job["data"],
            output_dir=job["out"],
            on_step=seen.__setitem__,
            resume_from=job["out"] if job.get("resume") else None,
            **kwargs,
        )
    return {
        "metrics": {str(k): v for k, v in seen.items()},
        "step": result.step,
        "stopped": result.stopped,
        "checkpoint": str(result.checkpoint_dir),
    }


def run_jobs(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [run_job(job) for job in jobs]


def spawned(rank: int, world: int, port: int, jobs: list[dict[str, Any]], out: str) -> None:
    """Entry point of ``torch.multiprocessing.spawn``: rank ``rank`` of ``world``."""
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from rlhf import distributed

    with distributed.process_group():  # one group for every job, as one torchrun would give
        results = run_jobs(jobs)
    if rank == 0:
        Path(out).write_text(json.dumps(results))
