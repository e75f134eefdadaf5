import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.config import BaseConfig
from rlhf.errors import ConfigError
from rlhf.modeling import (
    ScalarHead,
    add_lora,
    build_tiny_model,
    last_token_index,
    load_causal_lm,
    load_tokenizer,
    pick_device_dtype,
)


def test_tiny_model_loads_through_from_pretrained(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|eos|>" and tok.bos_token == "<|bos|>"
    assert model.config.vocab_size == len(tok)
    assert sum(p.numel() for p in model.parameters()) < 200_000
    ids = tok("The quick brown fox", return_tensors="pt")
    assert model(**ids).logits.shape == (1, ids.input_ids.shape[1], len(tok))
    assert tok.decode(ids.input_ids[0]) == "The quick brown fox"
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|user|>\nhi<|eos|>\n<|assistant|>\n"


def test_tiny_model_is_cached_by_its_arguments(tiny_model_dir, tmp_path):
    mtime = (tiny_model_dir / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert build_tiny_model(tiny_model_dir) == tiny_model_dir
    assert time.perf_counter() - t0 < 0.1
    assert (tiny_model_dir / "model.safetensors").stat().st_mtime_ns == mtime
    # other arguments rebuild; the same seed gives the same weights
    other = build_tiny_model(tmp_path / "m", hidden_size=32, num_heads=2)
    assert AutoModelForCausalLM.from_pretrained(other).config.hidden_size == 32
    again = build_tiny_model(tmp_path / "m2", hidden_size=32, num_heads=2)
    w1 = AutoModelForCausalLM.from_pretrained(other).state_dict()
    w2 = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_pick_device_dtype_uses_fp32_on_cpu():
    assert pick_device_dtype("cpu", "auto") == (torch.device("cpu"), torch.float32)
    assert pick_device_dtype("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ConfigError):
        pick_device_dtype("cpu", "int3")


def test_last_token_index_finds_the_last_real_token():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1]])
    assert last_token_index(mask).tolist() == [1, 3, 3]


def test_scalar_head_maps_hidden_states_to_one_value_per_token():
    head = ScalarHead(8)
    assert head(torch.randn(2, 5, 8)).shape == (2, 5)
    assert head(torch.randn(2, 5, 8, dtype=torch.bfloat16)).dtype == torch.float32


def test_two_named_adapters_share_one_base(tiny_model_dir):
    cfg = BaseConfig(model=str(tiny_model_dir), lora_r=4, lora_alpha=8)
    model = load_causal_lm(tiny_model_dir, device="cpu", dtype=torch.float32)
    n_base = sum(p.numel() for p in model.parameters())
    model = add_lora(model, cfg, adapter_name="policy")
    model = add_lora(model, cfg, adapter_name="value")
    assert set(model.peft_config) == {"policy", "value"}
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) == n_base
    assert load_tokenizer(tiny_model_dir).padding_side == "right"
