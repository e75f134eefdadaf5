import importlib
import math
import threading

import pytest
import torch

from rlhf.checkpoint import latest_checkpoint
from rlhf.config import config_to_dict
from rlhf.data import SFTCollator
from rlhf.errors import NonFiniteLossError, OutOfMemoryError
from rlhf.loop import (
    batch_indices,
    check_finite,
    data_hash,
    epoch_order,
    make_optimizer,
    oom_guard,
    seed_everything,
    warmup_cosine,
    warmup_cosine_factor,
)
from rlhf.runner import run
from rlhf.sft import SFTConfig, completion_loss, split_eval


def test_warmup_cosine_factor_matches_hand_computed_values():
    # 2 warm-up steps, 6 in total: 0, 0.5, then cosine over 4 steps
    expected = [
        0.0,
        0.5,
        1.0,
        0.5 * (1 + math.cos(math.pi / 4)),
        0.5,
        0.5 * (1 + math.cos(3 * math.pi / 4)),
        0.0,
    ]
    got = [warmup_cosine_factor(s, 2, 6) for s in range(7)]
    assert got == pytest.approx(expected)


def test_warmup_cosine_scheduler_drives_the_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = make_optimizer([p], SFTConfig(model="m", learning_rate=0.1))
    sched = warmup_cosine(opt, 2, 6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1 * warmup_cosine_factor(s, 2, 6) for s in range(6)])


def test_check_finite_names_the_step_and_what_to_change():
    assert check_finite(torch.tensor(1.5), 3) == 1.5
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 12; lower learning_rate"):
        check_finite(torch.tensor(float("nan")), 12)
    with pytest.raises(NonFiniteLossError, match="loss is inf at step 2"):
        check_finite(float("inf"), 2)


def test_oom_guard_names_what_to_reduce():
    with pytest.raises(OutOfMemoryError, match="reduce batch_size or max_new_tokens"):
        with oom_guard("batch_size or max_new_tokens"):
            raise torch.OutOfMemoryError("CUDA out of memory")


def test_data_hash_is_stable_and_sees_order_and_content():
    rows = [{"prompt": "a", "completion": "b"}, {"completion": "d", "prompt": "c"}]
    assert data_hash(rows) == data_hash([dict(r) for r in rows])
    assert data_hash(rows) != data_hash(rows[::-1])
    assert data_hash(rows) != data_hash([rows[0], {"prompt": "c", "completion": "e"}])
    assert data_hash(rows).startswith("sha256:")


def test_batch_indices_walk_seeded_epochs_without_gaps():
    stream = batch_indices(5, seed=3, start=0, count=15)
    assert stream[:5] == epoch_order(5, seed=3, epoch=0)
    assert sorted(stream[5:10]) == list(range(5))
    assert batch_indices(5, seed=3, start=4, count=7) == stream[4:11]
    assert epoch_order(10, seed=3, epoch=0) != epoch_order(10, seed=3, epoch=1)
    assert epoch_order(10, seed=3, epoch=0) != epoch_order(10, seed=4, epoch=0)


def test_completion_loss_averages_only_labelled_tokens():
    seed_everything(0)
    logits = torch.randn(1, 4, 7)
    labels = torch.tensor([[-100, 3, 5, -100]])
    total, n = completion_loss(logits, labels)
    # position t predicts label t+1: logits[0] -> 3, logits[1] -> 5
    expected = -(torch.log_softmax(logits[0, 0], -1)[3] + torch.log_softmax(logits[0, 1], -1)[5])
    assert n == 2
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_split_eval_holds_out_a_seeded_fraction():
    train, held = split_eval(20, fraction=0.1, seed=0)
    assert len(held) == 2 and len(train) == 18 and set(train).isdisjoint(held)
    assert split_eval(20, fraction=0.1, seed=0) == (train, held)
    assert split_eval(1, fraction=0.5, seed=0) == ([0], [])
    assert split_eval(3, fraction=0.01, seed=0)[1] != []


# ---------------------------------------------------------------------------- stop while loading

