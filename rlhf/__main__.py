"""Command line: ``python -m rlhf {sft,reward,ppo,dpo,grpo,sample} --config FILE.json
--data FILE.jsonl --out DIR [--resume] [--reward-model DIR | --reward-fn module:function]
[--events [DEST]]`` and ``python -m rlhf tiny-model DIR`` (builds the small offline test model).

Shows a progress bar; Ctrl-C (SIGINT) or SIGTERM once stops cleanly with a checkpoint at the
next step (Ctrl-C twice aborts). Exit status: 0 done, 1 a training error (message on
stderr), 130 stopped.

``--events`` is for a supervisor (the studio's worker): instead of the progress bar the run
writes JSON lines (:mod:`rlhf.events`) to stdout (``-``, the default; stray prints of
libraries then go to stderr), to a file descriptor (a number) or to a file (a path), and every
failure, expected or not, ends with a ``failed`` event and exit status 1. Repeated stop
signals do not abort: the supervisor decides when to kill. The same command runs under
``torchrun --nproc-per-node N -m rlhf ...``, where each rank dies with torchrun.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

from rlhf.errors import TrainingError
from rlhf.runner import KINDS, SAMPLES_FILE


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rlhf",
        description="RLHF engine: SFT, reward model, PPO, DPO, GRPO, sampling.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for kind in KINDS:
        s = sub.add_parser(kind, help=f"run {kind}")
        s.add_argument(
            "--config", required=True, help="JSON file with the config fields (see rlhf/<algo>.py)"
        )
        s.add_argument("--data", required=True, help="JSONL data file")
        s.add_argument(
            "--out", required=True, help="output folder (checkpoints step-*/, or samples.jsonl)"
        )
        s.add_argument(
            "--resume", action="store_true", help="continue from the latest checkpoint in --out"
        )
        s.add_argument(
            "--checkpoint", help="(sample) checkpoint to sample from; default: config init_adapter"
        )
        s.add_argument("--model", help="override the config's model")
        s.add_argument(
            "--eval-data", help="(sft, reward, dpo) held-out JSONL rows; default: a split of --data"
        )
        group = s.add_mutually_exclusive_group()
        group.add_argument("--reward-model", help="(ppo, grpo) reward-model checkpoint folder")
        group.add_argument(
            "--reward-fn",
            help="(ppo, grpo) reward function 'module:function' or 'file.py:function'",
        )
        s.add_argument("--quiet", action="store_true", help="no progress bar")
        s.add_argument(
            "--events",
            nargs="?",
            const="-",
            metavar="DEST",
            help="write JSON-line events (rlhf/events.py) to stdout ('-'), a file descriptor "
            "or a file, instead of the progress bar",
        )
    t = sub.add_parser("tiny-model", help="build the small offline test model in DIR")
    t.add_argument("dir")
    t.add_argument("--vocab-size", type=int, default=512)
    t.add_argument("--hidden-size", type=int, default=64)
    t.add_argument("--num-layers", type=int, default=2)
    t.add_argument("--num-heads", type=int, default=4)
    t.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "tiny-model" and args.events is not None:
        return _run_with_events(args)
    try:
        if args.command == "tiny-model":
            from rlhf.modeling import build_tiny_model

            path = build_tiny_model(
                args.dir,
                vocab_size=args.vocab_size,
                hidden_size=args.hidden_size,
                num_layers=args.num_layers,
                num_heads=args.num_heads,
                seed=args.seed,
            )
            print(path)
            return 0
        return _run(args)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C twice: the last complete checkpoint stays as it was
        print("\naborted; the last complete checkpoint is kept", file=sys.stderr)
        return 130


def _parent_is_torchrun() -> bool:
    """Whether this process's parent is still torchrun (False once it was re-parented);
    True where /proc cannot tell."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return True
    return b"torch.distributed.run" in cmdline or b"torchrun" in cmdline


def _run_with_events(args) -> int:
    from rlhf import events

    if "LOCAL_RANK" in os.environ:  # a torchrun rank: it dies with torchrun, as torchrun does
        events.die_with_parent()  # with its supervisor (which set the same on it)
        if not _parent_is_torchrun():  # torchrun died before the request took effect
            return 1
    with _event_stream(args.events) as stream:
        writer = events.EventWriter(stream, rank=int(os.environ.get("RANK", "0")))
        try:
            with events.streaming(writer):
                return _run(args, events_on=True)
        except Exception as exc:  # every failure is an event with its reason, never a traceback
            writer.emit("failed", **events.failure(exc))
            return 1


