"""DPO with the launch form's defaults for the tiny demo model learns the demo's rankings.

The rows are what a DPO job launched on the freshly seeded demo project trains on (one
reference ranking per demo prompt, see ``labeling.services.demo_seed`` and
``training.selectors.preference_rows``), with the engine's own held-out split. The
thresholds were checked on seeds 0-9 with ``benchmarks/demo_dpo.py`` (held-out accuracy
0.50-0.80, margin +0.13..+0.80; the training pairs all ranked right); the test runs two
seeds to stay within a few seconds.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from labeling.demo_data import DEMO_PROMPTS, DEMO_REFERENCE_RANKING

SEEDS = (0, 1)


def demo_rows() -> list[dict]:
    return [
        {
            "prompt": entry["prompt"],
            "completions": list(entry["completions"]),
            "ranking": [list(group) for group in DEMO_REFERENCE_RANKING],
        }
        for entry in DEMO_PROMPTS
    ]


@pytest.mark.slow
def test_dpo_with_the_demo_form_defaults_learns_the_demo_rankings_on_held_out_prompts(
    tiny_model, tmp_path
):
    from rlhf.dpo import DPOConfig, train_dpo
    from training.forms import config_defaults

    defaults = config_defaults("dpo", base_model=tiny_model)
    assert defaults["learning_rate"] != config_defaults("dpo", base_model="gpt2")["learning_rate"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    held_out_accuracy = []
    try:
        for seed in SEEDS:
            steps: list[dict] = []
            result = train_dpo(
                DPOConfig(**{**defaults, "model": tiny_model, "seed": seed}),
                demo_rows(),
                output_dir=tmp_path / f"seed-{seed}",
                on_step=lambda step, m, steps=steps: steps.append(m),
            )
            first, last = steps[0], steps[-1]
            assert len(steps) == defaults["max_steps"]
            assert last["loss/dpo"] < 0.25 * first["loss/dpo"], seed
            assert last["rewards/accuracy"] >= 0.9, seed
            assert last["rewards/margin"] > 2.0, seed
            assert result.metrics["eval/rewards_margin"] > 0.05, seed
            assert result.metrics["eval/rewards_accuracy"] >= 0.5, seed
            held_out_accuracy.append(result.metrics["eval/rewards_accuracy"])
    finally:
        torch.set_num_threads(threads)
    assert statistics.mean(held_out_accuracy) >= 0.55
