"""Warnings a job page shows beside its curves, computed from the job's own metrics.

A rising curve is not always good news. Two failures are common enough to name on every job
page, in plain words, with the numbers that show them:

- An RL policy (PPO, GRPO) that games its reward by writing longer: its responses sit at the
  `max_new_tokens` cap and stop ending with EOS while the reward climbs (the length bias of
  learned reward models: Singhal et al. 2023, "A Long Way to Go"; the missing-EOS penalty of
  TRL and the masking of truncated completions are the usual remedies).
- A reward model (or a DPO policy) that memorised its training pairs: held-out accuracy far
  below training accuracy, or a held-out set too small to tell (its 95% interval spans chance).

Pure functions of (kind, config, series): no database, so the rules are tested alone; the
selector `job_warnings` feeds them a job's points.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

Series = Mapping[str, Sequence[Sequence[float]]]  # {key: [[step, value], ...]}

AT_CAP_FRACTION = 0.95  # mean length at or above 95% of max_new_tokens counts as "at the cap"
EOS_COLLAPSE_FRACTION = 0.5  # EOS rate fell to half its best or less
MIN_STEPS = 6  # fewer points than this say nothing about a trend
MIN_EVAL_PAIRS = 100  # below this, a held-out accuracy's 95% interval is wider than ±0.1
OVERFIT_GAP = 0.15  # training accuracy this far above held-out accuracy


def _values(series: Series, key: str) -> list[float]:
    return [float(v) for _step, v in series.get(key, ()) if math.isfinite(float(v))]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _window(n: int) -> int:
    """Steps averaged at each end of a curve: a fifth of it, at least 3."""
    return max(3, n // 5)


def rl_warnings(config: Mapping, series: Series) -> list[dict]:
    rewards = _values(series, "objective/reward")
    lengths = _values(series, "response/length")
    eos = _values(series, "response/ended_with_eos")
    cap = config.get("max_new_tokens")
    if len(rewards) < MIN_STEPS or not lengths:
        return []
    w = _window(len(rewards))
    first, last = _mean(rewards[:w]), _mean(rewards[-w:])
    spread = max(rewards) - min(rewards)
    climbing = spread > 0 and last - first > 0.25 * spread
    climb = f"the reward rose from {first:.3g} to {last:.3g}" if climbing else ""
    warnings = []
    wl = _window(len(lengths))
    last_length = _mean(lengths[-wl:])
    last_eos = _mean(eos[-wl:]) if eos else None
    if isinstance(cap, int | float) and cap > 0 and last_length >= AT_CAP_FRACTION * cap:
        ending = f" and {last_eos:.0%} of them end with EOS" if last_eos is not None else ""
        warnings.append(
            {
                "code": "length_cap",
                "message": (
                    f"Responses sit at the length cap: over the last {wl} steps their mean length "
                    f"is {last_length:.1f} of max_new_tokens={cap:g}{ending}"
                    + (f", while {climb}" if climb else "")
                    + ". A reward that rises this way may be paying for length, not quality: "
                    "read the samples, set missing_eos_penalty, or raise max_new_tokens."
                ),
            }
        )
    if eos and len(eos) >= MIN_STEPS:
        # against the EOS rate at its best (a policy often learns to end, then unlearns it),
        # while the reward climbed over the same stretch
        we = _window(len(eos))
        rolling = [_mean(eos[i : i + we]) for i in range(len(eos) - we + 1)]
        peak_at = max(range(len(rolling)), key=rolling.__getitem__)
        peak, now = rolling[peak_at], rolling[-1]
        since = rewards[peak_at : peak_at + we]
        rose = bool(since) and spread > 0 and last - _mean(since) > 0.25 * spread
        if peak > 0 and now <= EOS_COLLAPSE_FRACTION * peak and now < 0.5 and rose:
            warnings.append(
                {
                    "code": "eos_collapse",
                    "message": (
                        f"Responses stopped ending: the share that ends with EOS fell from "
                        f"{peak:.0%} (steps {peak_at + 1}-{peak_at + we}) to {now:.0%} while "
                        f"the reward rose from {_mean(since):.3g} to {last:.3g}. The policy may "
                        "be gaming the reward with unfinished text; set missing_eos_penalty."
                    ),
                }
            )
    return warnings


def _preference_warnings(
    series: Series, *, what: str, train_key: str, held_out_key: str, pairs_key: str | None
) -> list[dict]:
    """A model trained on preference pairs (a reward model, a DPO policy) that memorised them:
    held-out accuracy far below training accuracy, or too few held-out pairs to tell."""
    train = _values(series, train_key)
    held_out = _values(series, held_out_key)
    pairs = _values(series, pairs_key) if pairs_key else []
    warnings = []
    if not held_out:
        if len(train) >= MIN_STEPS:
            warnings.append(
                {
                    "code": "no_held_out",
                    "message": (
                        f"No held-out pairs: training accuracy alone cannot tell a {what} "
                        "that learned the preference from one that memorised its pairs "
                        "(set eval_fraction above 0)."
                    ),
                }
            )
        return warnings
    acc = held_out[-1]
    n = int(pairs[-1]) if pairs else 0
    if 0 < n < MIN_EVAL_PAIRS:
        half = 1.96 * math.sqrt(max(acc * (1 - acc), 0.25 / n) / n)
        warnings.append(
            {
                "code": "small_held_out",
                "message": (
                    f"The held-out set has only {n} pairs: its accuracy of {acc:.2f} is "
                    f"±{half:.2f} (95%), too few to say how well this {what} generalises. "
                    f"Rank more items (at least {MIN_EVAL_PAIRS} held-out pairs)."
                ),
            }
        )
    if train:
        train_acc = _mean(train[-_window(len(train)) :])
        if train_acc - acc >= OVERFIT_GAP:
            warnings.append(
                {
                    "code": "overfit",
                    "message": (
                        f"Held-out accuracy {acc:.2f} is far below training accuracy "
                        f"{train_acc:.2f}: the {what} memorised its training pairs more than it "
                        "learned the preference. Rank more items, train fewer steps, or lower "
                        "the learning rate."
                    ),
                }
            )
    return warnings


def reward_warnings(config: Mapping, series: Series) -> list[dict]:
    return _preference_warnings(
        series,
        what="reward model",
        train_key="reward/train_accuracy",
        held_out_key="reward/accuracy",
        pairs_key="reward/eval_pairs",
    )


def dpo_warnings(config: Mapping, series: Series) -> list[dict]:
    return _preference_warnings(
        series,
        what="DPO policy",
        train_key="rewards/accuracy",
        held_out_key="eval/rewards_accuracy",
        pairs_key=None,
    )


RULES = {"ppo": rl_warnings, "grpo": rl_warnings, "reward": reward_warnings, "dpo": dpo_warnings}
# The metric keys each rule reads (what the selector loads).
_RL_KEYS = ("objective/reward", "response/length", "response/ended_with_eos")
KEYS = {
    "ppo": _RL_KEYS,
    "grpo": _RL_KEYS,
    "reward": ("reward/train_accuracy", "reward/accuracy", "reward/eval_pairs"),
    "dpo": ("rewards/accuracy", "eval/rewards_accuracy"),
}


def warnings_for(kind: str, config: Mapping, series: Series) -> list[dict]:
    """[{"code", "message"}] for a job of `kind` with `config` and its metric `series`."""
    rule = RULES.get(kind)
    return rule(config or {}, series) if rule else []
