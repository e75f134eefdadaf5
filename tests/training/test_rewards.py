"""The built-in rule rewards: deterministic, bounded, and rewarding what their names say."""

import pytest

from training.rewards import LENGTH_TARGET_CHARS, REWARD_RULES, length, politeness, reward_rule_get


def test_politeness_prefers_the_polite_answer_to_the_curt_and_the_rude_one():
    polite = politeness("Capital of France?", "Paris. Glad to help, thank you for asking!")
    curt = politeness("Capital of France?", "Paris.")
    rude = politeness("Capital of France?", "Obviously Paris, google it.")
    assert polite > curt > rude
    assert curt == 0.0
    assert -1.0 < rude < 0.0 < polite < 1.0


def test_length_grows_with_characters_up_to_the_target_then_stays_at_one():
    assert length("q", "  ") == 0.0
    assert length("q", "one two") == pytest.approx(7 / LENGTH_TARGET_CHARS)
    assert length("q", "x" * LENGTH_TARGET_CHARS) == 1.0
    assert length("q", "x" * (3 * LENGTH_TARGET_CHARS)) == 1.0


def test_rules_are_looked_up_by_name_and_unknown_names_say_which_exist():
    assert set(REWARD_RULES) == {"politeness", "length"}
    assert reward_rule_get("length").fn is length
    with pytest.raises(KeyError, match="politeness"):
        reward_rule_get("kindness")
