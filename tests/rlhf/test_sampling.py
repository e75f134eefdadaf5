import pytest
import torch

from rlhf.config import BaseConfig
from rlhf.modeling import add_lora, load_causal_lm, load_tokenizer
from rlhf.sampling import SampleConfig, completion_mask_after_eos, generate, merged_adapter, sample
from rlhf.sft import SFTConfig, train_sft

PROMPTS = [
    {"prompt": "What is the capital of France?"},
    {"prompt": "Say hello."},
    {"prompt": "Name a fruit."},
]


def _config(tiny_model_dir, **overrides):
    fields = dict(
        model=str(tiny_model_dir),
        num_completions=3,
        max_new_tokens=6,
        batch_size=2,
        max_seq_len=32,
        seed=1,
    )
    fields.update(overrides)
    return SampleConfig(**fields)


def test_completion_mask_stops_after_the_first_eos():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 2, 0, 0]])
    assert completion_mask_after_eos(ids, 2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_sampling_returns_k_completions_with_token_counts_and_is_seeded(tiny_model_dir):
    steps = []
    rows = sample(_config(tiny_model_dir), PROMPTS, on_step=lambda s, m: steps.append(s))
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in PROMPTS]
    assert steps == [1, 2]
    for row in rows:
        assert len(row["completions"]) == 3
        assert row["generation"]["temperature"] == 1.0 and row["generation"]["seed"] == 1
        for c in row["completions"]:
            assert 1 <= c["num_tokens"] <= 6
    texts = [c["text"] for r in rows for c in r["completions"]]
    assert len(set(texts)) > 1  # sampling, not one repeated string
    assert sample(_config(tiny_model_dir), PROMPTS) == rows
    assert sample(_config(tiny_model_dir, seed=2), PROMPTS) != rows


def test_sampling_carries_other_row_keys_through(tiny_model_dir):
    rows = sample(_config(tiny_model_dir, num_completions=1), [{"prompt": "Hi", "prompt_id": 42}])
    assert rows[0]["prompt_id"] == 42 and rows[0]["prompt"] == "Hi"


def test_greedy_sampling_gives_identical_completions(tiny_model_dir):
    rows = sample(_config(tiny_model_dir, temperature=0.0), PROMPTS[:1])
    texts = {c["text"] for c in rows[0]["completions"]}
    assert len(texts) == 1


def test_sampling_stops_when_asked(tiny_model_dir):
    done = []
    rows = sample(
        _config(tiny_model_dir, batch_size=1),
        PROMPTS,
        should_stop=lambda: len(done) >= 1,
        on_step=lambda s, m: done.append(s),
    )
    assert len(rows) == 1


@pytest.mark.slow
def test_sampling_from_a_checkpoint_uses_its_adapter(tiny_model_dir, tmp_path):
    rows = [{"prompt": "Say hello.", "completion": " Hello, how are you?"}]
    cfg = SFTConfig(
        model=str(tiny_model_dir),
        learning_rate=1e-2,
        batch_size=2,
        max_steps=40,
        max_seq_len=32,
        lora_dropout=0.0,
        eval_fraction=0.0,
    )
    result = train_sft(cfg, rows, output_dir=tmp_path)
    out = sample(
        _config(tiny_model_dir, temperature=0.0, max_new_tokens=24, num_completions=1),
        [{"prompt": "Say hello."}],
        checkpoint=tmp_path,
    )
    assert out[0]["completions"][0]["text"] == " Hello, how are you?"
    assert out[0]["generation"]["checkpoint"] == str(tmp_path)
    assert (
        out[0]["completions"][0]["num_tokens"]
        == len(load_tokenizer(tiny_model_dir)(" Hello, how are you?")["input_ids"]) + 1
    )
    assert result.step == 40


def test_merged_adapter_generates_like_the_unmerged_model_and_restores_the_base(tiny_model_dir):
    torch.manual_seed(0)
    model = load_causal_lm(tiny_model_dir, device="cpu", dtype=torch.float32)
    model = add_lora(
        model, BaseConfig(model=str(tiny_model_dir), lora_r=4, lora_alpha=8, lora_dropout=0.0)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    model.eval()
    tok = load_tokenizer(tiny_model_dir)
    tok.padding_side = "left"
    batch = tok(["Say hello.", "Name a fruit please"], return_tensors="pt", padding=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain, _ = generate(
        model,
        tok,
        batch.input_ids,
        batch.attention_mask,
        num_completions=2,
        temperature=0.0,
        max_new_tokens=8,
    )
    model.train()
    with merged_adapter(model):
        assert not model.training
        merged, mask = generate(
            model,
            tok,
            batch.input_ids,
            batch.attention_mask,
            num_completions=2,
            temperature=0.0,
            max_new_tokens=8,
        )
    assert model.training
    assert torch.equal(plain, merged) and mask.shape == merged.shape
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
