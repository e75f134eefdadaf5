import json

import torch

from rlhf.checkpoint import (
    latest_checkpoint,
    load_adapter_weights,
    load_head,
    load_training_state,
    read_state,
    save_checkpoint,
)
from rlhf.config import BaseConfig
from rlhf.modeling import ScalarHead, add_lora, load_causal_lm


def _policy(tiny_model_dir, seed):
    torch.manual_seed(seed)
    model = load_causal_lm(tiny_model_dir, device="cpu", dtype=torch.float32)
    model = add_lora(
        model, BaseConfig(model=str(tiny_model_dir), lora_r=4, lora_alpha=8, lora_dropout=0.0)
    )
    with torch.no_grad():  # make the adapter non-trivial (B starts at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    return model.eval()


def test_save_then_load_gives_identical_logits(tiny_model_dir, tmp_path):
    model = _policy(tiny_model_dir, seed=1)
    head = ScalarHead(64)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    ckpt = save_checkpoint(
        tmp_path,
        step=3,
        model=model,
        adapter_names=["policy"],
        heads={"value": head},
        state={"kind": "test", "metrics": {"a": 1.0}},
    )
    assert ckpt.name == "step-0000003"
    assert (ckpt / "policy" / "adapter_model.safetensors").exists()

    other = _policy(tiny_model_dir, seed=2)
    with torch.no_grad():
        assert not torch.allclose(other(input_ids=ids).logits, logits)
    load_adapter_weights(other, ckpt, "policy")
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids).logits, logits)
    assert torch.equal(load_head(ckpt, "value")(hidden), head(hidden))
    assert read_state(ckpt) == {"kind": "test", "metrics": {"a": 1.0}, "step": 3}


def test_the_peft_folder_loads_with_plain_peft(tiny_model_dir, tmp_path):
    from peft import PeftModel

    model = _policy(tiny_model_dir, seed=1)
    ids = torch.tensor([[5, 17, 42]])
    ckpt = save_checkpoint(tmp_path, step=1, model=model, adapter_names=["policy"], state={})
    base = load_causal_lm(tiny_model_dir, device="cpu", dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(ckpt / "policy")).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_optimizer_scheduler_and_rng_state_round_trip(tmp_path):
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    for _ in range(2):
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
    torch.manual_seed(5)
    ckpt = save_checkpoint(tmp_path, step=2, optimizer=opt, scheduler=sched, state={})
    expected_draw = torch.rand(3)

    p2 = torch.nn.Parameter(torch.ones(3))
    opt2 = torch.optim.AdamW([p2], lr=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (s + 1))
    load_training_state(ckpt, opt2, sched2)
    assert torch.equal(torch.rand(3), expected_draw)
    assert sched2.last_epoch == 2 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert torch.equal(
        opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )


def test_latest_checkpoint_ignores_half_written_folders(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, step=2, state={})
    save_checkpoint(tmp_path, step=10, state={})
    (tmp_path / "step-0000020").mkdir()  # no state.json: a crash mid-write would look like this
    (tmp_path / ".tmp-step-0000030-x").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-0000010"


def test_saving_the_same_step_again_replaces_the_folder_whole(tmp_path):
    save_checkpoint(tmp_path, step=1, state={"metrics": {"v": 1}})
    ckpt = save_checkpoint(tmp_path, step=1, state={"metrics": {"v": 2}})
    assert json.loads((ckpt / "state.json").read_text())["metrics"] == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000001"]


def test_a_new_run_starts_its_policy_from_init_adapter(tiny_model_dir, tmp_path):
    from rlhf.modeling import load_policy

    model = _policy(tiny_model_dir, seed=1)
    ids = torch.tensor([[5, 17, 42, 99]])
    save_checkpoint(
        tmp_path / "sft", step=7, model=model, adapter_names=["policy"], state={"kind": "sft"}
    )
    cfg = BaseConfig(
        model=str(tiny_model_dir), init_adapter=str(tmp_path / "sft")
    )  # the run folder
    policy, _, _, _ = load_policy(cfg)
    assert any(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)
    with torch.no_grad():
        assert torch.equal(policy.eval()(input_ids=ids).logits, model(input_ids=ids).logits)
