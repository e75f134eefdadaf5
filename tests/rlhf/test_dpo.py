"""DPO: the loss against hand-computed values, and training on the tiny model."""

from __future__ import annotations

import math
import random

import pytest
import torch

from rlhf.checkpoint import read_state
from rlhf.dpo import DPOConfig, dpo_loss, preference_pairs, sequence_logps, train_dpo
from rlhf.reward import preference_rows
from tests.rlhf.resume import full_and_resumed


def test_dpo_loss_matches_a_hand_computed_value():
    # chosen log-ratio +0.5, rejected -0.5: logits = 0.1 * 1.0; loss = log(1 + e^-0.1)
    loss, chosen, rejected = dpo_loss(
        torch.tensor([-1.0]),
        torch.tensor([-2.0]),
        torch.tensor([-1.5]),
        torch.tensor([-1.5]),
        beta=0.1,
    )
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.1)), rel=1e-6)
    assert loss.item() == pytest.approx(0.6443966600735709, rel=1e-6)
    assert chosen.item() == pytest.approx(0.05) and rejected.item() == pytest.approx(-0.05)


def test_dpo_loss_is_log_2_when_the_policy_equals_the_reference():
    logps = torch.tensor([-3.0, -7.0])
    loss, chosen, rejected = dpo_loss(logps, logps.flip(0), logps, logps.flip(0), beta=0.5)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert torch.equal(chosen, torch.zeros(2)) and torch.equal(rejected, torch.zeros(2))


def test_dpo_loss_averages_over_the_batch():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0])
    ref = torch.tensor([-1.5, -1.5])
    loss, _, _ = dpo_loss(pc, pr, ref, ref, beta=1.0)
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_label_smoothing_mixes_in_the_flipped_preference():
    loss, _, _ = dpo_loss(
        torch.tensor([-1.0]),
        torch.tensor([-2.0]),
        torch.tensor([-1.5]),
        torch.tensor([-1.5]),
        beta=0.1,
        label_smoothing=0.1,
    )
    expected = 0.9 * math.log1p(math.exp(-0.1)) + 0.1 * math.log1p(math.exp(0.1))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dpo_loss_gradient_raises_chosen_and_lowers_rejected_log_probs():
    pc = torch.tensor([-1.0], requires_grad=True)
    pr = torch.tensor([-1.0], requires_grad=True)
    loss, _, _ = dpo_loss(pc, pr, torch.tensor([-1.0]), torch.tensor([-1.0]), beta=0.1)
    loss.backward()
    assert pc.grad.item() < 0 < pr.grad.item()


def test_ranking_rows_expand_to_every_pair_of_different_tiers():
    rows = preference_rows(
        [
            {"prompt": "p", "completions": ["a", "b", "c"], "ranking": [[1], [0, 2]]},
            {"prompt": "q", "chosen": "yes", "rejected": "no"},
        ]
    )
    assert preference_pairs(rows, [0, 3]) == [(1, 0), (1, 2), (3, 4)]


def test_sequence_logps_equal_a_full_log_softmax_over_completion_tokens(tiny_model_dir):
    from rlhf.config import BaseConfig
    from rlhf.data import encode_prompt_completion, pad_sequences
    from rlhf.modeling import load_policy

    model, tok, _, _ = load_policy(BaseConfig(model=str(tiny_model_dir), device="cpu"))
    model.eval()
    encoded = [
        encode_prompt_completion(tok, p, c, max_seq_len=64)
        for p, c in [
            ("Question: sea?", " yes, blue"),
            ("Why?", " because the small model learns it"),
        ]
    ]
    ids, mask = pad_sequences([e for e, _ in encoded], tok.pad_token_id)
    plens = torch.tensor([p for _, p in encoded])
    with torch.no_grad():
        got = sequence_logps(model, ids, mask, plens)
        logp = model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
    expected = [
        sum(logp[b, t - 1, ids[b, t]].item() for t in range(plens[b], int(mask[b].sum())))
        for b in range(2)
    ]
    assert got.tolist() == pytest.approx(expected, rel=1e-5)


WORDS = "apples bananas cherries grapes sea blue wide waves model learn the small room".split()


