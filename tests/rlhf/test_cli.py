import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "rlhf", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SFT_ROWS = [
    {"prompt": "Say hello.", "completion": " Hello!"},
    {"prompt": "Name a fruit.", "completion": " An apple."},
]


@pytest.mark.slow
def test_cli_trains_sft_end_to_end_in_a_subprocess(tmp_path, tiny_model_dir):
    data = _write(tmp_path / "sft.jsonl", SFT_ROWS)
    config = tmp_path / "sft.json"
    config.write_text(
        json.dumps(
            {"model": str(tiny_model_dir), "batch_size": 2, "max_steps": 3, "max_seq_len": 32}
        )
    )
    res = _cli("sft", "--config", config, "--data", data, "--out", tmp_path / "out", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "step-0000003" in res.stdout and "loss/sft" in res.stdout
    assert "3/3" in res.stderr  # the progress bar reached the end
    assert (
        json.loads((tmp_path / "out" / "step-0000003" / "state.json").read_text())["kind"] == "sft"
    )


@pytest.mark.slow
def test_cli_builds_a_tiny_model_resumes_and_samples(tmp_path, tiny_model_dir, capsys):
    from rlhf.__main__ import main

    assert (
        main(["tiny-model", str(tmp_path / "tiny"), "--hidden-size", "32", "--num-heads", "2"]) == 0
    )
    assert (tmp_path / "tiny" / "config.json").exists()

    data = _write(tmp_path / "sft.jsonl", SFT_ROWS)
    config = tmp_path / "sft.json"
    out = tmp_path / "out"
    config.write_text(
        json.dumps(
            {"model": str(tiny_model_dir), "batch_size": 2, "max_steps": 2, "max_seq_len": 32}
        )
    )
    assert main(["sft", "--config", str(config), "--data", str(data), "--out", str(out)]) == 0
    config.write_text(
        json.dumps(
            {"model": str(tiny_model_dir), "batch_size": 2, "max_steps": 4, "max_seq_len": 32}
        )
    )
    assert (
        main(
            [
                "sft",
                "--config",
                str(config),
                "--data",
                str(data),
                "--out",
                str(out),
                "--resume",
                "--quiet",
            ]
        )
        == 0
    )
    assert "checkpoint: " + str(out / "step-0000004") in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["step-0000002", "step-0000004"]

    sample_cfg = tmp_path / "sample.json"
    sample_cfg.write_text(
        json.dumps(
            {
                "model": str(tiny_model_dir),
                "num_completions": 2,
                "max_new_tokens": 4,
                "max_seq_len": 32,
            }
        )
    )
    args = [
        "sample",
        "--config",
        str(sample_cfg),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "s"),
        "--checkpoint",
        str(out),
    ]
    assert main(args) == 0
    rows = [
        json.loads(line) for line in (tmp_path / "s" / "samples.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 2 and all(len(r["completions"]) == 2 for r in rows)
    assert rows[0]["generation"]["checkpoint"] == str(out / "step-0000004")  # the one used


def test_cli_reports_a_bad_config_and_bad_data_without_a_traceback(tmp_path, capsys):
    from rlhf.__main__ import main

    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": "x", "lr": 0.1}))
    data = _write(tmp_path / "d.jsonl", SFT_ROWS)
    assert (
        main(["sft", "--config", str(config), "--data", str(data), "--out", str(tmp_path / "o")])
        == 1
    )
    assert "error: unknown field 'lr'; did you mean 'learning_rate'?" in capsys.readouterr().err

    config.write_text(json.dumps({"model": "x"}))
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    assert (
        main(["sft", "--config", str(config), "--data", str(data), "--out", str(tmp_path / "o")])
        == 1
    )
    assert "line 2: invalid JSON" in capsys.readouterr().err


def test_load_reward_fn_imports_a_module_or_a_file_function(tmp_path):
    from rlhf.errors import ConfigError
    from rlhf.runner import load_reward_fn

    fn_file = tmp_path / "rewards.py"
    fn_file.write_text("def length(prompt, completion):\n    return float(len(completion))\n")
    assert load_reward_fn(f"{fn_file}:length")("p", "abc") == 3.0
    assert load_reward_fn("os.path:basename")("a/b") == "b"
    with pytest.raises(ConfigError, match="module:function"):
        load_reward_fn("nocolon")
    with pytest.raises(ConfigError, match="has no function"):
        load_reward_fn("os.path:nope")
    with pytest.raises(ConfigError, match="cannot import reward module"):
        load_reward_fn("no_such_module_xyz:f")


def test_run_rejects_an_unknown_kind_and_a_reward_for_sft(tmp_path):
    from rlhf.errors import ConfigError
    from rlhf.runner import run

    with pytest.raises(ConfigError, match="unknown run kind 'rlhf'"):
        run("rlhf", {"model": "x"}, [], output_dir=tmp_path)
    with pytest.raises(ConfigError, match="takes no reward model"):
        run(
            "sft",
            {"model": "x"},
            [{"prompt": "a", "completion": "b"}],
            output_dir=tmp_path,
            reward_fn="os.path:basename",
        )


def test_run_needs_a_reward_for_ppo_and_grpo(tmp_path):
    from rlhf.errors import ConfigError
    from rlhf.runner import run

    for kind in ("ppo", "grpo"):
        pytest.importorskip(f"rlhf.{kind}")
        with pytest.raises(ConfigError, match="needs a reward model"):
            run(kind, {"model": "x"}, [{"prompt": "a"}], output_dir=tmp_path)
