import hashlib

import pytest
import torch
from peft import PeftModel

from rlhf.checkpoint import latest_checkpoint, list_checkpoints, read_state
from rlhf.errors import NonFiniteLossError
from rlhf.modeling import load_causal_lm, load_tokenizer
from rlhf.sft import SFTConfig, train_sft

pytestmark = pytest.mark.slow


def _config(tiny_model_dir, **overrides):
    fields = dict(
        model=str(tiny_model_dir),
        learning_rate=1e-2,
        batch_size=2,
        max_steps=12,
        max_seq_len=48,
        warmup_ratio=0.1,
        lora_r=8,
        lora_alpha=16,
        eval_fraction=0.0,
    )
    fields.update(overrides)
    return SFTConfig(**fields)


def _greedy(model_dir, ckpt, prompt, n=12):
    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, device="cpu", dtype=torch.float32)
    if ckpt is not None:
        model = PeftModel.from_pretrained(model, str(ckpt / "policy"))
    ids = tok(prompt, return_tensors="pt")
    out = model.eval().generate(
        **ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id
    )
    return tok.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)


def test_sft_loss_falls_and_the_model_reproduces_a_memorised_completion(tiny_model_dir, tmp_path):
    rows = [
        {
            "prompt": "What is the capital of France?",
            "completion": " Paris is the capital of France.",
        }
    ]
    seen = []
    cfg = _config(tiny_model_dir, max_steps=40, lora_dropout=0.0)
    result = train_sft(cfg, rows, output_dir=tmp_path, on_step=lambda s, m: seen.append((s, m)))
    assert [s for s, _ in seen] == list(range(1, 41))
    losses = [m["loss/sft"] for _, m in seen]
    assert losses[-1] < 0.25 * losses[0]
    metrics = seen[-1][1]
    assert metrics["progress/total_steps"] == 40 and metrics["perf/tokens_per_s"] > 0
    assert {"optim/lr", "optim/grad_norm"} <= set(metrics)
    assert _greedy(tiny_model_dir, None, rows[0]["prompt"]) != rows[0]["completion"]
    assert (
        _greedy(tiny_model_dir, result.checkpoint_dir, rows[0]["prompt"]) == rows[0]["completion"]
    )
    state = read_state(result.checkpoint_dir)
    assert state["kind"] == "sft" and state["step"] == 40 and state["config"]["max_steps"] == 40
    assert state["lineage"]["base_model"] == str(tiny_model_dir) and state["lineage"][
        "data_hash"
    ].startswith("sha256:")