@contextlib.contextmanager
def _event_stream(dest: str):
    """The text stream events go to. For stdout, the events get stdout's descriptor to
    themselves and anything else printed to stdout (a library's print) goes to stderr."""
    if dest == "-":
        sys.stdout.flush()
        channel, saved = os.dup(1), os.dup(1)
        os.dup2(2, 1)
        try:
            with os.fdopen(channel, "w", encoding="utf-8") as stream:
                yield stream
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
    elif dest.isdigit():
        with os.fdopen(int(dest), "w", encoding="utf-8", closefd=False) as stream:
            yield stream
    else:
        with open(dest, "a", encoding="utf-8") as stream:
            yield stream


def _run(args, *, events_on: bool = False) -> int:
    """Run ``args.command``; SIGINT and SIGTERM request a stop from the first moment (a stop
    asked while the model loads is honoured at the loop's first check)."""
    stop = {"requested": False}

    def on_stop_signal(signum, frame):
        if stop["requested"]:
            if events_on:  # the supervisor kills when it has waited long enough
                return
            raise KeyboardInterrupt
        stop["requested"] = True
        again = "" if events_on else " (Ctrl-C again to abort)"
        print(f"\nstopping after this step{again}", file=sys.stderr)

    previous = {sig: signal.signal(sig, on_stop_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run_until_stopped(args, stop=stop, events_on=events_on)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_until_stopped(args, *, stop: dict, events_on: bool) -> int:
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    from rlhf import events
    from rlhf.checkpoint import latest_checkpoint
    from rlhf.config import config_from_dict
    from rlhf.data import read_jsonl
    from rlhf.errors import ConfigError
    from rlhf.runner import run

    try:
        raw = json.loads(Path(args.config).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read config {args.config}: {exc}") from None
    if args.model:
        raw["model"] = args.model
    config = config_from_dict(args.command, raw)
    data = read_jsonl(args.data)
    eval_data = read_jsonl(args.eval_data) if args.eval_data else None
    out = Path(args.out)

    resume_from = None
    if args.command == "sample":
        if args.resume:
            raise ConfigError("--resume is for training runs; sample writes its file afresh")
        resume_from = args.checkpoint
    elif args.checkpoint:
        raise ConfigError(
            "--checkpoint is for sample; a training run starts from init_adapter in its config"
        )
    elif args.resume:
        resume_from = latest_checkpoint(out)
        if resume_from is None:
            print(f"no checkpoint in {out}; starting from scratch", file=sys.stderr)

    logging.getLogger("rlhf").info(
        "%s in process %s (rank %s of %s)",
        args.command,
        os.getpid(),
        os.environ.get("RANK", "0"),
        os.environ.get("WORLD_SIZE", "1"),
    )
    bar = tqdm(
        total=None,
        disable=args.quiet or events_on,
        unit="step",
        dynamic_ncols=True,
        desc=args.command,
    )

    def on_step(step: int, metrics: dict) -> None:
        total = metrics.get("progress/total_steps")
        if total and bar.total != int(total):
            bar.total = int(total)
        bar.n = step
        shown = {
            k: f"{v:.4g}"
            for k, v in metrics.items()
            if k.startswith(("loss/", "objective/", "reward/", "eval/"))
        }
        bar.set_postfix(shown, refresh=False)
        bar.refresh()
        events.emit("metrics", step=step, metrics=events.finite(metrics))

    try:
        result = run(
            args.command,
            config,
            data,
            output_dir=out,
            on_step=on_step,
            should_stop=lambda: stop["requested"],
            resume_from=resume_from,
            reward_model=args.reward_model,
            reward_fn=args.reward_fn,
            eval_data=eval_data,
        )
    finally:
        bar.close()

    if args.command == "sample":
        path = out / SAMPLES_FILE
        events.emit("result", rows=len(result), stopped=stop["requested"], path=str(path))
        stopped = " (stopped early)" if stop["requested"] and len(result) < len(data) else ""
        print(f"wrote {len(result)} of {len(data)} prompts to {path}{stopped}")
        return 130 if stop["requested"] else 0
    events.emit(
        "result",
        step=result.step,
        stopped=result.stopped,
        checkpoint=str(result.checkpoint_dir) if result.checkpoint_dir else None,
        metrics=events.finite(result.metrics),
    )
    print(
        f"checkpoint: {result.checkpoint_dir} (step {result.step}{', stopped' if result.stopped else ''})"
    )
    print(json.dumps(result.metrics, indent=2, sort_keys=True))
    return 130 if result.stopped else 0


if __name__ == "__main__":
    sys.exit(main())
