"""The RL parts PPO and GRPO share: KL estimators against hand-computed numbers, training
log-probs against the sampling distribution, and the reward inputs."""

import math

import pytest
import torch

from rlhf.config import config_to_dict
from rlhf.data import encode_prompts
from rlhf.modeling import load_policy
from rlhf.reward import RewardScorer
from rlhf.rl import (
    Rewarder,
    RLConfig,
    kl_k1,
    kl_k2,
    kl_k3,
    loss_mask,
    penalise_missing_eos,
    response_logprobs,
    reward_input_ids,
    score_token_ids,
)
from rlhf.sampling import completion_mask_after_eos, eos_token_ids
from tests.rlhf.resume import full_and_resumed

# ------------------------------------------------------------------------------ pure helpers


def test_kl_estimators_match_hand_values():
    logp = torch.log(torch.tensor([0.5]))
    ref = torch.log(torch.tensor([0.25]))
    # k1 = log(0.5/0.25) = log 2; k2 = ½ log²2; k3 = r - 1 - log r with r = 0.25/0.5
    torch.testing.assert_close(kl_k1(logp, ref), torch.tensor([math.log(2)]))
    torch.testing.assert_close(kl_k2(logp, ref), torch.tensor([0.5 * math.log(2) ** 2]))
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([0.5 - 1 + math.log(2)]))


def test_k1_and_k3_average_to_the_true_kl_over_samples_from_the_policy():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    true_kl = float((p * (p / q).log()).sum())
    samples = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, logq = p.log()[samples], q.log()[samples]
    assert float(kl_k1(logp, logq).mean()) == pytest.approx(true_kl, abs=0.01)
    assert float(kl_k3(logp, logq).mean()) == pytest.approx(true_kl, abs=0.01)
    assert bool((kl_k3(logp, logq) >= 0).all())


def test_the_missing_eos_penalty_lowers_only_the_responses_without_an_eos():
    scores = torch.tensor([1.0, 0.5, -1.0])
    ended = torch.tensor([True, False, False])
    torch.testing.assert_close(
        penalise_missing_eos(scores, ended, 2.0), torch.tensor([1.0, -1.5, -3.0])
    )
    assert penalise_missing_eos(scores, ended, None) is scores


def test_the_loss_mask_drops_the_rows_of_truncated_responses_only_when_asked():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    ended = torch.tensor([True, False])
    assert loss_mask(mask, ended, mask_truncated=False) is mask
    assert loss_mask(mask, ended, mask_truncated=True).tolist() == [[1, 1, 0], [0, 0, 0]]


# ------------------------------------------------------------------------------ model plumbing


def _policy(model_dir):
    cfg = RLConfig(model=str(model_dir), max_seq_len=48, lora_r=4, lora_alpha=8)
    model, tok, device, _ = load_policy(cfg)
    model.eval()  # as the RL runs: no dropout
    g = torch.Generator().manual_seed(0)  # a policy adapter that is not the identity
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B.policy." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model, tok, device


def test_training_logprobs_match_the_sampling_distribution_with_left_padding(tiny_model_dir):
    model, tok, device = _policy(tiny_model_dir)
    prompts = ["hi", "What is the capital of France? Please answer in one word.", "Name a fruit."]
    query, qmask = encode_prompts(tok, prompts, max_len=40, chat_template=False, device=device)
    assert qmask[0, 0] == 0 and qmask[1].all()  # left padding
    torch.manual_seed(0)
    out = model.generate(
        input_ids=query,
        attention_mask=qmask,
        do_sample=True,
        temperature=0.7,
        top_k=0,
        top_p=1.0,
        max_new_tokens=6,
        pad_token_id=tok.pad_token_id,
        eos_token_id=eos_token_ids(tok, model),
        output_logits=True,
        return_dict_in_generate=True,
    )
    resp = out.sequences[:, query.shape[1] :]
    rmask = completion_mask_after_eos(resp, eos_token_ids(tok, model))
    sampled = (
        torch.log_softmax(torch.stack(out.logits, 1).float() / 0.7, -1)
        .gather(-1, resp.unsqueeze(-1))
        .squeeze(-1)
    )
    with torch.no_grad():
        logp, entropy = response_logprobs(
            model,
            torch.cat([query, resp], 1),
            torch.cat([qmask, rmask], 1),
            resp.shape[1],
            temperature=0.7,
            with_entropy=True,
        )
    torch.testing.assert_close(logp * rmask, sampled * rmask, atol=1e-4, rtol=0)
    assert bool((entropy > 0).all())


