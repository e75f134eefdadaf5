"""What a person gets wrong on the command line or in Python gets one clear message (a
ConfigError, DataError or RewardFunctionError, printed as "error: ..." by the CLI), before
any work is lost, never a traceback or a folder mixing two runs."""

import json
import math

import pytest
import torch

from rlhf.__main__ import main
from rlhf.config import config_from_dict
from rlhf.data import read_jsonl
from rlhf.errors import ConfigError, DataError, RewardFunctionError
from rlhf.modeling import build_tiny_model, load_tokenizer
from rlhf.ppo import call_reward_fn
from rlhf.runner import load_reward_fn, run

SFT = [{"prompt": "Say hello.", "completion": " Hello!"}, {"prompt": "Hi", "completion": " Hi."}]


def sft_config(model, **kw):
    return {"model": str(model), "batch_size": 2, "max_steps": 2, "max_seq_len": 32, **kw}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_tiny_model_never_deletes_a_folder_it_did_not_build(tmp_path):
    keep = tmp_path / "run"
    keep.mkdir()
    (keep / "step-0000005").mkdir()
    with pytest.raises(ConfigError, match="not empty and holds no tiny model"):
        build_tiny_model(keep)
    assert (keep / "step-0000005").is_dir()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        build_tiny_model(tmp_path / "a-file")


def test_the_cli_prints_one_error_line_for_a_bad_tiny_model_and_config(tmp_path, capsys):
    assert main(["tiny-model", str(tmp_path / "t"), "--num-heads", "5"]) == 1
    assert capsys.readouterr().err.startswith("error: hidden_size (64) must be divisible")


def test_a_model_that_cannot_be_loaded_is_named_with_what_to_give(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="cannot load the model .*save_pretrained"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(ConfigError, match="the model folder .*missing does not exist"):
        load_tokenizer(tmp_path / "missing")


def test_data_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "x"\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2: invalid JSON .* column 15"):
        read_jsonl(bad)
    bad.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2: not UTF-8 text"):
        read_jsonl(bad)
    with pytest.raises(DataError, match="is a folder"):
        read_jsonl(tmp_path)
    missing = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "a"}])
    with pytest.raises(DataError, match=r"eval.jsonl line 1: missing field 'completion'"):
        run("sft", sft_config("m"), read_jsonl(missing), output_dir=tmp_path / "o")


def test_config_values_must_be_finite_and_name_a_module(tmp_path):
    for field in ("warmup_ratio", "weight_decay", "learning_rate"):
        with pytest.raises(ConfigError, match=f"{field} must be a finite number"):
            config_from_dict("sft", {"model": "m", field: math.nan})
    with pytest.raises(ConfigError, match="target_modules must name at least one module"):
        config_from_dict("sft", {"model": "m", "target_modules": []})


def test_target_modules_that_match_no_layer_are_a_config_error(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="target_modules \\['nope_proj'\\]"):
        run(
            "sft",
            sft_config(tiny_model_dir, target_modules=["nope_proj"]),
            SFT,
            output_dir=tmp_path / "o",
        )


def test_the_output_folder_is_checked_before_any_training(tmp_path, tiny_model_dir):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        run("sft", sft_config(tiny_model_dir), SFT, output_dir=tmp_path / "a-file")
    run("sft", sft_config(tiny_model_dir), SFT, output_dir=tmp_path / "out")
    with pytest.raises(ConfigError, match="already holds checkpoints of a run"):
        run("sft", sft_config(tiny_model_dir), SFT, output_dir=tmp_path / "out")