def test_sft_leaves_base_weights_frozen_while_the_adapter_changes(
    tiny_model_dir, tmp_path, sft_rows
):
    from safetensors.torch import load_file

    base_before = {
        k: v.clone()
        for k, v in load_causal_lm(tiny_model_dir, device="cpu", dtype=torch.float32)
        .state_dict()
        .items()
    }
    result = train_sft(_config(tiny_model_dir, max_steps=4), sft_rows, output_dir=tmp_path)
    adapter = load_file(str(result.checkpoint_dir / "policy" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # B starts at zero
    assert not any("embed" in k or "norm" in k for k in adapter)
    base_after = load_causal_lm(tiny_model_dir, device="cpu", dtype=torch.float32).state_dict()
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)


def test_sft_eval_loss_is_reported_on_held_out_rows(tiny_model_dir, tmp_path, sft_rows):
    seen = {}
    cfg = _config(tiny_model_dir, max_steps=4, eval_fraction=0.25, eval_every=2)
    result = train_sft(
        cfg, sft_rows, output_dir=tmp_path, on_step=lambda s, m: seen.__setitem__(s, m)
    )
    assert "eval/loss" in seen[2] and "eval/loss" in seen[4] and "eval/loss" not in seen[1]
    assert result.metrics["eval/loss"] == seen[4]["eval/loss"]


def test_grad_accumulation_matches_one_big_batch(tiny_model_dir, tmp_path, sft_rows):
    big, acc = [], []
    common = dict(max_steps=2, lora_dropout=0.0)
    train_sft(
        _config(tiny_model_dir, batch_size=4, **common),
        sft_rows,
        output_dir=tmp_path / "a",
        on_step=lambda s, m: big.append(m),
    )
    train_sft(
        _config(tiny_model_dir, batch_size=2, grad_accum_steps=2, **common),
        sft_rows,
        output_dir=tmp_path / "b",
        on_step=lambda s, m: acc.append(m),
    )
    for a, b in zip(big, acc, strict=True):
        assert a["loss/sft"] == pytest.approx(b["loss/sft"], rel=1e-5)
        assert a["optim/grad_norm"] == pytest.approx(b["optim/grad_norm"], rel=1e-4)


def test_stop_then_resume_gives_the_same_metrics_as_an_uninterrupted_run(
    tiny_model_dir, tmp_path, sft_rows
):
    cfg = _config(
        tiny_model_dir, max_steps=8, eval_fraction=0.25, lora_dropout=0.1
    )  # dropout exercises the RNG

    def losses(metrics):
        return {k: v for k, v in metrics.items() if k.startswith(("loss/", "eval/", "optim/"))}

    full = {}
    train_sft(
        cfg,
        sft_rows,
        output_dir=tmp_path / "full",
        on_step=lambda s, m: full.__setitem__(s, losses(m)),
    )

    part = {}
    stopped = train_sft(
        cfg,
        sft_rows,
        output_dir=tmp_path / "part",
        on_step=lambda s, m: part.__setitem__(s, losses(m)),
        should_stop=lambda: len(part) >= 3,
    )
    assert stopped.stopped and stopped.step == 3 and stopped.checkpoint_dir.name == "step-0000003"
    resumed = train_sft(
        cfg,
        sft_rows,
        output_dir=tmp_path / "part",
        on_step=lambda s, m: part.__setitem__(s, losses(m)),
        resume_from=tmp_path / "part",
    )
    assert not resumed.stopped and resumed.step == 8
    assert sorted(part) == list(range(1, 9))
    for step in range(1, 9):
        assert part[step] == full[step], step
    assert [p.name for p in list_checkpoints(tmp_path / "part")] == ["step-0000003", "step-0000008"]


def _digest(folder):
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tiny_model_dir, tmp_path, sft_rows, monkeypatch
):
    import rlhf.sft as sft

    real = sft.forward_completion_loss
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        total, n = real(model, batch)
        return (total * float("nan") if calls["n"] == 5 else total), n

    monkeypatch.setattr(sft, "forward_completion_loss", poisoned)
    cfg = _config(tiny_model_dir, max_steps=8, save_every=2)
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 5"):
        train_sft(cfg, sft_rows, output_dir=tmp_path)
    good = latest_checkpoint(tmp_path)
    assert good.name == "step-0000004"
    digest = _digest(good)

    # a second, resumed attempt fails the same way and leaves step 4 byte-for-byte intact
    calls["n"] = 0
    monkeypatch.setattr(
        sft,
        "forward_completion_loss",
        lambda model, batch: (real(model, batch)[0] * float("inf"), 1),
    )
    with pytest.raises(NonFiniteLossError, match="loss is inf at step 5"):
        train_sft(cfg, sft_rows, output_dir=tmp_path, resume_from=good)
    assert latest_checkpoint(tmp_path) == good and _digest(good) == digest
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_absurd_learning_rate_fails_cleanly(tiny_model_dir, tmp_path, sft_rows):
    cfg = _config(
        tiny_model_dir, learning_rate=1e30, max_steps=6, warmup_ratio=0.0, max_grad_norm=1e30
    )
    with pytest.raises(NonFiniteLossError, match="lower learning_rate"):
        train_sft(cfg, sft_rows, output_dir=tmp_path)
    assert latest_checkpoint(tmp_path) is None


def test_the_head_on_completion_positions_only_gives_the_full_forward_loss(
    tiny_model_dir, sft_rows
):
    from rlhf.data import SFTCollator
    from rlhf.sft import completion_loss, forward_completion_loss

    cfg = _config(tiny_model_dir, lora_dropout=0.0)
    from rlhf.modeling import load_policy

    model, tok, _, _ = load_policy(cfg)
    batch = SFTCollator(tok, max_seq_len=48)(sft_rows)
    with torch.no_grad():
        fast, n_fast = forward_completion_loss(model, batch)
        full, n_full = completion_loss(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["labels"],
        )
    assert n_fast == n_full > 0
    assert fast.item() == pytest.approx(full.item(), rel=1e-5)


def test_out_of_memory_names_what_to_reduce(tiny_model_dir, tmp_path, sft_rows, monkeypatch):
    import rlhf.sft as sft
    from rlhf.errors import OutOfMemoryError

    def oom(model, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(sft, "forward_completion_loss", oom)
    with pytest.raises(OutOfMemoryError, match="reduce batch_size or max_seq_len"):
        train_sft(_config(tiny_model_dir, max_steps=2), sft_rows, output_dir=tmp_path)


def test_eval_data_replaces_the_held_out_split_and_a_finished_run_resumes_to_itself(
    tiny_model_dir, tmp_path, sft_rows
):
    seen = []
    cfg = _config(tiny_model_dir, max_steps=2, eval_fraction=0.5)
    result = train_sft(
        cfg,
        sft_rows,
        output_dir=tmp_path,
        eval_data=sft_rows[:1],
        on_step=lambda s, m: seen.append(m),
    )
    assert "eval/loss" in result.metrics
    assert seen[-1]["progress/epoch"] == pytest.approx(2 * 2 / 4)  # all four rows trained on
    again = train_sft(cfg, sft_rows, output_dir=tmp_path, resume_from=tmp_path)
    assert again.checkpoint_dir == result.checkpoint_dir and again.step == 2
    assert again.metrics == result.metrics
