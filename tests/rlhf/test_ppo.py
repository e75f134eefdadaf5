"""PPO: the pure helpers against hand-computed numbers, then short runs on the tiny model."""

import math

import pytest
import torch

from rlhf.config import config_from_dict
from rlhf.data import encode_prompts
from rlhf.errors import ConfigError, NonFiniteLossError
from rlhf.modeling import load_policy
from rlhf.ppo import (
    AdaptiveKLController,
    PPOConfig,
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    per_token_rewards,
    train_ppo,
    whiten,
)
from rlhf.rl import Rewarder
from rlhf.sampling import (
    MergedAdapter,
    completion_mask_after_eos,
    ended_with_eos,
    generate,
)
from tests.rlhf import test_rl
from tests.rlhf.resume import full_and_resumed

reward_checkpoint = test_rl.reward_checkpoint  # the fixture: a reward model on the tiny base
init_adapter = test_rl.init_adapter  # the fixture: an SFT-like policy adapter

# ------------------------------------------------------------------------------ pure helpers


def test_compute_gae_matches_hand_computed_values_on_three_tokens():
    # row 0: three real tokens, γ = 0.9, λ = 0.5
    #   t=2: δ = 1 - 0.4 = 0.6                      A2 = 0.6
    #   t=1: δ = 0 + 0.9·0.4 - 0.2 = 0.16           A1 = 0.16 + 0.45·0.6 = 0.43
    #   t=0: δ = 0 + 0.9·0.2 - 0.5 = -0.32          A0 = -0.32 + 0.45·0.43 = -0.1265
    # row 1: the last token is padding (its reward and value must be ignored)
    #   t=1: δ = 2 - 1 = 1                           A1 = 1
    #   t=0: δ = 0 + 0.9·1 - 1 = -0.1                A0 = -0.1 + 0.45·1 = 0.35
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.2, 0.4], [1.0, 1.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[-0.1265, 0.43, 0.6], [0.35, 1.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.3735, 0.63, 1.0], [1.35, 2.0, 0.0]]))


def test_compute_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.1, -0.2, 1.0]])
    values = torch.tensor([[0.3, 0.1, 0.5]])
    adv, ret = compute_gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    to_go = torch.tensor([[0.9, 0.8, 1.0]])
    torch.testing.assert_close(adv, to_go - values)
    torch.testing.assert_close(ret, to_go)


def test_whiten_normalises_over_masked_positions_only():
    # masked values 2, 4, 6: mean 4, unbiased variance (4 + 0 + 4) / 2 = 4, std 2
    x = torch.tensor([[2.0, 4.0, 6.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    torch.testing.assert_close(
        whiten(x, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        whiten(x, mask, shift_mean=False), torch.tensor([[3.0, 4.0, 5.0, 0.0]])
    )


def test_per_token_rewards_put_the_score_on_the_last_response_token():
    score = torch.tensor([1.0, 2.0])
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -3.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards, kl = per_token_rewards(score, logp, ref, mask, kl_coef=0.1)
    # row 0: k1 = [0.5, 0, -0.5] -> -0.1·k1 = [-0.05, 0, 0.05], + score 1 on token 2
    # row 1: one token with k1 = 0 -> the score 2 lands on token 0; padding gets nothing
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 1.05], [2.0, 0.0, 0.0]]))
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -0.5], [0.0, 0.0, 0.0]]))


def test_clipped_policy_loss_matches_hand_values_and_stops_the_gradient_when_clipped():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    loss, clipfrac, _ = clipped_policy_loss(logp, old, adv, torch.ones(1, 3), cliprange=0.2)
    # ρ = 1.5, A = 1: max(-1.5, -1.2) = -1.2 (clipped)
    # ρ = 0.5, A = -1: max(0.5, 0.8) = 0.8 (clipped)
    # ρ = 1.1, A = 2: max(-2.2, -2.2) = -2.2 (inside the range)
    assert float(loss.detach()) == pytest.approx((-1.2 + 0.8 - 2.2) / 3)
    assert float(clipfrac) == pytest.approx(2 / 3)
    loss.backward()
    # d/dlogπ of -A·ρ/3 is -A·ρ/3, only on the unclipped token
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, -2.2 / 3]]))


