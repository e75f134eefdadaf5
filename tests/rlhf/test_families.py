"""Our log-probs equal the model's own logits for every common family, including those that
scale or soft-cap logits after the LM head (Granite's logits_scaling made them exactly 8x too
large through the fast LM-head path; Falcon-H1's lm_head_multiplier, MiniCPM3's scaling)."""

from __future__ import annotations

import pytest
import torch
import transformers

from rlhf.modeling import next_token_logits, token_logprobs

SMALL = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
# family -> (config class, what it needs beyond SMALL); post-processing set to non-trivial values
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
    "mistral": ("MistralConfig", {}),
    "gemma": ("GemmaConfig", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", {"head_dim": 8, "final_logit_softcapping": 5.0}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 8, "final_logit_softcapping": 5.0}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),
    "granite": ("GraniteConfig", {"logits_scaling": 8.0}),
    "gpt_neox": ("GPTNeoXConfig", {}),
    "olmo": ("OlmoConfig", {}),
    "olmo2": ("Olmo2Config", {}),
    "cohere": ("CohereConfig", {"logit_scale": 0.5}),
    "stablelm": ("StableLmConfig", {}),
    "minicpm3": (
        "MiniCPM3Config",
        {
            "num_key_value_heads": 4,
            "q_lora_rank": 16,
            "kv_lora_rank": 16,
            "qk_nope_head_dim": 8,
            "qk_rope_head_dim": 8,
            "v_head_dim": 8,
            "dim_model_base": 8,  # logits_scaling = hidden_size / dim_model_base = 4
        },
    ),
    "falcon_h1": (
        "FalconH1Config",
        {
            "lm_head_multiplier": 3.0,
            "mamba_d_ssm": 32,
            "mamba_n_heads": 4,
            "mamba_d_head": 8,
            "mamba_d_state": 8,
            "mamba_n_groups": 1,
            "mamba_chunk_size": 8,
        },
    ),
}


def _tiny(family: str):
    name, extra = FAMILIES[family]
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"this transformers has no {name}")
    torch.manual_seed(0)
    config = cls(**{**SMALL, **extra})
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _ours_and_reference(model):
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    select = torch.zeros(2, 6, dtype=torch.bool)
    select[:, 2:] = True  # the response positions
    with torch.no_grad():
        ours = next_token_logits(model, ids, mask, select)
        reference = model(input_ids=ids, attention_mask=mask).logits[:, :-1][select]
    targets = ids[:, 1:][select]
    return token_logprobs(ours, targets)[0], token_logprobs(reference, targets)[0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_log_probs_match_the_models_own_logits(family):
    ours, reference = _ours_and_reference(_tiny(family))
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_a_family_whose_post_processing_no_list_names_is_caught_by_the_probe(monkeypatch):
    # Granite with its config field hidden from the known list: only the probe can tell
    monkeypatch.setattr("rlhf.modeling._LOGIT_POSTPROCESSING", ())
    model = _tiny("granite")
    ours, reference = _ours_and_reference(model)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    assert model._rlhf_fast_head_matches is False
    # and a family without post-processing keeps the fast path (the LM head on the response
    # positions only)
    llama = _tiny("llama")
    _ours_and_reference(llama)
    assert llama._rlhf_fast_head_matches is True
