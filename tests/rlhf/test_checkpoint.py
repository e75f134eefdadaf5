import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import torch

from rlhf.checkpoint import (
    clean_incomplete,
    latest_checkpoint,
    load_adapter_weights,
    load_head,
    load_training_state,
    read_state,
    save_checkpoint,
)
from rlhf.config import BaseConfig
from rlhf.modeling import ScalarHead, add_lora, load_causal_lm
from rlhf.runner import run
from rlhf.sft import SFTConfig

ROOT = Path(__file__).resolve().parents[2]


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


def test_cleaning_puts_back_a_step_whose_re_save_crashed_and_drops_the_half_copy(tmp_path):
    ckpt = save_checkpoint(tmp_path, step=5, state={"kind": "test"})
    old = tmp_path / ".old-step-0000005-4242"  # save_checkpoint moved it aside, then died
    os.replace(ckpt, old)
    half = tmp_path / ".tmp-step-0000005-x1y2"
    half.mkdir()
    (half / "training_state.pt").write_bytes(b"half")
    stale = tmp_path / ".tmp-step-0000007-z3"
    stale.mkdir()
    assert latest_checkpoint(tmp_path) is None

    assert clean_incomplete(tmp_path) == [half.name, stale.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000005"]
    assert read_state(latest_checkpoint(tmp_path)) == {"kind": "test", "step": 5}


_SAVE_THEN_HANG = """
import json, sys, threading
import torch
from rlhf.sft import SFTConfig, train_sft

real_save = torch.save

def save_then_hang(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    if "step-0000002" in str(f):  # step 2's training state is written, its state.json not yet
        print("mid-save", flush=True)
        threading.Event().wait()

torch.save = save_then_hang
torch.set_num_threads(1)
cfg, rows, out = json.loads(sys.argv[1])
train_sft(SFTConfig(**cfg), rows, output_dir=out)
"""


def test_a_process_killed_mid_save_keeps_the_last_checkpoint_and_resume_cleans_up(
    tiny_model_dir, tmp_path, sft_rows
):
    """SIGKILL a real training process while it writes step 2: step 1 still loads, and the
    run resumed through rlhf.runner removes the half-written .tmp-step-0000002-* folder."""
    cfg = dict(
        model=str(tiny_model_dir),
        batch_size=2,
        max_steps=3,
        save_every=1,
        max_seq_len=48,
        lora_r=4,
        lora_alpha=8,
        eval_fraction=0.0,
    )
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVE_THEN_HANG, json.dumps([cfg, sft_rows, str(out)])],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    watchdog = threading.Timer(120, proc.kill)  # a hung child ends the wait, never the test run
    watchdog.start()
    try:
        line = proc.stdout.readline()  # returns once the child is inside the save
        assert line.strip() == "mid-save", f"the child ended first (exit {proc.poll()})"
    finally:
        watchdog.cancel()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    partial = [p for p in out.iterdir() if p.name.startswith(".tmp-step-0000002-")]
    assert len(partial) == 1 and (partial[0] / "training_state.pt").exists()
    assert not (partial[0] / "state.json").exists()
    previous = latest_checkpoint(out)
    assert previous.name == "step-0000001" and read_state(previous)["step"] == 1
    model = _policy(tiny_model_dir, seed=3)
    load_adapter_weights(model, previous, "policy")  # the previous checkpoint still loads
    assert "optimizer" in load_training_state(previous, restore_rng=False)

    result = run("sft", SFTConfig(**cfg), sft_rows, output_dir=out, resume_from=out)
    assert result.step == 3 and not result.stopped
    assert sorted(p.name for p in out.iterdir()) == [
        "step-0000001",
        "step-0000002",
        "step-0000003",
    ]
