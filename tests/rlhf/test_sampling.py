import pytest
import torch

from rlhf.config import BaseConfig
from rlhf.errors import ConfigError
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
    # the run folder stands for its latest checkpoint, which is what is recorded
    assert out[0]["generation"]["checkpoint"] == str(result.checkpoint_dir)
    assert (
        out[0]["completions"][0]["num_tokens"]
        == len(load_tokenizer(tiny_model_dir)(" Hello, how are you?")["input_ids"]) + 1
    )
    assert result.step == 40


def _adapted_tiny_model(tiny_model_dir):
    """The tiny model with a LoRA adapter of random (non-zero) weights, in eval mode, and
    a left-padded batch of two prompts."""
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
    return model, tok, batch


def _greedy(model, tok, batch, **kw):
    return generate(
        model,
        tok,
        batch.input_ids,
        batch.attention_mask,
        num_completions=2,
        temperature=0.0,
        max_new_tokens=10,
        eos_ids=[],  # all 10 tokens, so every decoding step is compared
        **kw,
    )


def test_merged_adapter_generates_like_the_unmerged_model_and_restores_the_base(tiny_model_dir):
    model, tok, batch = _adapted_tiny_model(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain, _ = _greedy(model, tok, batch)
    model.train()
    with merged_adapter(model):
        assert not model.training
        merged, mask = _greedy(model, tok, batch)
    assert model.training
    assert torch.equal(plain, merged) and mask.shape == merged.shape
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_static_cache_generates_the_same_tokens_as_the_dynamic_cache(tiny_model_dir):
    model, tok, batch = _adapted_tiny_model(tiny_model_dir)
    dynamic, _ = _greedy(model, tok, batch)
    with merged_adapter(model):
        static, mask = _greedy(model, tok, batch, cache="static", max_cache_len=64, compile=False)
    assert torch.equal(dynamic, static) and bool(mask.all())
    with pytest.raises(ConfigError, match="cache must be static or dynamic"):
        _greedy(model, tok, batch, cache="paged")


@pytest.mark.slow
def test_compiled_static_decoding_matches_eager_and_sees_weight_updates(tiny_model_dir):
    """The path rollouts take on CUDA (transformers compiles the decoding step of a static
    cache), forced on the CPU: the same tokens as eager decoding, and after the adapter
    changes (as between PPO steps) the compiled step sees the new merged weights."""
    model, tok, batch = _adapted_tiny_model(tiny_model_dir)
    for _ in range(2):
        with merged_adapter(model):
            eager, _ = _greedy(model, tok, batch)
            compiled, _ = _greedy(model, tok, batch, cache="static", max_cache_len=64, compile=True)
        assert torch.equal(eager, compiled)
        assert not getattr(model, "_rlhf_static_cache_failed", False)
        assert hasattr(model.get_base_model(), "_compiled_call")  # it did compile
        first = eager
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.add_(0.2)
    with merged_adapter(model):
        changed, _ = _greedy(model, tok, batch)
    assert not torch.equal(first, changed)  # the update did change what is generated


def test_a_failing_static_path_falls_back_to_the_dynamic_cache(tiny_model_dir, caplog):
    model, tok, batch = _adapted_tiny_model(tiny_model_dir)
    dynamic, _ = _greedy(model, tok, batch)
    real_generate = model.generate

    def no_static(**kw):  # a planted compile failure, after the prefill sampled a token
        if kw.get("cache_implementation") == "static":
            torch.rand(16)
            raise RuntimeError("planted: cannot compile")
        return real_generate(**kw)

    model.generate = no_static
    with caplog.at_level("WARNING", logger="rlhf.sampling"):
        out, _ = _greedy(model, tok, batch, cache="static")
    assert torch.equal(out, dynamic)
    assert "planted: cannot compile" in caplog.text and model._rlhf_static_cache_failed
    failures = len([r for r in caplog.records if r.exc_info])
    out, _ = _greedy(model, tok, batch, cache="static")  # no second attempt
    assert torch.equal(out, dynamic) and len([r for r in caplog.records if r.exc_info]) == failures

    # sampling: the retry draws what the failed attempt would have, from the same seed
    sample = dict(num_completions=2, temperature=1.0, max_new_tokens=10, eos_ids=[])
    model._rlhf_static_cache_failed = False
    torch.manual_seed(7)
    retried, _ = generate(
        model, tok, batch.input_ids, batch.attention_mask, cache="static", **sample
    )
    torch.manual_seed(7)
    plain, _ = generate(model, tok, batch.input_ids, batch.attention_mask, **sample)
    assert torch.equal(retried, plain)


def test_generation_cache_settings_are_checked_and_auto_is_static_only_on_cuda(tiny_model_dir):
    from rlhf.ppo import PPOConfig
    from rlhf.sampling import resolve_generation_cache

    with pytest.raises(ConfigError, match="generation_cache must be one of auto, static, dynamic"):
        _config(tiny_model_dir, generation_cache="paged").validate()
    with pytest.raises(ConfigError, match="generation_cache"):
        PPOConfig(model=str(tiny_model_dir), generation_cache="fast").validate()
    assert resolve_generation_cache("auto", "cuda") == "static"
    assert resolve_generation_cache("auto", "cpu") == "dynamic"
    assert resolve_generation_cache("static", "cpu") == "static"
    assert PPOConfig(model="m").generation_cache == "auto"
    assert _config(tiny_model_dir).generation_cache == "dynamic"


def test_sampling_with_a_static_cache_gives_the_dynamic_cache_completions(tiny_model_dir):
    greedy = dict(temperature=0.0, max_new_tokens=8)
    dynamic = sample(_config(tiny_model_dir, **greedy), PROMPTS)
    static = sample(_config(tiny_model_dir, generation_cache="static", **greedy), PROMPTS)
    assert [r["completions"] for r in static] == [r["completions"] for r in dynamic]