def test_clipped_policy_loss_ignores_masked_tokens():
    logp = torch.tensor([[0.0, 5.0]])
    loss, clipfrac, approx_kl = clipped_policy_loss(
        logp, torch.zeros(1, 2), torch.tensor([[1.0, 100.0]]), torch.tensor([[1, 0]]), cliprange=0.2
    )
    assert float(loss) == pytest.approx(-1.0)
    assert float(clipfrac) == 0.0
    assert float(approx_kl) == 0.0


def test_clipped_value_loss_matches_hand_values():
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.5, 0.0]])
    returns = torch.tensor([[2.0, 1.0]])
    loss, clipfrac = clipped_value_loss(values, old, returns, torch.ones(1, 2), cliprange_value=0.2)
    # token 0: (1-2)² = 1 vs clipped 0.5+0.2=0.7 -> (0.7-2)² = 1.69 -> 1.69 (clipped)
    # token 1: (0-1)² = 1 both ways -> 1
    assert float(loss) == pytest.approx(0.5 * (1.69 + 1.0) / 2)
    assert float(clipfrac) == pytest.approx(0.5)


def test_adaptive_kl_controller_moves_beta_towards_the_target():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # KL 12 = 2x the target: error clipped to +0.2 -> β·(1 + 0.2·100/10000)
    assert ctl.update(12.0, n_steps=100) == pytest.approx(0.2 * 1.002)
    # KL 3 = half the target: error -0.5 clipped to -0.2
    assert ctl.update(3.0, n_steps=100) == pytest.approx(0.2 * 1.002 * 0.998)
    # on target: unchanged
    assert ctl.update(6.0, n_steps=100) == pytest.approx(0.2 * 1.002 * 0.998)


