"""Data-parallel training (rlhf.distributed): the pure helpers alone, then the trainers under 2
processes (torch.multiprocessing spawn with torchrun's environment, gloo on CPU) against the
same config in 1 process, a stop and resume under 2 processes, and a 2-"node" torchrun
rendezvous through the CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf import distributed
from tests.rlhf import dp_worker

# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,world", [(8, 2), (7, 2), (5, 3), (1, 2), (0, 2), (9, 1)])
def test_shard_bounds_cover_every_item_once_in_order_with_shares_one_apart(n, world):
    bounds = [distributed.shard_bounds(n, r, world) for r in range(world)]
    assert [i for start, end in bounds for i in range(start, end)] == list(range(n))
    sizes = [end - start for start, end in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_one_process_without_torchrun_has_no_group_and_every_helper_is_the_identity(
    monkeypatch,
):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.process_group():
        assert not distributed.is_initialized()
        assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
        assert distributed.all_reduce_sums({"a": 2, "b": 0.5}) == {"a": 2, "b": 0.5}
        assert distributed.any_rank(True) and not distributed.any_rank(False)
        assert distributed.local_part([1, 2, 3]) == [1, 2, 3]
        t = torch.arange(3.0)
        assert distributed.gather_shards(t) is t
        p = torch.nn.Parameter(torch.ones(2))
        p.grad = torch.full((2,), 3.0)
        distributed.all_reduce_gradients([p])
        assert p.grad.tolist() == [3.0, 3.0]


def test_a_cuda_device_of_a_torchrun_rank_is_its_local_rank(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.device_for(torch.device("cuda")) == torch.device("cuda", 3)
    assert distributed.device_for(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert distributed.device_for(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.device_for(torch.device("cuda")) == torch.device("cuda")
    assert distributed.backend_for(cuda=True) == "nccl" and distributed.backend_for(False) == "gloo"


# --------------------------------------------------------------------------------------------
# 1 process and 2 processes: the same training
# --------------------------------------------------------------------------------------------

ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sft_rows():
    return [
        {"prompt": f"Question {i}: what is {i} plus {i}?", "completion": f" It is {2 * i}."}
        for i in range(8)
    ]


def _ranked_rows():
    return [
        {
            "prompt": f"Question {i}: what is {i} plus {i}?",
            "completions": [f" It is {2 * i}.", f" Maybe {i}.", " No idea at all"],
            "ranking": [[0], [1], [2]],
        }
        for i in range(6)
    ]


def _jobs(model: Path, out: Path) -> dict[str, dict]:
    """name -> job. Global batches split unevenly over 2 ranks on purpose (3 prompts, 5 rows)."""
    base = dict(
        model=str(model),
        max_steps=3,
        max_seq_len=48,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        learning_rate=1e-2,
    )
    sft = dict(base, batch_size=2, grad_accum_steps=2, eval_fraction=0.25)
    rl = dict(base, max_new_tokens=6, learning_rate=1e-3, batch_size=3, grad_accum_steps=1)
    prompts = [{"prompt": f"Tell me about number {i}."} for i in range(6)]
    jobs = {
        "sft": {"kind": "sft", "config": sft, "data": _sft_rows()},
        "reward": {
            "kind": "reward",
            "config": dict(base, batch_size=2, grad_accum_steps=2, eval_fraction=0.34),
            "data": _ranked_rows(),
        },
        "dpo": {
            "kind": "dpo",
            "config": dict(base, batch_size=3, grad_accum_steps=2, eval_fraction=0.34),
            "data": _ranked_rows(),
        },
        "ppo": {
            "kind": "ppo",
            "config": dict(rl, num_minibatches=1, ppo_epochs=2, max_seq_len=40),
            "data": prompts,
            dp_worker.EXACT_ROLLOUTS: True,
        },
        "grpo": {
            "kind": "grpo",
            "config": dict(rl, num_generations=2, num_minibatches=2, max_seq_len=40),
            "data": prompts,
            dp_worker.EXACT_ROLLOUTS: True,
        },
    }
    for name, job in jobs.items():
        job["out"] = str(out / name)
    return jobs


def _spawn(jobs: list[dict], out: Path) -> list[dict]:
    torch.multiprocessing.spawn(
        dp_worker.spawned, args=(2, _free_port(), jobs, str(out)), nprocs=2, join=True
    )
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """The jobs in 1 process (here) and in 2 (spawned once for all of them), plus SFT stopped
    after 2 steps and resumed under 2 processes."""
    root = tmp_path_factory.mktemp("dp")
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    one = _jobs(tiny_model_dir, root / "one")
    two = _jobs(tiny_model_dir, root / "two")
    cut = dict(two["sft"], out=str(root / "two" / "sft-cut"))
    names = list(two)
    batch = [two[n] for n in names] + [dict(cut, stop_after=2), dict(cut, resume=True)]
    results = _spawn(batch, root / "two.json")
    return {
        "one": dict(zip(names, dp_worker.run_jobs([one[n] for n in names]), strict=True)),
        "two": dict(zip(names, results[: len(names)], strict=True)),
        "cut": results[len(names)],
        "resumed": results[len(names) + 1],
    }


ADAPTERS = {"sft": "policy", "reward": "reward", "dpo": "policy", "ppo": "policy", "grpo": "policy"}


def _adapter(result: dict, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(result["checkpoint"]) / name / "adapter_model.safetensors"))


def _assert_same_metrics(a: dict, b: dict, *, rtol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for step in a:
        keys = {k for k in a[step] if not k.startswith("perf/")}
        assert keys == {k for k in b[step] if not k.startswith("perf/")}
        for k in keys:
            assert b[step][k] == pytest.approx(a[step][k], rel=rtol, abs=1e-6), (step, k)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft", "reward", "dpo", "ppo", "grpo"])
def test_two_processes_train_as_one_with_the_same_global_batch(runs, kind):
    one, two = runs["one"][kind], runs["two"][kind]
    assert two["step"] == one["step"] == 3
    _assert_same_metrics(one["metrics"], two["metrics"])
    a, b = _adapter(one, ADAPTERS[kind]), _adapter(two, ADAPTERS[kind])
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    state = json.loads((Path(two["checkpoint"]) / "state.json").read_text())
    assert state["world_size"] == 2
    assert json.loads((Path(one["checkpoint"]) / "state.json").read_text())["world_size"] == 1


@pytest.mark.slow
def test_a_stop_and_resume_under_two_processes_continues_exactly(runs):
    full, cut, resumed = runs["two"]["sft"], runs["cut"], runs["resumed"]
    assert cut["stopped"] and cut["step"] == 2 and list(cut["metrics"]) == ["1", "2"]
    assert list(resumed["metrics"]) == ["3"] and resumed["step"] == 3
    _assert_same_metrics({"3": full["metrics"]["3"]}, resumed["metrics"], rtol=1e-6)
    a, b = _adapter(full, "policy"), _adapter(resumed, "policy")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_two_nodes_rendezvous_through_the_cli_and_train(tiny_model_dir, tmp_path):
    """Two torchrun invocations (--nnodes 2, node ranks 0 and 1) meet at a c10d endpoint on
    127.0.0.1, as two machines would, and run one SFT job."""
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in _sft_rows()))
    config = dict(
        model=str(tiny_model_dir),
        max_steps=2,
        batch_size=4,
        max_seq_len=48,
        lora_r=4,
        lora_alpha=8,
        eval_fraction=0.0,
    )
    (tmp_path / "sft.json").write_text(json.dumps(config))
    torchrun = Path(sys.executable).with_name("torchrun")
    endpoint = f"127.0.0.1:{_free_port()}"
    common = [
        str(torchrun),
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        "--rdzv-id=test-two-nodes",
        "--max-restarts=0",
    ]
    command = ["-m", "rlhf", "sft", "--config", "sft.json", "--data", "data.jsonl"]
    command += ["--out", "run", "--events", "events.jsonl"]
    env = {**os.environ, **ENV, "PYTHONPATH": str(Path(__file__).parents[2])}
    nodes = [
        subprocess.Popen(
            [*common, f"--node-rank={node}", *command],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "metrics"] == [1, 2]  # rank 0 alone
    result = next(e for e in events if e["event"] == "result")
    state = json.loads((tmp_path / result["checkpoint"] / "state.json").read_text())
    assert state["step"] == 2 and state["world_size"] == 2
