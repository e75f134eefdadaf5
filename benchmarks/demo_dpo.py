#!/usr/bin/env python3
"""DPO on the demo project with the launch form's settings for the tiny demo model, over seeds.

    .venv/bin/python benchmarks/demo_dpo.py                       # the form's defaults, seeds 0-4
    .venv/bin/python benchmarks/demo_dpo.py --seeds 0 1 --set learning_rate=1e-2 beta=0.5

The rows are the ones a DPO job launched on the freshly seeded demo project trains on: one
ranking per demo prompt (``labeling.services.demo_seed`` stores the author's reference
ranking ``DEMO_REFERENCE_RANKING`` on an item of its own, the completions in the order of
``labeling.demo_data``), read back by ``training.selectors.preference_rows`` as
``{"prompt", "completions", "ranking"}`` rows in ranking-id order (= the prompts' order) and
passed to the engine without ``eval_data``, so the engine holds out ``eval_fraction`` of the
prompts (``rlhf.sft.split_eval``, seeded by the config's seed); each ranking of 4 gives
C(4,2) = 6 pairs (``rlhf.rankings.ranking_pairs``).

The config is ``training.forms.config_defaults("dpo", base_model=<tiny model>)`` (DPOConfig
defaults + LAUNCH_OVERRIDES + TINY_DEMO_OVERRIDES) with ``--set`` on top. Django is only set
up to import the form module (no database is touched). Prints, per seed: the loss of the
first and last step, the train reward accuracy and margin (the mean of the last 5 steps'
batches), the held-out accuracy and margin at the end and the wall-clock seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def demo_rows() -> list[dict]:
    """The engine rows of a DPO job launched on the freshly seeded demo project."""
    from labeling.demo_data import DEMO_PROMPTS, DEMO_REFERENCE_RANKING

    return [
        {
            "prompt": entry["prompt"],
            "completions": list(entry["completions"]),
            "ranking": [list(g) for g in DEMO_REFERENCE_RANKING],
        }
        for entry in DEMO_PROMPTS
    ]


def form_defaults(tiny_dir: str) -> dict:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from training.forms import config_defaults

    return config_defaults("dpo", base_model=tiny_dir)


def parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def run_seed(config: dict, rows: list[dict], seed: int) -> dict:
    from rlhf.dpo import DPOConfig, train_dpo

    cfg = DPOConfig(**{**config, "seed": seed})
    steps: list[dict] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = train_dpo(cfg, rows, output_dir=out, on_step=lambda s, m: steps.append(m))
    seconds = time.perf_counter() - t0
    tail = steps[-5:]
    return {
        "seed": seed,
        "loss_first": steps[0]["loss/dpo"],
        "loss_last": steps[-1]["loss/dpo"],
        "train_acc": statistics.mean(m["rewards/accuracy"] for m in tail),
        "train_margin": statistics.mean(m["rewards/margin"] for m in tail),
        "eval_loss": result.metrics.get("eval/loss_dpo", float("nan")),
        "eval_acc": result.metrics.get("eval/rewards_accuracy", float("nan")),
        "eval_margin": result.metrics.get("eval/rewards_margin", float("nan")),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--model-dir", default=str(ROOT / "var" / "test-models" / "tiny-lm"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from rlhf.modeling import build_tiny_model

    torch.set_num_threads(args.threads)
    tiny = str(build_tiny_model(args.model_dir))
    config = form_defaults(tiny)
    for item in args.set:
        key, _, value = item.partition("=")
        config[key] = parse_value(value)
    config = {**config, "model": tiny, "device": "cpu", "save_every": 0}
    shown = {k: v for k, v in config.items() if k != "model"}
    print("config:", json.dumps(shown, sort_keys=True), flush=True)
    rows = demo_rows()
    results = []
    for seed in args.seeds:
        r = run_seed(config, rows, seed)
        results.append(r)
        print(
            f"seed {seed}: loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}  "
            f"train acc {r['train_acc']:.2f} margin {r['train_margin']:+.3f}  "
            f"held-out loss {r['eval_loss']:.3f} acc {r['eval_acc']:.2f} "
            f"margin {r['eval_margin']:+.3f}  {r['seconds']:.1f} s",
            flush=True,
        )
    if len(results) > 1:
        for key in ("eval_acc", "eval_margin", "seconds"):
            values = [r[key] for r in results]
            print(f"{key}: min {min(values):.3f} mean {statistics.mean(values):.3f}")


if __name__ == "__main__":
    main()