def test_response_mask_keeps_tokens_up_to_and_including_the_first_eos():
    eos = 2
    responses = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]])
    mask, ended = completion_mask_after_eos(responses, [eos]), ended_with_eos(responses, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_ppo_config_rejects_a_batch_that_does_not_split_into_minibatches(tiny_model_dir):
    with pytest.raises(ConfigError, match="num_minibatches"):
        config_from_dict(
            "ppo", {"model": str(tiny_model_dir), "batch_size": 6, "num_minibatches": 4}
        )
    with pytest.raises(ConfigError, match="max_new_tokens"):
        config_from_dict(
            "ppo", {"model": str(tiny_model_dir), "max_new_tokens": 600, "max_seq_len": 512}
        )
    cfg = config_from_dict(
        "ppo", {"model": str(tiny_model_dir), "batch_size": 8, "num_minibatches": 2}
    )
    assert isinstance(cfg, PPOConfig) and cfg.gamma == 1.0 and cfg.lam == 0.95


# ------------------------------------------------------------------------------ model plumbing


def _small_cfg(model_dir, **kw) -> PPOConfig:
    base = dict(
        model=str(model_dir),
        batch_size=8,
        num_minibatches=2,
        ppo_epochs=1,
        max_new_tokens=4,
        max_seq_len=48,
        lora_r=4,
        lora_alpha=8,
        max_steps=2,
        learning_rate=1e-3,
        temperature=1.0,
    )
    base.update(kw)
    return PPOConfig(**base)


def _load_policy(cfg: PPOConfig):
    model, tok, device, dtype = load_policy(cfg)
    model.eval()  # as train_ppo: no dropout in RL
    return model, tok, device, dtype


def _randomise_adapter(model, name: str, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f"lora_B.{name}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_rollouts_sample_from_the_plain_softmax_even_when_the_model_sets_top_k(tiny_model_dir):
    cfg = _small_cfg(tiny_model_dir)
    model, tok, device, _ = _load_policy(cfg)
    defaults = model.get_base_model().generation_config
    defaults.do_sample, defaults.top_k, defaults.top_p, defaults.repetition_penalty = (
        True,
        20,
        0.8,
        1.3,
    )
    query, qmask = encode_prompts(
        tok, ["hello", "Say hi."], max_len=40, chat_template=False, device=device
    )
    seen = {}
    plain_generate = model.generate

    def spy(**kw):
        out = plain_generate(
            **kw, output_scores=True, output_logits=True, return_dict_in_generate=True
        )
        seen["out"] = out
        return out.sequences

    model.generate = spy
    generate(model, tok, query, qmask, max_new_tokens=5, temperature=0.7, eos_ids=[2])
    scores = torch.stack(seen["out"].scores)  # what was sampled from
    logits = torch.stack(seen["out"].logits)  # the raw model logits
    torch.testing.assert_close(scores, logits / 0.7)  # nothing filtered, penalised or masked


def test_merged_generation_restores_the_exact_base_weights(tiny_model_dir):
    cfg = _small_cfg(tiny_model_dir)
    model, tok, device, _ = _load_policy(cfg)
    _randomise_adapter(model, "policy")
    merger = MergedAdapter(model, "policy")
    assert merger.layers
    before = [m.get_base_layer().weight.clone() for m in merger.layers]
    query, qmask = encode_prompts(
        tok, ["Say hello.", "Hi"], max_len=40, chat_template=False, device=device
    )
    with torch.no_grad():
        unmerged = model(input_ids=query, attention_mask=qmask).logits
        with merger.merged():
            merged = model(input_ids=query, attention_mask=qmask).logits
            assert not torch.equal(merger.layers[0].get_base_layer().weight, before[0])
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)  # merging = the same policy
    for w, m in zip(before, merger.layers, strict=True):
        assert torch.equal(w, m.get_base_layer().weight)


# ------------------------------------------------------------------------------ training runs


def text_length(prompt: str, completion: str) -> float:
    """A rule-based reward a random tiny model learns in a few dozen steps: characters written
    (/16, four tokens of four characters = 1). Its byte-level BPE vocabulary mixes 1-byte tokens
    with merges of up to 13 characters, so the reward is a sum of per-token terms of high variance,
    a clear signal for a policy whose initial distribution is close to uniform."""
    return len(completion) / 16


PROMPTS = [{"prompt": f"Question {i}: tell me something."} for i in range(16)]


def _max_text_length_reward(model_dir, max_new_tokens: int) -> float:
    """The largest reward `text_length` can give: the longest token of the vocabulary, written
    at every one of the `max_new_tokens` positions."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    longest = max(len(tok.decode([i])) for i in range(len(tok)))
    return text_length("", "x" * longest * max_new_tokens)


def _ppo_history(tiny_model_dir, out, *, seed, kl_coef, max_steps):
    cfg = PPOConfig(
        model=str(tiny_model_dir),
        batch_size=32,
        num_minibatches=2,
        ppo_epochs=2,
        max_new_tokens=4,
        max_seq_len=48,
        lora_r=8,
        lora_alpha=16,
        learning_rate=1e-2,
        max_steps=max_steps,
        temperature=1.0,
        kl_coef=kl_coef,
        seed=seed,
    )
    history = []
    result = train_ppo(
        cfg, PROMPTS, output_dir=out, reward_fn=text_length, on_step=lambda s, m: history.append(m)
    )
    assert result.step == max_steps and not result.stopped
    return result, history


def _mean(history, key, rows):
    return sum(m[key] for m in rows) / len(rows)


@pytest.mark.slow
def test_ppo_with_a_rule_based_reward_raises_the_reward_while_kl_stays_bounded(
    tiny_model_dir, tmp_path
):
    """Over three seeds (the rise comes at a different step in each), the reward rises on every
    seed and clearly on average, and the KL never exceeds what the objective allows: the
    KL-regularised optimum has KL(π*‖π_ref) = E_π*[r]/β − log Z ≤ (r_max − E_ref[r])/β (Jensen on
    log Z), so any step above that bound means the penalty is not doing its work. A run with a
    10× stronger penalty ends nearer the reference than the weak-penalty runs."""
    r_max = _max_text_length_reward(tiny_model_dir, max_new_tokens=4)
    ratios, final_kls = [], []
    for seed in (0, 1, 2):
        result, history = _ppo_history(
            tiny_model_dir, tmp_path / f"seed{seed}", seed=seed, kl_coef=0.05, max_steps=30
        )
        start = _mean(history, "objective/reward", history[:3])
        end = _mean(history, "objective/reward", history[-3:])
        ratios.append(end / start)
        bound = (r_max - start) / 0.05
        assert all(math.isfinite(m["objective/kl"]) and m["objective/kl"] < bound for m in history)
        final_kls.append(_mean(history, "objective/kl", history[-5:]))
    # seen over 8 seeds: every seed ×1.36 or more, ×2.2 on average
    assert min(ratios) > 1.15 and sum(ratios) / 3 > 1.5, ratios

    _, strong = _ppo_history(tiny_model_dir, tmp_path / "strong", seed=0, kl_coef=0.5, max_steps=20)
    strong_start = _mean(strong, "objective/reward", strong[:3])
    assert all(m["objective/kl"] < (r_max - strong_start) / 0.5 for m in strong)
    # seen: 0.8-1.5 nats against 2.7-16 for the weak penalty
    assert _mean(strong, "objective/kl", strong[-5:]) < 0.5 * sum(final_kls) / 3, final_kls
    # the metrics every PPO step reports, from the last weak-penalty run
    for key in (
        "objective/entropy",
        "loss/policy",
        "loss/value",
        "policy/clipfrac",
        "perf/rollout_s",
        "perf/score_s",
        "perf/train_s",
        "perf/tokens_per_s",
    ):
        assert math.isfinite(history[-1][key]), key
    assert history[-1]["progress/total_steps"] == 30
    assert history[-1]["optim/lr"] > 0  # the rate the last updates used, as SFT reports it
    ckpt = result.checkpoint_dir
    assert (ckpt / "policy" / "adapter_model.safetensors").exists()
    assert (ckpt / "value" / "adapter_model.safetensors").exists()
    assert (ckpt / "heads" / "value.safetensors").exists()


@pytest.mark.slow
def test_ppo_stop_and_resume_gives_the_same_metrics_as_an_uninterrupted_run(
    tiny_model_dir, tmp_path
):
    cfg = _small_cfg(tiny_model_dir, max_steps=4, adaptive_kl=True, kl_target=0.1, kl_horizon=100)
    full, resumed, stopped, result = full_and_resumed(
        train_ppo, cfg, PROMPTS, tmp_path, stop_after=2, reward_fn=text_length
    )
    assert stopped.stopped and stopped.step == 2
    assert result.step == 4 and sorted(resumed) == [3, 4]
    for step in (3, 4):
        for key in (
            "objective/reward",
            "objective/kl",
            "objective/kl_coef",
            "loss/policy",
            "loss/value",
        ):
            assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-4, abs=1e-6), (
                step,
                key,
            )


@pytest.mark.slow
def test_ppo_rollouts_with_a_static_cache_give_the_same_run_as_the_dynamic_cache(
    tiny_model_dir, tmp_path
):
    """generation_cache "static" (the CUDA default, compiled there) samples the same tokens."""
    runs = {}
    for cache in ("dynamic", "static"):
        history = []
        train_ppo(
            _small_cfg(tiny_model_dir, max_steps=3, generation_cache=cache),
            PROMPTS,
            output_dir=tmp_path / cache,
            reward_fn=text_length,
            on_step=lambda step, m, h=history: h.append(m),
        )
        runs[cache] = [
            (m["objective/reward"], m["objective/kl"], m["loss/policy"]) for m in history
        ]
    assert len(runs["static"]) == 3 and runs["static"] == runs["dynamic"]


@pytest.mark.slow
def test_ppo_stops_cleanly_on_a_nan_reward_without_writing_a_checkpoint(tiny_model_dir, tmp_path):
    cfg = _small_cfg(tiny_model_dir, max_steps=2)
    with pytest.raises(NonFiniteLossError, match="reward is nan at step 1"):
        train_ppo(cfg, PROMPTS, output_dir=tmp_path, reward_fn=lambda p, c: float("nan"))
    assert not list(tmp_path.glob("step-*"))


@pytest.mark.slow
def test_ppo_with_a_trained_reward_model_runs_and_starts_the_value_from_it(
    tiny_model_dir, reward_checkpoint, tmp_path
):
    from safetensors.torch import load_file

    # a learning rate of ~0 leaves the value role where it started: the reward model's
    cfg = _small_cfg(tiny_model_dir, max_steps=1, learning_rate=1e-12, init_value_from_reward=True)
    history = []
    result = train_ppo(
        cfg,
        PROMPTS,
        output_dir=tmp_path,
        reward_model=reward_checkpoint,
        on_step=lambda s, m: history.append(m),
    )
    assert result.step == 1 and math.isfinite(history[0]["objective/reward"])
    value_head = load_file(str(result.checkpoint_dir / "heads" / "value.safetensors"))
    reward_head = load_file(str(reward_checkpoint / "heads" / "reward.safetensors"))
    torch.testing.assert_close(
        value_head["linear.weight"], reward_head["linear.weight"], atol=1e-6, rtol=0
    )
    value_lora = load_file(str(result.checkpoint_dir / "value" / "adapter_model.safetensors"))
    reward_lora = load_file(str(reward_checkpoint / "reward" / "adapter_model.safetensors"))
    assert sorted(value_lora) == sorted(reward_lora)
    for key in reward_lora:
        torch.testing.assert_close(value_lora[key], reward_lora[key], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_ppo_with_a_reward_model_on_another_base_loads_it_on_its_own(tiny_model_dir, tmp_path):
    from rlhf.modeling import build_tiny_model
    from rlhf.reward import RewardConfig, train_reward

    other = build_tiny_model(tmp_path / "other-base", hidden_size=32, num_heads=2, seed=1)
    rows = [{"prompt": f"Q{i}:", "chosen": " aeiou", "rejected": " xkcd"} for i in range(4)]
    rm_cfg = RewardConfig(
        model=str(other), batch_size=4, max_steps=2, lora_r=4, lora_alpha=8, max_seq_len=32,
        eval_fraction=0.0,
    )  # fmt: skip
    rm = train_reward(rm_cfg, rows, output_dir=tmp_path / "rm").checkpoint_dir

    cfg = _small_cfg(tiny_model_dir, max_steps=1)
    model, tok, device, _ = _load_policy(cfg)
    rewarder = Rewarder(cfg=cfg, model=model, tokenizer=tok, device=device, reward_model=rm)
    assert not rewarder.shares_base and "reward" not in model.peft_config
    history = []
    result = train_ppo(
        cfg,
        PROMPTS,
        output_dir=tmp_path / "ppo",
        reward_model=rm,
        on_step=lambda s, m: history.append(m),
    )
    assert result.step == 1 and math.isfinite(history[0]["objective/reward"])
    assert (result.checkpoint_dir / "heads" / "value.safetensors").exists()


@pytest.mark.slow
def test_ppo_started_from_an_init_adapter_takes_it_as_the_kl_reference(
    tiny_model_dir, init_adapter, tmp_path
):
    kls = {}
    for reference in ("auto", "base"):
        history = []
        train_ppo(
            _small_cfg(tiny_model_dir, init_adapter=init_adapter, reference=reference, max_steps=1),
            PROMPTS,
            output_dir=tmp_path / reference,
            reward_fn=text_length,
            on_step=lambda s, m, h=history: h.append(m),
        )
        kls[reference] = history[0]["objective/kl"]
    # step 1's policy is the init adapter: no KL to itself, a clear one to the base model
    assert abs(kls["auto"]) < 1e-5 and kls["base"] > 0.1, kls