# ------------------------------------------------------------------------------ reward inputs


@pytest.fixture(scope="module")
def reward_checkpoint(tiny_model_dir, tmp_path_factory):
    """A reward model on the tiny base, trained for a few steps (vowel-rich text preferred)."""
    from rlhf.reward import RewardConfig, train_reward

    rows = [
        {
            "prompt": f"Question {i}:",
            "chosen": " aeiou aia eo" * (1 + i % 2),
            "rejected": " xkcd brr pst" * (1 + i % 3),
        }
        for i in range(8)
    ]
    cfg = RewardConfig(
        model=str(tiny_model_dir),
        batch_size=4,
        max_steps=5,
        lora_r=4,
        lora_alpha=8,
        learning_rate=1e-3,
        max_seq_len=48,
        eval_fraction=0.0,
    )
    return train_reward(cfg, rows, output_dir=tmp_path_factory.mktemp("rm")).checkpoint_dir


def _rewarder_in_the_policy_model(model_dir, reward_checkpoint):
    cfg = RLConfig(model=str(model_dir), max_seq_len=48, lora_r=4, lora_alpha=8)
    model, tok, device = _policy(model_dir)
    rewarder = Rewarder(
        cfg=cfg, model=model, tokenizer=tok, device=device, reward_model=reward_checkpoint
    )
    return rewarder, model, tok


@pytest.mark.slow
def test_a_reward_model_on_the_same_base_is_loaded_into_the_policy_model(
    tiny_model_dir, reward_checkpoint
):
    rewarder, model, tok = _rewarder_in_the_policy_model(tiny_model_dir, reward_checkpoint)
    assert rewarder.shares_base and "reward" in model.peft_config  # one copy of the base weights
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".reward." in n)
    prompts, completions = ["Question 1:", "Question 2:"], [" aeiou", " xkcd"]
    standalone = RewardScorer.from_checkpoint(reward_checkpoint, device="cpu")
    torch.testing.assert_close(
        rewarder(prompts, completions), standalone(prompts, completions).cpu(), atol=1e-5, rtol=1e-5
    )


