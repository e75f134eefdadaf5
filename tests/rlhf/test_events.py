"""``python -m rlhf <kind> --events``: the JSON-line stream a supervisor reads (rlhf/events.py)."""

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.__main__ import main
from rlhf.errors import OutOfMemoryError
from rlhf.events import EventWriter

ROOT = Path(__file__).resolve().parents[2]


def _write_inputs(tmp_path, rows, config):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(config))
    return cfg, data


def _events(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _sft(tmp_path, model, rows, **config):
    cfg, data = _write_inputs(
        tmp_path,
        rows,
        {"model": str(model), "batch_size": 2, "max_seq_len": 48, "eval_fraction": 0.0, **config},
    )
    events = tmp_path / "events.jsonl"
    argv = ["sft", "--config", str(cfg), "--data", str(data), "--out", str(tmp_path / "out")]
    return main([*argv, "--events", str(events)]), events


def test_a_run_streams_its_log_metrics_checkpoints_and_result(tmp_path, tiny_model_dir, sft_rows):
    code, path = _sft(tmp_path, tiny_model_dir, sft_rows, max_steps=4, save_every=2)
    assert code == 0
    events = _events(path)
    assert events[0]["event"] == "log" and f"in process {os.getpid()}" in events[0]["line"]
    kinds = [e["event"] for e in events if e["event"] != "log"]
    assert kinds == ["metrics", "metrics", "checkpoint", "metrics", "metrics", "checkpoint"] + [
        "result"
    ]  # a checkpoint is announced once complete, after the metrics of its step
    steps = [e["step"] for e in events if e["event"] == "metrics"]
    assert steps == [1, 2, 3, 4] and all("loss/sft" in e.get("metrics", {}) for e in events[1:2])
    checkpoints = [e for e in events if e["event"] == "checkpoint"]
    assert [c["step"] for c in checkpoints] == [2, 4]
    assert all((Path(c["path"]) / "state.json").is_file() for c in checkpoints)
    result = events[-1]
    assert result["step"] == 4 and result["stopped"] is False
    assert result["checkpoint"] == checkpoints[-1]["path"] and "loss/sft" in result["metrics"]


def test_a_config_error_is_a_failed_event_with_the_engines_advice(tmp_path, capsys):
    cfg, data = _write_inputs(
        tmp_path, [{"prompt": "a", "completion": "b"}], {"model": "x", "lr": 0.1}
    )
    events = tmp_path / "events.jsonl"
    argv = ["sft", "--config", str(cfg), "--data", str(data), "--out", str(tmp_path / "o")]
    assert main([*argv, "--events", str(events)]) == 1
    (failed,) = [e for e in _events(events) if e["event"] == "failed"]
    assert failed == {
        "event": "failed",
        "reason": "Invalid config: unknown field 'lr'; did you mean 'learning_rate'?",
        "expected": True,
    }
    assert "Traceback" not in capsys.readouterr().err


def test_a_nan_loss_is_a_failed_event_naming_what_to_lower(tmp_path, tiny_model_dir, sft_rows):
    code, path = _sft(
        tmp_path, tiny_model_dir, sft_rows, max_steps=20, learning_rate=1e30, warmup_ratio=0.0
    )
    assert code == 1
    failed = _events(path)[-1]
    assert failed["event"] == "failed" and failed["expected"] is True
    assert failed["reason"].startswith("Training diverged:") and "learning_rate" in failed["reason"]


@pytest.mark.parametrize(
    "error, reason",
    [
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            "Out of memory: reduce batch_size or max_seq_len (or raise grad_accum_steps).",
        ),
        (
            OutOfMemoryError("out of GPU memory; reduce batch_size"),
            "Out of memory: out of GPU memory; reduce batch_size",
        ),
    ],
)
def test_running_out_of_memory_is_an_expected_failure_naming_what_to_reduce(
    tmp_path, sft_rows, monkeypatch, error, reason
):
    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr("rlhf.runner.run", out_of_memory)
    code, path = _sft(tmp_path, "tiny", sft_rows, max_steps=2)
    assert code == 1
    assert _events(path)[-1] == {"event": "failed", "reason": reason, "expected": True}