PREFERENCES = [
    {"prompt": f"Question {i}?", "chosen": f" A helpful answer {i}.", "rejected": " No."}
    for i in range(4)
]
PROMPTS = [{"prompt": f"Say something about {w}."} for w in ("cats", "rain", "tea", "maps")]
STOP_CASES = {  # kind: (the load to cancel during, its config, its rows, run() extras)
    "sft": ("rlhf.sft.load_policy", {}, "sft_rows", {}),
    "reward": ("rlhf.reward.build_reward_model", {}, PREFERENCES, {}),
    "dpo": ("rlhf.dpo.load_policy", {}, PREFERENCES, {}),
    "ppo": (
        "rlhf.rl.load_policy",
        {"batch_size": 4, "num_minibatches": 2, "max_new_tokens": 8},
        PROMPTS,
        {"reward_fn": lambda prompt, completion: float(len(completion))},
    ),
    "grpo": (
        "rlhf.rl.load_policy",
        {"batch_size": 2, "num_generations": 2, "max_new_tokens": 8},
        PROMPTS,
        {"reward_fn": lambda prompt, completion: float(len(completion))},
    ),
}


def _cancelled_during(monkeypatch, target: str, cancel: threading.Event) -> None:
    """Replace ``target`` (a model load) by the real load followed by a cancel: what a user's
    cancel looks like to the engine when it arrives while the model loads."""
    module, _, name = target.rpartition(".")
    real = getattr(importlib.import_module(module), name)

    def load_then_cancel(*args, **kwargs):
        loaded = real(*args, **kwargs)
        cancel.set()
        return loaded

    monkeypatch.setattr(target, load_then_cancel)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(STOP_CASES))
def test_a_cancel_while_the_model_loads_stops_before_any_training_work(
    kind, tiny_model_dir, tmp_path, monkeypatch, request
):
    target, overrides, rows, extras = STOP_CASES[kind]
    rows = request.getfixturevalue(rows) if isinstance(rows, str) else rows
    cancel = threading.Event()
    _cancelled_during(monkeypatch, target, cancel)
    engine = importlib.import_module(f"rlhf.{kind}")

    def no_optimizer(*args, **kwargs):
        raise AssertionError("the run went on to build its optimizer after the cancel")

    monkeypatch.setattr(engine, "optimizer_and_schedule", no_optimizer)
    steps = []
    config = {"model": str(tiny_model_dir), "max_steps": 2, "max_seq_len": 48, **overrides}
    result = run(
        kind,
        config,
        rows,
        output_dir=tmp_path / "run",
        on_step=lambda step, metrics: steps.append(step),
        should_stop=cancel.is_set,
        **extras,
    )
    assert cancel.is_set() and result.stopped and result.step == 0 and steps == []
    assert result.checkpoint_dir is None and latest_checkpoint(tmp_path / "run") is None


@pytest.mark.slow
def test_a_cancel_while_the_data_are_tokenized_stops_within_a_row(
    tiny_model_dir, tmp_path, monkeypatch
):
    rows = [{"prompt": f"Prompt {i}?", "completion": f" Answer {i}."} for i in range(50)]
    encoded = []
    real_encode = SFTCollator.encode

    def encode_then_cancel(self, row):
        encoded.append(row)
        return real_encode(self, row)

    monkeypatch.setattr(SFTCollator, "encode", encode_then_cancel)
    cfg = SFTConfig(model=str(tiny_model_dir), max_steps=2, max_seq_len=48, eval_fraction=0.0)
    result = run("sft", cfg, rows, output_dir=tmp_path, should_stop=lambda: len(encoded) >= 3)
    assert result.stopped and result.step == 0 and len(encoded) == 3


@pytest.mark.slow
def test_a_resumed_run_cancelled_while_loading_returns_its_checkpoint_and_writes_nothing(
    tiny_model_dir, tmp_path, monkeypatch, sft_rows
):
    cfg = SFTConfig(
        model=str(tiny_model_dir), max_steps=2, batch_size=2, max_seq_len=48, eval_fraction=0.0
    )
    first = run("sft", cfg, sft_rows, output_dir=tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    cancel = threading.Event()
    _cancelled_during(monkeypatch, "rlhf.sft.load_policy", cancel)
    longer = SFTConfig(**{**config_to_dict(cfg), "max_steps": 4})
    result = run(
        "sft",
        longer,
        sft_rows,
        output_dir=tmp_path,
        resume_from=tmp_path,
        should_stop=cancel.is_set,
    )
    assert result.stopped and result.step == 2 and result.checkpoint_dir == first.checkpoint_dir
    assert result.metrics == first.metrics
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing re-saved