def test_a_resume_must_continue_the_same_run(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    run("sft", sft_config(tiny_model_dir, lora_r=4, lora_alpha=8), SFT, output_dir=out)
    same = sft_config(tiny_model_dir, lora_r=4, lora_alpha=8, max_steps=3)
    with pytest.raises(ConfigError, match="the data differ from those of the run"):
        run("sft", same, SFT[:1], output_dir=out, resume_from=out)
    with pytest.raises(ConfigError, match="lora_r 4 -> 8"):
        run("sft", {**same, "lora_r": 8}, SFT, output_dir=out, resume_from=out)
    with pytest.raises(ConfigError, match="at step 2, past max_steps=1"):
        run("sft", {**same, "max_steps": 1}, SFT, output_dir=out, resume_from=out)
    assert run("sft", same, SFT, output_dir=out, resume_from=out).step == 3


def test_reward_functions_that_fail_or_return_no_number_say_so(tmp_path):
    def boom(p, c):
        raise ValueError("reward backend down")

    with pytest.raises(RewardFunctionError, match="raised ValueError: reward backend down"):
        call_reward_fn(boom, "p", "c")
    for value in ("good", None, [1.0], True):
        with pytest.raises(RewardFunctionError, match="not a number"):
            call_reward_fn(lambda p, c, v=value: v, "p", "c")
    assert call_reward_fn(lambda p, c: 3, "p", "c") == 3.0
    broken = tmp_path / "broken.py"
    broken.write_text("def f(p, c):\n    return (\n")
    with pytest.raises(ConfigError, match="cannot import reward module .*SyntaxError"):
        load_reward_fn(f"{broken}:f")


def test_cli_options_that_do_not_apply_are_refused(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", SFT)
    config = tmp_path / "c.json"
    config.write_text(json.dumps(sft_config(tiny_model_dir)))
    args = ["--config", str(config), "--data", str(data), "--out", str(tmp_path / "o")]
    assert main(["sft", *args, "--checkpoint", "/nowhere", "--quiet"]) == 1
    assert "--checkpoint is for sample" in capsys.readouterr().err
    assert main(["sample", *args, "--resume", "--quiet"]) == 1
    assert "--resume is for training runs" in capsys.readouterr().err


def test_sampling_may_write_into_a_run_folder_and_a_resume_ignores_module_order(
    tmp_path, tiny_model_dir
):
    out = tmp_path / "out"
    modules = ["q_proj", "v_proj"]
    cfg = sft_config(tiny_model_dir, target_modules=modules)
    run("sft", cfg, SFT, output_dir=out)
    resumed = {**cfg, "target_modules": modules[::-1], "max_steps": 3}
    assert run("sft", resumed, SFT, output_dir=out, resume_from=out).step == 3
    sample = {"model": str(tiny_model_dir), "num_completions": 2, "max_new_tokens": 3}
    rows = run("sample", sample, [{"prompt": "Hi"}], output_dir=out, resume_from=out)
    assert len(rows[0]["completions"]) == 2 and (out / "samples.jsonl").exists()


def test_resuming_a_finished_run_returns_its_checkpoint_and_rewrites_nothing(
    tmp_path, tiny_model_dir
):
    ranked = [
        {"prompt": f"q{i}", "completions": [f"please {i}", f"no {i}"], "ranking": [[0], [1]]}
        for i in range(8)
    ]
    cfg = {"model": str(tiny_model_dir), "batch_size": 4, "max_steps": 2, "max_seq_len": 32}
    out = tmp_path / "rm"
    done = run("reward", cfg, ranked, output_dir=out)
    state = (done.checkpoint_dir / "state.json").read_bytes()
    again = run("reward", cfg, ranked, output_dir=out, resume_from=out)
    assert again.checkpoint_dir == done.checkpoint_dir and again.step == 2
    assert again.metrics == json.loads(state)["metrics"] and again.metrics["loss/reward"] > 0
    assert (done.checkpoint_dir / "state.json").read_bytes() == state


def test_an_init_adapter_of_another_shape_is_named_in_a_warning(tmp_path, tiny_model_dir, caplog):
    modules = ["q_proj", "v_proj"]
    first = run(
        "sft",
        sft_config(tiny_model_dir, lora_r=4, lora_alpha=8, target_modules=modules),
        SFT,
        output_dir=tmp_path / "sft",
    )
    from rlhf.config import BaseConfig
    from rlhf.modeling import add_lora, load_causal_lm

    def load(**lora):
        cfg = BaseConfig(model=str(tiny_model_dir), init_adapter=str(first.checkpoint_dir), **lora)
        add_lora(load_causal_lm(tiny_model_dir, device="cpu", dtype=torch.float32), cfg)

    with caplog.at_level("WARNING", logger="rlhf.modeling"):
        load(lora_r=4, lora_alpha=8, target_modules=modules[::-1])  # the same shape
        assert "keeps its own" not in caplog.text
        load(lora_r=8, lora_alpha=8, target_modules=modules)
    assert "keeps its own r 4 (config: 8)" in caplog.text
