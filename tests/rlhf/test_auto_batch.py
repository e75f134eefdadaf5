"""batch_size "auto" (SFT and reward model): the pure micro-batch picker, the configs, and
the CPU fallback."""

import pytest

from rlhf.checkpoint import read_state
from rlhf.config import config_from_dict
from rlhf.errors import ConfigError
from rlhf.reward import RewardConfig, train_reward
from rlhf.sft import SFTConfig, activation_bytes_per_token, pick_micro_batch, train_sft

# A Qwen2.5-0.5B-shaped model in bf16 with a 32k vocabulary, 512 tokens per row.
SHAPE = dict(layers=24, hidden=896, intermediate=4864, vocab=32000, dtype_bytes=2)
GB = 10**9


def _row_bytes(checkpointing: bool) -> float:
    return 512 * activation_bytes_per_token(**SHAPE, checkpointing=checkpointing)


def test_the_estimate_without_checkpointing_is_the_sum_over_layers_plus_the_logits():
    # (18h + 6i) 16-bit elements per layer and token, 24 layers, then bf16 + fp32 logits + grad
    per_token = 24 * 2 * (18 * 896 + 6 * 4864) + 32000 * (2 + 8)
    assert activation_bytes_per_token(**SHAPE, checkpointing=False) == per_token
    # checkpointing keeps each layer's input plus one recomputed layer
    kept = 24 * 2 * 896 + 2 * (18 * 896 + 6 * 4864) + 32000 * (2 + 8)
    assert activation_bytes_per_token(**SHAPE, checkpointing=True) == kept


@pytest.mark.parametrize(("free_gb", "expected"), [(139, 64), (78, 32), (20, 8)])
def test_auto_batch_is_the_largest_power_of_two_that_fits_without_checkpointing(free_gb, expected):
    batch, checkpointing = pick_micro_batch(free_bytes=free_gb * GB, tokens_per_row=512, **SHAPE)
    assert (batch, checkpointing) == (expected, False)
    room = free_gb * GB * 0.8 - (1 << 30)
    assert batch * _row_bytes(False) <= room
    assert batch == 64 or 2 * batch * _row_bytes(False) > room  # the next power of two does not fit


def test_auto_batch_turns_on_checkpointing_only_when_8_rows_do_not_fit_without_it():
    batch, checkpointing = pick_micro_batch(free_bytes=6 * GB, tokens_per_row=512, **SHAPE)
    room = 6 * GB * 0.8 - (1 << 30)
    assert 8 * _row_bytes(False) > room  # 8 rows would not fit without checkpointing
    assert checkpointing and batch == 16
    assert batch * _row_bytes(True) <= room < 2 * batch * _row_bytes(True)


def test_auto_batch_keeps_checkpointing_asked_for_and_never_returns_zero_rows():
    assert pick_micro_batch(
        free_bytes=139 * GB, tokens_per_row=512, gradient_checkpointing=True, **SHAPE
    ) == (64, True)
    assert pick_micro_batch(free_bytes=GB // 2, tokens_per_row=512, **SHAPE)[0] == 1
    # short rows fit more of them
    short, _ = pick_micro_batch(free_bytes=20 * GB, tokens_per_row=128, **SHAPE)
    assert short == 32


def test_sft_config_accepts_auto_batch_and_rejects_other_words():
    cfg = config_from_dict("sft", {"model": "some/model", "batch_size": "auto"})
    assert cfg.batch_size == "auto"
    with pytest.raises(ConfigError, match="batch_size"):
        config_from_dict("sft", {"model": "some/model", "batch_size": "big"})
    assert config_from_dict("reward", {"model": "m", "batch_size": "auto"}).batch_size == "auto"
    with pytest.raises(ConfigError, match="batch_size"):
        config_from_dict("dpo", {"model": "some/model", "batch_size": "auto"})
    with pytest.raises(ConfigError, match='batch_size must be a positive integer or "auto"'):
        RewardConfig(model="m", batch_size="many").validate()


@pytest.mark.slow
def test_auto_batch_on_a_cpu_uses_8_rows_and_a_resumed_run_keeps_the_pick(
    tiny_model_dir, tmp_path, sft_rows
):
    cfg = SFTConfig(
        model=str(tiny_model_dir), batch_size="auto", max_steps=2, max_seq_len=48, device="cpu"
    )
    seen = []
    first = train_sft(
        cfg,
        sft_rows,
        output_dir=tmp_path,
        should_stop=lambda: len(seen) == 1,
        on_step=lambda s, m: seen.append(s),
    )
    assert first.stopped and first.step == 1
    assert read_state(first.checkpoint_dir)["config"]["batch_size"] == 8
    assert cfg.batch_size == "auto"  # the caller's config is left alone
    resumed = train_sft(cfg, sft_rows, output_dir=tmp_path, resume_from=tmp_path)
    assert resumed.step == 2
    assert read_state(resumed.checkpoint_dir)["config"]["batch_size"] == 8


@pytest.mark.slow
def test_reward_auto_batch_on_a_cpu_uses_8_prompts_and_a_resumed_run_keeps_the_pick(
    tiny_model_dir, tmp_path
):
    rows = [
        {
            "prompt": f"q{i}",
            "completions": [f"please {i}", f"no {i}", "x"],
            "ranking": [[0], [1, 2]],
        }
        for i in range(12)
    ]
    cfg = RewardConfig(
        model=str(tiny_model_dir), batch_size="auto", max_steps=2, max_seq_len=32, device="cpu"
    )
    seen = []
    first = train_reward(
        cfg,
        rows,
        output_dir=tmp_path,
        should_stop=lambda: len(seen) == 1,
        on_step=lambda s, m: seen.append(m),
    )
    assert first.stopped and first.step == 1
    assert read_state(first.checkpoint_dir)["config"]["batch_size"] == 8
    resumed = train_reward(cfg, rows, output_dir=tmp_path, resume_from=tmp_path)
    assert resumed.step == 2
    assert read_state(resumed.checkpoint_dir)["config"]["batch_size"] == 8
