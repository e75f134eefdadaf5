"""Built-in rule rewards: a reward signal without a trained reward model.

Each rule is ``reward(prompt: str, completion: str) -> float`` (the engine's ``reward_fn``
contract, see rlhf.rl) and is deterministic and cheap, so a PPO or GRPO job can start before
anyone has ranked anything, and a test can check that a policy learns what the rule asks for.
Rules are looked up by name (``REWARD_RULES``); jobs store the name, never the function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

POLITE_MARKERS = (
    "please",
    "thank",
    "thanks",
    "glad",
    "happy to help",
    "you're welcome",
    "sorry",
    "kindly",
    "of course",
    "certainly",
    "great question",
    "hope this helps",
)
RUDE_MARKERS = (
    "stupid",
    "idiot",
    "dumb",
    "obviously",
    "whatever",
    "shut up",
    "figure it out",
    "google it",
    "not my problem",
)


def politeness(prompt: str, completion: str) -> float:
    """+1 per polite phrase, -1 per rude phrase, squashed into [-1, 1] (x / (1 + |x|))."""
    text = completion.lower()
    score = sum(text.count(m) for m in POLITE_MARKERS) - sum(text.count(m) for m in RUDE_MARKERS)
    return score / (1.0 + abs(score))


LENGTH_TARGET_CHARS = 50


def length(prompt: str, completion: str) -> float:
    """Longer answers score higher, up to LENGTH_TARGET_CHARS characters:
    min(chars, target) / target, in [0, 1]. Even the random tiny demo model learns it within a
    few dozen PPO or GRPO steps (it learns to pick its longer byte-pair tokens), which makes it
    the smoke test of the RL loop: the reward curve rises."""
    return min(len(completion.strip()), LENGTH_TARGET_CHARS) / LENGTH_TARGET_CHARS


@dataclass(frozen=True)
class RewardRule:
    name: str
    label: str
    fn: Callable[[str, str], float]


REWARD_RULES: dict[str, RewardRule] = {
    "politeness": RewardRule(
        "politeness", "Politeness (polite phrases minus rude ones)", politeness
    ),
    "length": RewardRule(
        "length", f"Length (more characters, up to {LENGTH_TARGET_CHARS})", length
    ),
}


def reward_rule_get(name: str) -> RewardRule:
    try:
        return REWARD_RULES[name]
    except KeyError:
        raise KeyError(
            f"unknown reward rule {name!r}; choose one of {', '.join(REWARD_RULES)}"
        ) from None
