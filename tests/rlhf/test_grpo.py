"""GRPO: group advantages and the loss by hand, then a short run on the tiny model."""

import math

import pytest
import torch

from rlhf.config import config_from_dict
from rlhf.errors import ConfigError
from rlhf.grpo import (
    LOSS_TYPES,
    GRPOConfig,
    group_advantages,
    grpo_loss,
    micro_batch_share,
    train_grpo,
)
from rlhf.rl import kl_k3
from tests.rlhf.resume import full_and_resumed


def test_group_advantages_normalise_each_group_by_its_own_mean_and_std():
    # group 1: [1, 2, 3] mean 2, unbiased std 1 -> [-1, 0, 1]; group 2: all equal -> 0
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    adv = group_advantages(rewards, 3, eps=0.0 + 1e-12)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    # group [0, 4]: mean 2, unbiased std sqrt(8) -> ±2/sqrt(8)
    adv2 = group_advantages(torch.tensor([0.0, 4.0]), 2, eps=0.0 + 1e-12)
    torch.testing.assert_close(adv2, torch.tensor([-2 / math.sqrt(8), 2 / math.sqrt(8)]))


def test_group_advantages_without_scaling_only_subtract_the_group_mean():
    adv = group_advantages(torch.tensor([1.0, 3.0, 10.0, 20.0]), 2, scale=False)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -5.0, 5.0]))


def test_group_advantages_reject_a_batch_that_is_not_whole_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)


def test_grpo_loss_at_ratio_one_is_minus_the_mean_advantage_plus_beta_k3():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-0.5, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([2.0, -1.0])
    loss, stats = grpo_loss(logp, logp.detach(), ref, adv, mask, cliprange=0.2, beta=0.1)
    k3 = kl_k3(logp.detach(), ref)
    # completion 0: -2 + 0.1·mean(k3[0, :3]); completion 1: +1 + 0.1·mean(k3[1, :2])
    expected = 0.5 * ((-2.0 + 0.1 * k3[0].mean()) + (1.0 + 0.1 * k3[1, :2].mean()))
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    assert float(stats["clipfrac"]) == 0.0
    loss.backward()
    # the padded token gets no gradient; at ratio 1 the surrogate's gradient is -Â/(G·|o|)
    assert float(logp.grad[1, 2]) == 0.0
    assert float(logp.grad[0, 1]) == pytest.approx(-2.0 / 6 + 0.1 * (1 - math.exp(0.0)) / 6)


# two completions at ratio 1, β = 0: each real token's term is -Â
#   completion 0: Â = 1, three tokens -> terms -1, -1, -1 (sum -3, mean -1)
#   completion 1: Â = -2, one token (the rest padding) -> term 2 (sum 2, mean 2)
LOGP = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, -9.0, -9.0, -9.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
ADV = torch.tensor([1.0, -2.0])


def _loss_at_ratio_one(loss_type: str, rows=slice(None)):
    logp = LOGP[rows].clone().requires_grad_(True)
    loss, _ = grpo_loss(
        logp,
        logp.detach(),
        None,
        ADV[rows],
        MASK[rows],
        cliprange=0.2,
        beta=0.0,
        loss_type=loss_type,
        max_new_tokens=4,
    )
    loss.backward()
    return float(loss.detach()), logp.grad


def test_grpo_loss_types_match_hand_computed_numbers():
    # "grpo": mean of the completions' token means: (-1 + 2) / 2
    loss, grad = _loss_at_ratio_one("grpo")
    assert loss == pytest.approx(0.5)
    # a token of the 3-token completion weighs 1/(2·3), the lone token 1/2: the length bias
    torch.testing.assert_close(grad[:, 0], torch.tensor([-1 / 6, 1.0]))
    # "dr_grpo": token sums / max_new_tokens (4), mean over completions: (-3 + 2) / 4 / 2
    loss, grad = _loss_at_ratio_one("dr_grpo")
    assert loss == pytest.approx(-0.125)
    # every token weighs 1/(2·4), whatever its completion's length
    torch.testing.assert_close(grad[:, 0], torch.tensor([-1 / 8, 2 / 8]))
    # "dapo": the sum over the 4 real tokens / 4
    loss, grad = _loss_at_ratio_one("dapo")
    assert loss == pytest.approx(-0.25)
    torch.testing.assert_close(grad[:, 0], torch.tensor([-1 / 4, 2 / 4]))
    assert float(grad[0, 3]) == 0.0 and float(grad[1, 1:].abs().sum()) == 0.0  # padding


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batch_losses_weighted_by_their_share_add_up_to_the_minibatch_loss(loss_type):
    whole, _ = _loss_at_ratio_one(loss_type)
    parts = [
        _loss_at_ratio_one(loss_type, rows)[0]
        * micro_batch_share(loss_type, MASK[rows], rows=len(MASK), tokens=float(MASK.sum()))
        for rows in (slice(0, 1), slice(1, 2))
    ]
    assert sum(parts) == pytest.approx(whole)


