"""The RL parts PPO and GRPO share: KL estimators against hand-computed numbers, training
log-probs against the sampling distribution, and the reward inputs."""

import math

import pytest
import torch

from rlhf.data import encode_prompts
from rlhf.modeling import load_policy
from rlhf.ppo import PPOConfig
from rlhf.rl import kl_k1, kl_k2, kl_k3, response_logprobs
from rlhf.sampling import completion_mask_after_eos, eos_token_ids

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


# ------------------------------------------------------------------------------ model plumbing


def _policy(model_dir):
    cfg = PPOConfig(model=str(model_dir), max_seq_len=48, lora_r=4, lora_alpha=8)
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