def test_an_unexpected_error_is_a_failed_event_with_a_short_traceback_for_the_operator(
    tmp_path, sft_rows, monkeypatch, capsys
):
    def broken(*args, **kwargs):
        raise KeyError("adapter")

    monkeypatch.setattr("rlhf.runner.run", broken)
    code, path = _sft(tmp_path, "tiny", sft_rows, max_steps=2)
    assert code == 1
    failed = _events(path)[-1]
    assert failed["event"] == "failed" and failed["expected"] is False
    assert failed["reason"] == "KeyError: 'adapter'"
    assert "Traceback" in failed["traceback"] and "in broken" in failed["traceback"]
    assert "Traceback" not in capsys.readouterr().err


def test_several_processes_are_refused_for_a_kind_that_cannot_run_data_parallel(
    tmp_path, sft_rows, monkeypatch
):
    monkeypatch.setattr("rlhf.runner.DATA_PARALLEL_KINDS", frozenset())
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg, data = _write_inputs(tmp_path, sft_rows, {"model": "tiny"})
    events = tmp_path / "events.jsonl"
    argv = ["sample", "--config", str(cfg), "--data", str(data), "--out", str(tmp_path / "out")]
    code, path = main([*argv, "--events", str(events)]), events
    assert code == 1
    failed = _events(path)[-1]
    assert failed["expected"] is True and "sample runs in one process" in failed["reason"]
    assert "1 device" in failed["reason"]


def test_only_rank_0_speaks_for_the_group_but_every_rank_reports_its_failure():
    stream = io.StringIO()
    writer = EventWriter(stream, rank=1)
    writer.emit("metrics", step=1, metrics={})
    writer.emit("failed", reason="Out of memory: x", expected=True)
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == ["failed"]


def test_nonfinite_metrics_are_written_as_null():
    from rlhf.events import finite

    stream = io.StringIO()
    EventWriter(stream).emit("metrics", step=1, metrics=finite({"a": float("nan"), "b": 1.0}))
    assert json.loads(stream.getvalue())["metrics"] == {"a": None, "b": 1.0}


@pytest.mark.slow
def test_a_stop_signal_to_the_process_group_ends_the_run_at_the_next_step_with_a_checkpoint(
    tmp_path, tiny_model_dir, sft_rows
):
    """What the studio's worker does: events on stdout, SIGINT to the group (twice: a second
    signal must not abort the checkpoint), then the result names the checkpoint it stopped on."""
    cfg, data = _write_inputs(
        tmp_path,
        sft_rows,
        {
            "model": str(tiny_model_dir),
            "batch_size": 2,
            "max_seq_len": 48,
            "eval_fraction": 0.0,
            "max_steps": 100_000,
            "save_every": 1000,
        },
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    argv = ["sft", "--config", cfg, "--data", data, "--out", tmp_path / "out", "--events"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf", *map(str, argv)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(json.loads(line))  # stdout carries events only
            if lines[-1]["event"] == "metrics" and lines[-1]["step"] >= 3:
                break
        os.killpg(proc.pid, signal.SIGINT)
        os.killpg(proc.pid, signal.SIGINT)
        lines += [json.loads(line) for line in proc.stdout]
        assert proc.wait(timeout=60) == 130, proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert f"in process {proc.pid}" in lines[0]["line"]
    result = lines[-1]
    assert result["event"] == "result" and result["stopped"] is True
    assert 3 <= result["step"] < 100_000
    (checkpoint,) = [e for e in lines if e["event"] == "checkpoint"]
    assert checkpoint["path"] == result["checkpoint"] and checkpoint["step"] == result["step"]
    assert "stopping after this step" in proc.stderr.read()