def yes_no_rows(n: int, seed: int) -> list[dict]:
    """Preferred answers start with "yes", rejected ones with "no"; prompts and tails vary."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = "Question: " + " ".join(rng.choice(WORDS) for _ in range(3)) + "? Answer:"
        yes, no = " yes, " + rng.choice(WORDS), " no, " + rng.choice(WORDS)
        if i % 3 == 2:  # a ranking row: yes > (no = no again)
            rows.append(
                {
                    "prompt": prompt,
                    "completions": [no, yes, " no, " + rng.choice(WORDS)],
                    "ranking": [[1], [0, 2]],
                }
            )
        else:
            rows.append({"prompt": prompt, "chosen": yes, "rejected": no})
    return rows


def dpo_config(model_dir, **kw) -> DPOConfig:
    base = dict(
        model=str(model_dir),
        max_steps=12,
        batch_size=8,
        learning_rate=2e-3,
        max_seq_len=64,
        lora_dropout=0.0,
        eval_every=4,
    )
    return DPOConfig(**{**base, **kw})


@pytest.mark.slow
def test_dpo_raises_the_held_out_implicit_reward_margin(tiny_model_dir, tmp_path):
    steps = []
    result = train_dpo(
        dpo_config(tiny_model_dir),
        yes_no_rows(36, 0),
        output_dir=tmp_path,
        eval_data=yes_no_rows(12, 1),
        on_step=lambda s, m: steps.append(m),
    )
    assert len(steps) == 12
    for key in (
        "loss/dpo",
        "rewards/margin",
        "rewards/accuracy",
        "rewards/chosen",
        "perf/pairs_per_s",
    ):
        assert key in steps[0]
    assert steps[-1]["loss/dpo"] < 0.5 * math.log(2)  # it starts at log 2 (policy = reference)
    assert steps[-1]["eval/rewards_margin"] > 1.0  # held-out margin starts at exactly 0
    assert steps[-1]["eval/rewards_margin"] > steps[3]["eval/rewards_margin"] > 0
    assert steps[-1]["eval/rewards_accuracy"] >= 0.9
    assert read_state(result.checkpoint_dir)["kind"] == "dpo"


@pytest.mark.slow
def test_reference_log_probs_are_the_base_models_computed_once_before_training(
    tiny_model_dir, tmp_path
):
    from rlhf.checkpoint import load_training_state
    from rlhf.data import encode_prompt_completion, pad_sequences
    from rlhf.modeling import load_causal_lm, load_tokenizer

    train, held_out = yes_no_rows(6, 0), yes_no_rows(3, 1)
    result = train_dpo(
        dpo_config(tiny_model_dir, max_steps=3, batch_size=4),
        train,
        output_dir=tmp_path,
        eval_data=held_out,
    )
    saved = load_training_state(result.checkpoint_dir, restore_rng=False)["extra"]["ref_logps"]

    tok = load_tokenizer(tiny_model_dir)
    base = load_causal_lm(
        tiny_model_dir, device="cpu", dtype=torch.float32
    ).eval()  # no adapter at all
    rows = preference_rows(train) + preference_rows(held_out)
    encoded = [
        encode_prompt_completion(tok, r.prompt, c, max_seq_len=64)
        for r in rows
        for c in r.completions
    ]
    ids, mask = pad_sequences([e for e, _ in encoded], tok.pad_token_id)
    with torch.no_grad():
        logp = base(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
    expected = [
        sum(logp[b, t - 1, ids[b, t]].item() for t in range(p, len(e)))
        for b, (e, p) in enumerate(encoded)
    ]
    assert saved.tolist() == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_a_stopped_and_resumed_dpo_run_gives_the_same_metrics(tiny_model_dir, tmp_path):
    rows = yes_no_rows(18, 2)
    cfg = dpo_config(
        tiny_model_dir, max_steps=4, batch_size=4, lora_dropout=0.1, eval_every=0, eval_fraction=0.0
    )
    full, resumed, stopped, result = full_and_resumed(train_dpo, cfg, rows, tmp_path, stop_after=2)
    assert stopped.stopped and stopped.step == 2
    assert result.step == 4 and sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step]["loss/dpo"] == pytest.approx(
            full[step]["loss/dpo"], rel=1e-5, abs=1e-7
        )


@pytest.mark.slow
def test_with_an_init_adapter_the_reference_is_that_policy_also_after_a_resume(
    tiny_model_dir, tmp_path
):
    rows = yes_no_rows(12, 4)
    first = train_dpo(
        dpo_config(tiny_model_dir, max_steps=3, batch_size=4, eval_fraction=0.0),
        rows,
        output_dir=tmp_path / "first",
    )
    cfg = dpo_config(
        tiny_model_dir,
        max_steps=2,
        batch_size=4,
        eval_fraction=0.0,
        init_adapter=str(first.checkpoint_dir),
    )
    assert cfg.reference == "auto"
    steps = []
    second = train_dpo(
        cfg,
        rows,
        output_dir=tmp_path / "second",
        on_step=lambda s, m: steps.append(m),
        should_stop=lambda: len(steps) == 1,
    )
    # step 1 starts from the init adapter = the reference, so its implicit rewards are ~0
    assert abs(steps[0]["rewards/margin"]) < 1e-4
    from rlhf.checkpoint import load_training_state

    ref_before = load_training_state(second.checkpoint_dir, restore_rng=False)["extra"]["ref_logps"]
    (second.checkpoint_dir / "training_state.pt").unlink()  # force the resume to recompute π_ref
    resumed = train_dpo(
        cfg, rows, output_dir=tmp_path / "second", resume_from=second.checkpoint_dir
    )
    ref_after = load_training_state(resumed.checkpoint_dir, restore_rng=False)["extra"]["ref_logps"]
    torch.testing.assert_close(ref_after, ref_before, rtol=1e-5, atol=1e-5)


def test_disable_dropout_makes_a_training_mode_forward_deterministic(tiny_model_dir):
    from rlhf.config import disable_dropout
    from rlhf.modeling import load_policy

    model, tok, _, _ = load_policy(dpo_config(tiny_model_dir, lora_dropout=0.5))
    with torch.no_grad():  # a LoRA update that is not zero, so its dropout shows
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    attention = [m for m in model.modules() if hasattr(m, "attention_dropout")]
    assert attention
    for m in attention:  # as a model config with attention dropout would set it
        m.attention_dropout = 0.3
    ids = tok(["Question: sea blue? Answer: yes"], return_tensors="pt")["input_ids"]
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
        disable_dropout(model)
        assert model.training
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert all(m.attention_dropout == 0.0 for m in attention)


@pytest.mark.slow
@pytest.mark.parametrize("disable", [True, False])
def test_dpo_trains_with_dropout_off_by_default_so_step_one_matches_the_reference(
    disable, tiny_model_dir, tmp_path
):
    rows = yes_no_rows(12, 4)
    # an init adapter saved with LoRA dropout 0.5 (and its policy away from zero)
    first = train_dpo(
        dpo_config(tiny_model_dir, max_steps=3, batch_size=4, eval_fraction=0.0, lora_dropout=0.5),
        rows,
        output_dir=tmp_path / "first",
    )
    cfg = dpo_config(
        tiny_model_dir,
        max_steps=1,
        batch_size=8,
        eval_fraction=0.0,
        init_adapter=str(first.checkpoint_dir),
        reference="init",
        disable_dropout=disable,
    )
    assert DPOConfig(model="m").disable_dropout  # the default
    steps = []
    train_dpo(cfg, rows, output_dir=tmp_path / "second", on_step=lambda s, m: steps.append(m))
    # step 1's policy is the reference: its implicit rewards are 0 unless dropout perturbs it
    drift = abs(steps[0]["rewards/chosen"]) + abs(steps[0]["rewards/rejected"])
    if disable:
        assert drift < 1e-5
    else:
        assert drift > 1e-3


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"beta": 0.0}, "beta"),
        ({"label_smoothing": 0.5}, "label_smoothing"),
        ({"reference": "init"}, "init_adapter"),
        ({"reference": "sft"}, "reference"),
    ],
)
def test_dpo_config_rejects_values_out_of_range(fields, message):
    from rlhf.config import config_from_dict
    from rlhf.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        config_from_dict("dpo", {"model": "some/model", **fields})


def test_dpo_config_defaults_follow_the_paper():
    from rlhf.config import config_from_dict

    cfg = config_from_dict("dpo", {"model": "some/model"})
    assert cfg.beta == 0.1 and cfg.label_smoothing == 0.0 and cfg.reference == "auto"


@pytest.mark.slow
def test_a_cancel_during_the_reference_pass_stops_it_within_a_batch(
    tiny_model_dir, tmp_path, monkeypatch
):
    """The reference log-probs take a forward pass over the whole data set before step 1: a
    cancel there stops it at the next batch instead of after the pass."""
    import rlhf.dpo

    batches = []
    real = rlhf.dpo.sequence_logps

    def counted(*args, **kwargs):
        batches.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(rlhf.dpo, "sequence_logps", counted)
    result = train_dpo(
        dpo_config(tiny_model_dir, eval_batch_size=1, eval_fraction=0.0),
        yes_no_rows(6, 0),
        output_dir=tmp_path,
        should_stop=lambda: len(batches) >= 2,
    )
    assert result.stopped and result.step == 0 and result.checkpoint_dir is None
    assert len(batches) == 2  # of 12 sequences, one per batch