def test_micro_batch_share_counts_completions_or_for_dapo_tokens():
    assert micro_batch_share("grpo", MASK[:1], rows=2, tokens=4.0) == 0.5
    assert micro_batch_share("dr_grpo", MASK[:1], rows=2, tokens=4.0) == 0.5
    assert micro_batch_share("dapo", MASK[:1], rows=2, tokens=4.0) == 0.75  # 3 of the 4 loss tokens


def test_grpo_config_needs_a_group_of_at_least_two(tiny_model_dir):
    with pytest.raises(ConfigError, match="num_generations"):
        config_from_dict("grpo", {"model": str(tiny_model_dir), "num_generations": 1})
    cfg = config_from_dict("grpo", {"model": str(tiny_model_dir)})
    assert isinstance(cfg, GRPOConfig) and cfg.beta == 0.04
    with pytest.raises(ConfigError, match="loss_type"):
        config_from_dict("grpo", {"model": str(tiny_model_dir), "loss_type": "bnpo"})


def text_length(prompt: str, completion: str) -> float:
    """Characters written / 16 (see tests/rlhf/test_ppo.py: learnable by the tiny model)."""
    return len(completion) / 16


PROMPTS = [{"prompt": f"Question {i}: tell me something."} for i in range(16)]


@pytest.mark.slow
def test_grpo_with_a_rule_based_reward_raises_the_reward(tiny_model_dir, tmp_path):
    cfg = GRPOConfig(
        model=str(tiny_model_dir),
        batch_size=8,
        num_generations=8,
        max_new_tokens=4,
        max_seq_len=48,
        lora_r=8,
        lora_alpha=16,
        learning_rate=1e-2,
        max_steps=25,
        beta=0.04,
        seed=0,
    )
    history = []
    result = train_grpo(
        cfg,
        PROMPTS,
        output_dir=tmp_path,
        reward_fn=text_length,
        on_step=lambda s, m: history.append(m),
    )
    assert result.step == 25
    start = sum(m["objective/reward"] for m in history[:3]) / 3
    end = sum(m["objective/reward"] for m in history[-3:]) / 3
    assert end > 1.3 * start, (start, end)
    for key in (
        "objective/kl",
        "objective/entropy",
        "loss/policy",
        "loss/kl",
        "policy/clipfrac",
        "perf/rollout_s",
        "perf/tokens_per_s",
    ):
        assert math.isfinite(history[-1][key]), key
    assert (result.checkpoint_dir / "policy" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_grpo_with_several_minibatches_resumes_to_the_same_metrics(tiny_model_dir, tmp_path):
    cfg = GRPOConfig(
        model=str(tiny_model_dir),
        batch_size=2,
        num_generations=4,
        num_minibatches=2,
        num_iterations=2,
        max_new_tokens=4,
        max_seq_len=48,
        lora_r=4,
        lora_alpha=8,
        learning_rate=1e-3,
        max_steps=3,
        seed=0,
    )
    full, part, stopped, _ = full_and_resumed(
        train_grpo, cfg, PROMPTS, tmp_path, stop_after=1, reward_fn=text_length
    )
    assert stopped.stopped and stopped.step == 1
    for step in (2, 3):
        for key in ("objective/reward", "objective/kl", "loss/policy", "policy/clipfrac"):
            assert part[step][key] == pytest.approx(full[step][key], rel=1e-4, abs=1e-6), (
                step,
                key,
            )
    assert full[3]["policy/clipfrac"] >= 0.0