@pytest.mark.slow
def test_a_reward_model_with_the_policys_tokenizer_reads_the_eos_only_where_it_was_generated(
    tiny_model_dir, reward_checkpoint
):
    rewarder, model, tok = _rewarder_in_the_policy_model(tiny_model_dir, reward_checkpoint)
    assert rewarder.reads == "ids"
    prompts, completions = ["Question 1:", "Question 2:"], [" aeiou aia", " xkcd brr"]
    ids = [tok(c, add_special_tokens=False)["input_ids"] for c in completions]
    eos = tok.eos_token_id
    # the first response ended (its EOS was generated), the second was cut at the length cap
    scores = rewarder(prompts, completions, responses=[ids[0] + [eos], ids[1]], ended=[True, False])
    as_text = RewardScorer.from_checkpoint(reward_checkpoint, device="cpu")(prompts, completions)
    # an ended response scores as its text does (the reward model's training appends EOS) ...
    assert float(scores[0]) == pytest.approx(float(as_text[0]), abs=1e-5)
    # ... a cut one is read without the EOS it never wrote, not as a finished answer
    cut = reward_input_ids(tok, prompts[1], ids[1], max_seq_len=48, chat_template=False)
    assert cut[-1] != eos
    assert float(scores[1]) == pytest.approx(
        float(score_token_ids(rewarder.scorer, [cut])), abs=1e-5
    )
    assert abs(float(scores[1]) - float(as_text[1])) > 1e-3
    # without the generated ids (a caller that has only text) the text is scored as before
    torch.testing.assert_close(rewarder(prompts, completions), as_text, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ the KL reference


def length_reward(prompt: str, completion: str) -> float:
    return len(completion) / 16


@pytest.fixture
def init_adapter(tiny_model_dir, tmp_path):
    """An SFT-like policy adapter (random, far from the base model) saved as a PEFT folder."""
    model, _, _ = _policy(tiny_model_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.policy." in name:
                p.normal_(std=0.2, generator=torch.Generator().manual_seed(1))
    model.save_pretrained(tmp_path / "init", selected_adapters=["policy"])
    return str(tmp_path / "init")


@pytest.mark.slow
def test_started_from_an_init_adapter_the_reference_is_that_policy_also_after_a_resume(
    tiny_model_dir, init_adapter, tmp_path
):
    from rlhf.grpo import GRPOConfig, train_grpo

    cfg = GRPOConfig(
        model=str(tiny_model_dir),
        init_adapter=init_adapter,
        batch_size=2,
        num_generations=2,
        max_new_tokens=6,
        max_seq_len=48,
        learning_rate=5e-2,
        max_steps=3,
        save_every=1,
    )
    assert cfg.reference == "auto"
    prompts = [{"prompt": f"Question {i}: tell me something."} for i in range(4)]
    full, resumed, _, _ = full_and_resumed(
        train_grpo, cfg, prompts, tmp_path / "runs", stop_after=1, reward_fn=length_reward
    )
    # step 1: the policy is the init adapter, so its log-probs equal the reference's: KL 0
    assert abs(full[1]["objective/kl"]) < 1e-5 and full[1]["loss/kl"] < 1e-6
    assert full[3]["objective/kl"] > 1e-3  # the policy moved away from it
    # after the resume the reference is still the init policy, not the resumed one
    for step in (2, 3):
        assert resumed[step]["objective/kl"] == pytest.approx(full[step]["objective/kl"], rel=1e-4)
    base = GRPOConfig(**{**config_to_dict(cfg), "reference": "base", "max_steps": 1})
    on_base: dict[int, dict] = {}
    train_grpo(
        base,
        prompts,
        output_dir=tmp_path / "base",
        reward_fn=length_reward,
        on_step=on_base.__setitem__,
    )
    assert on_base[1]["objective/kl"] > 0.1  # the SFT policy's distance to the base model


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ppo", "grpo"])
def test_gradient_checkpointing_gives_the_same_rl_training_and_is_used(
    kind, tiny_model_dir, tmp_path
):
    from unittest import mock

    import torch.utils.checkpoint
    from safetensors.torch import load_file

    from rlhf.runner import run

    prompts = [{"prompt": f"Tell me about number {i}."} for i in range(4)]
    config = dict(
        model=str(tiny_model_dir),
        max_steps=2,
        batch_size=2,
        max_seq_len=40,
        max_new_tokens=6,
        lora_r=4,
        lora_alpha=8,
        learning_rate=1e-3,
        num_minibatches=1,
    )
    if kind == "grpo":
        config["num_generations"] = 2
    results = {}
    for on in (False, True):
        seen = {}
        real = torch.utils.checkpoint._checkpoint_without_reentrant_generator
        with mock.patch.object(
            torch.utils.checkpoint, "_checkpoint_without_reentrant_generator", wraps=real
        ) as spy:
            result = run(
                kind,
                {**config, "gradient_checkpointing": on},
                prompts,
                output_dir=tmp_path / str(on),
                on_step=seen.__setitem__,
                reward_fn=lambda p, c: len(set(c)) / 10.0,
            )
        results[on] = (
            seen,
            load_file(str(result.checkpoint_dir / "policy" / "adapter_model.safetensors")),
        )
        assert spy.called == on  # the decoder layers were recomputed, and only when asked
    (plain, plain_w), (ckpt, ckpt_w) = results[False], results[True]
    for step in plain:
        for key, value in plain[step].items():
            if not key.startswith("perf/"):
                assert ckpt[step][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for key in plain_w:
        torch.testing.assert_close(ckpt_w[key], plain_w[key], rtol=1e-5, atol=1e-7)
