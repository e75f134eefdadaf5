#!/usr/bin/env python3
"""Engine benchmark: our rlhf/ trainers side by side with TRL 1.16 on the same model, data and batch.

    python benchmarks/engine.py --size tiny      # CPU smoke run, about a minute
    python benchmarks/engine.py --size base      # GPU: Qwen2.5-0.5B shape, random weights, vocab 32k, bf16

The model, tokenizer and synthetic text come from the peer benchmark (``benchmarks/peer_trl.py``,
vendored from ``../shared/peer-bench/bench_trl.py``): a Qwen2-architecture model with random
weights and a byte-level BPE tokenizer trained at start-up, text of exact token lengths. Both
sides use LoRA r=16, alpha 32, dropout 0.05 on q,k,v,o,gate,up,down, learning rate 1e-4,
bf16 on a GPU (fp32 on CPU), and the same batch:

- ``ours_sft``     rlhf.sft.train_sft, 8 sequences of ``seq`` tokens per step        -> tokens/s
- ``ours_reward``  rlhf.reward.train_reward, 4 prompts x K=4 completions per step (the same
                   16 sequences as TRL's 8 pairs) = 24 comparisons per step          -> comparisons/s
- ``ours_ppo``     rlhf.ppo.train_ppo, 8 prompts, ``grpo_completion`` new tokens, scored by the
                   reward model just trained (shared base: adapter "reward")        -> s/step, split
                   rollout / scoring / training
- ``ours_grpo``    rlhf.grpo.train_grpo, 1 prompt x 8 generations, TRL's length reward -> s/step
- ``ours_rollout`` rollout generation alone (adapter merged), over rollout batch sizes (8 as
                   TRL, 64 = PPO's default batch, 256) with the dynamic and the static
                   (compiled on a GPU) KV cache                                  -> tokens/s
- ``trl_sft``, ``trl_reward``, ``trl_grpo``: the peer's TRL runs, when ``trl`` is importable.

Step times are wall-clock between consecutive ``on_step`` callbacks (CUDA-synchronised), i.e.
everything a step does, medians over the timed steps after warm-up. Peak memory is
``torch.cuda.max_memory_allocated`` per benchmark. Output: one JSON line per benchmark, then
a summary table with our/TRL ratios and the issue's goals; ``--out`` (default
``$OUT/engine-bench.json`` or ``./engine-bench.json``) gets everything as one JSON document.

TRL is a benchmark-only dependency: ``pip install trl==1.16.0`` (or, on an offline GPU machine,
the wheels listed in ``../shared/peer-bench/README.md`` installed with ``--target extra-site``
and ``PYTHONPATH=extra-site``). Without it the TRL lines say "skipped" and why. Record GPU
results, with the card's name, in docs/benchmarks.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository root, for `import rlhf`
sys.path.insert(0, str(HERE))  # for `import peer_trl`

import peer_trl as peer  # noqa: E402
import torch  # noqa: E402

CUDA = peer.CUDA
BATCH = peer.BATCH  # 8: SFT sequences, RM pairs (16 sequences), GRPO completions per step
K = 4  # completions per ranked prompt for our reward model
GENERATIONS = peer.NUM_GENERATIONS  # 8

# Steps per size: (warmup, timed) for SFT / reward, and for PPO / GRPO.
# PPO keeps its config defaults (4 epochs x 4 minibatches) except on the CPU smoke size.
STEPS = {
    "tiny": dict(
        warmup=1,
        steps=3,
        rl_warmup=1,
        rl_steps=2,
        grpo_completion=16,
        ppo=dict(ppo_epochs=1, num_minibatches=1),
        rollout_batches=[8, 32],
        rollout_repeats=2,
    ),
    "base": dict(
        warmup=3,
        steps=20,
        rl_warmup=1,
        rl_steps=4,
        grpo_completion=128,
        ppo={},
        rollout_batches=[8, 64, 256],
        rollout_repeats=3,
    ),
}

STEPS["small"] = STEPS["base"]

# Goals from the engine issue (GPU, same run as TRL).
GOALS = {"sft": 4.0, "reward": 5.0, "generation": 20.0, "ppo_peak_vs_sft": 1.3}


def log(msg: str) -> None:
    print(f"[engine-bench {time.time() - peer.T_START:7.1f}s] {msg}", file=sys.stderr, flush=True)


class StepClock:
    """``on_step`` callback: wall time between consecutive steps (CUDA-synchronised) + metrics."""

    def __init__(self) -> None:
        self.t_last = None
        self.step_s: list[float] = []
        self.metrics: list[dict] = []

    def start(self) -> None:
        peer.sync()
        self.t_last = time.perf_counter()

    def __call__(self, step: int, metrics: dict) -> None:
        peer.sync()
        now = time.perf_counter()
        if self.t_last is not None:
            self.step_s.append(now - self.t_last)
        self.t_last = now
        self.metrics.append(dict(metrics))

    def timed(self, warmup: int) -> tuple[list[float], list[dict]]:
        # step_s[i] is the time of step i+1 measured from the previous callback (step 1 also
        # includes model loading, so it is always inside the warm-up)
        if len(self.step_s) <= warmup:
            raise RuntimeError(f"no timed steps: ran {len(self.step_s)} steps with warmup {warmup}")
        return self.step_s[warmup:], self.metrics[warmup:]


def median(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else None


def base_config(A, **kw) -> dict:
    cfg = dict(
        model=A.path,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=list(peer.LORA_TARGETS),
        learning_rate=1e-4,
        warmup_ratio=0.0,
        seed=0,
        save_every=0,
    )
    cfg.update(kw)
    return cfg


def make_config(cls, d: dict):
    """Build ``cls`` from the keys it has (the RL configs are written in parallel; unknown keys
    are reported, not fatal)."""
    names = {f.name for f in dataclasses.fields(cls)}
    missing = sorted(set(d) - names)
    if missing:
        log(f"{cls.__name__} has no field(s) {missing}; using its defaults for them")
    cfg = cls(**{k: v for k, v in d.items() if k in names})
    cfg.validate()
    return cfg


def peak_gb():
    return peer.peak_mem_gb()


# --------------------------------------------------------------------------------------------
# Our side
# --------------------------------------------------------------------------------------------


def bench_ours_sft(A, ctx, *, batch=None, name="ours_sft"):
    from rlhf.checkpoint import read_state
    from rlhf.sft import SFTConfig, train_sft

    S, P, W, T = ctx["seq"], ctx["sft_prompt"], ctx["warmup"], ctx["steps"]
    asked = B = batch or ctx["sft_batch"]  # an int, or "auto" (picked from free GPU memory)
    n_rows = (64 if B == "auto" else B) * (W + T)
    # prompt + completion + EOS > S tokens, so every example is truncated to exactly S: no padding
    rows = [{"prompt": A.text(P), "completion": A.text(S - P + 8)} for _ in range(n_rows)]
    cfg = make_config(
        SFTConfig,
        base_config(
            A,
            batch_size=B,
            max_seq_len=S,
            max_steps=W + T,
            eval_fraction=0.0,
            gradient_checkpointing=ctx["grad_ckpt_ours"],
        ),
    )
    clock = StepClock()
    clock.start()
    result = train_sft(cfg, rows, output_dir=os.path.join(ctx["workdir"], name), on_step=clock)
    ran = read_state(result.checkpoint_dir)["config"]  # the resolved batch and checkpointing
    B = ran["batch_size"]
    step_s, _ = clock.timed(W)
    med = statistics.median(step_s)
    rec = dict(
        bench=name,
        seq_len=S,
        batch=B,
        tokens_per_step=B * S,
        steps_timed=len(step_s),
        warmup_steps=W,
        median_s_per_step=med,
        tokens_per_s=B * S / med,
        samples_per_s=B / med,
        peak_mem_gb=peak_gb(),
        gradient_checkpointing=ran["gradient_checkpointing"],
        batch_picked="auto" if asked == "auto" else "given",
    )
    peer.add_mfu(rec, rec["tokens_per_s"], A.n_matmul_lm, ctx)
    return rec


def bench_ours_sft_same_batch(A, ctx):
    """Our SFT at TRL's batch (8), when ours_sft ran at another (e.g. "auto"): the like-for-like
    SFT ratio, and the SFT peak memory PPO's (rollout batch 8) is held against."""
    if ctx["sft_batch"] == BATCH:
        raise SkipBench(f"ours_sft already ran at batch {BATCH}")
    return bench_ours_sft(A, ctx, batch=BATCH, name=f"ours_sft_b{BATCH}")


def bench_ours_reward(A, ctx):
    from rlhf.checkpoint import read_state
    from rlhf.reward import RewardConfig, train_reward

    S, P, W, T = ctx["seq"], ctx["rm_prompt"], ctx["warmup"], ctx["steps"]
    # default: 4 prompts = 16 sequences per step, as TRL's 8 pairs; or "auto" (free GPU memory)
    given = ctx["rm_batch"]
    n = (64 if given == "auto" else given) * (W + T)
    # prompt + completion + EOS = S tokens exactly (the EOS is appended by the encoder)
    rows = [
        {
            "prompt": A.text(P),
            "completions": [A.text(S - P - 1) for _ in range(K)],
            "ranking": [[i] for i in range(K)],
        }
        for _ in range(n)
    ]
    cfg = make_config(
        RewardConfig,
        base_config(
            A,
            batch_size=given,
            max_seq_len=S,
            max_steps=W + T,
            eval_fraction=0.0,
            reference_max_completions=64,
            gradient_checkpointing=ctx["grad_ckpt_ours"],
        ),
    )
    clock = StepClock()
    clock.start()
    out = os.path.join(ctx["workdir"], "ours_reward")
    result = train_reward(cfg, rows, output_dir=out, on_step=clock)
    ctx["reward_checkpoint"] = str(result.checkpoint_dir)
    prompts_per_step = read_state(result.checkpoint_dir)["config"]["batch_size"]
    step_s, _ = clock.timed(W)
    med = statistics.median(step_s)
    pairs = prompts_per_step * math.comb(K, 2)
    rec = dict(
        bench="ours_reward",
        seq_len=S,
        k=K,
        prompts_per_step=prompts_per_step,
        sequences_per_step=prompts_per_step * K,
        comparisons_per_step=pairs,
        steps_timed=len(step_s),
        warmup_steps=W,
        median_s_per_step=med,
        comparisons_per_s=pairs / med,
        sequences_per_s=prompts_per_step * K / med,
        tokens_per_s=prompts_per_step * K * S / med,
        peak_mem_gb=peak_gb(),
        batch_picked="auto" if given == "auto" else "given",
    )
    peer.add_mfu(rec, rec["tokens_per_s"], A.n_matmul_rm, ctx)
    return rec


def _rl_record(name, clock, W, extra):
    step_s, metrics = clock.timed(W)
    med = statistics.median(step_s)
    rec = dict(bench=name, steps_timed=len(step_s), warmup_steps=W, median_s_per_step=med, **extra)
    for key in (
        "perf/rollout_s",
        "perf/score_s",
        "perf/train_s",
        "perf/tokens_per_s",
        "response/length",
        "objective/reward",
    ):
        vals = [m.get(key) for m in metrics]
        if any(v is not None for v in vals):
            rec[key.replace("/", "_")] = median(vals)
    rec["peak_mem_gb"] = peak_gb()
    return rec


def bench_ours_ppo(A, ctx):
    try:
        from rlhf.ppo import PPOConfig, train_ppo
    except ImportError as exc:
        raise SkipBench(f"rlhf.ppo is not importable ({exc})") from None
    P, C, W, T = ctx["grpo_prompt"], ctx["grpo_completion"], ctx["rl_warmup"], ctx["rl_steps"]
    rows = [{"prompt": A.text(P)} for _ in range(BATCH * (W + T))]
    cfg = make_config(
        PPOConfig,
        base_config(
            A,
            batch_size=BATCH,
            max_new_tokens=C,
            max_seq_len=P + C + 8,
            max_steps=W + T,
            temperature=1.0,
            **ctx["ppo"],
        ),
    )
    reward_model = ctx.get("reward_checkpoint")
    if reward_model is None:
        raise SkipBench("needs the reward model from ours_reward (run it first)")
    clock = StepClock()
    clock.start()
    train_ppo(
        cfg,
        rows,
        output_dir=os.path.join(ctx["workdir"], "ours_ppo"),
        on_step=clock,
        reward_model=reward_model,
    )
    rec = _rl_record(
        "ours_ppo",
        clock,
        W,
        dict(
            prompt_tokens=P,
            max_new_tokens=C,
            rollout_batch=BATCH,
            ppo_epochs=getattr(cfg, "ppo_epochs", None),
            num_minibatches=getattr(cfg, "num_minibatches", None),
            reward="reward model (shared base, adapter 'reward')",
        ),
    )
    n_tok = (rec.get("response_length") or C) * BATCH
    rec["completion_tokens_per_s"] = n_tok / rec["median_s_per_step"]
    if rec.get("perf_rollout_s"):
        rec["rollout_tokens_per_s"] = n_tok / rec["perf_rollout_s"]
    return rec


def length_reward(prompt: str, completion: str) -> float:
    """TRL anchor's GRPO reward, per completion: -|len(chars) - 200| / 200."""
    return -abs(len(completion) - 200) / 200.0


def bench_ours_grpo(A, ctx):
    try:
        from rlhf.grpo import GRPOConfig, train_grpo
    except ImportError as exc:
        raise SkipBench(f"rlhf.grpo is not importable ({exc})") from None
    P, C, W, T = ctx["grpo_prompt"], ctx["grpo_completion"], ctx["rl_warmup"], ctx["rl_steps"]
    prompts_per_step = BATCH // GENERATIONS  # 1 prompt x 8 generations, as TRL
    rows = [{"prompt": A.text(P)} for _ in range(prompts_per_step * (W + T) + 4)]
    d = base_config(
        A,
        batch_size=prompts_per_step,
        max_new_tokens=C,
        max_seq_len=P + C + 8,
        max_steps=W + T,
        temperature=1.0,
    )
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    for key in ("num_generations", "group_size", "num_samples"):
        if key in names:
            d[key] = GENERATIONS
            break
    cfg = make_config(GRPOConfig, d)
    clock = StepClock()
    clock.start()
    train_grpo(
        cfg,
        rows,
        output_dir=os.path.join(ctx["workdir"], "ours_grpo"),
        on_step=clock,
        reward_fn=length_reward,
    )
    rec = _rl_record(
        "ours_grpo",
        clock,
        W,
        dict(
            prompt_tokens=P,
            max_completion_length=C,
            prompts_per_step=prompts_per_step,
            completions_per_step=BATCH,
            reward="length (as TRL anchor)",
        ),
    )
    n_tok = (rec.get("response_length") or C) * BATCH
    rec["completion_tokens_per_s"] = n_tok / rec["median_s_per_step"]
    if rec.get("perf_rollout_s"):
        rec["rollout_tokens_per_s"] = n_tok / rec["perf_rollout_s"]
    return rec


def bench_ours_rollout(A, ctx):
    """Rollout generation alone, as PPO and GRPO run it (policy adapter merged, plain softmax
    sampling at temperature 1, ``grpo_completion`` new tokens, no early EOS), over rollout
    batch sizes and both KV caches: "dynamic" and "static" (compiled into a CUDA graph on a
    GPU). The first call of each setting is warm-up (it includes the compile)."""
    from rlhf.data import encode_prompts
    from rlhf.modeling import load_policy
    from rlhf.ppo import PPOConfig
    from rlhf.sampling import MergedAdapter, generate

    P, C = ctx["grpo_prompt"], ctx["grpo_completion"]
    cfg = make_config(PPOConfig, base_config(A, max_new_tokens=C, max_seq_len=P + C + 8))
    model, tok, device, _dtype = load_policy(cfg)
    model.eval()
    merger = MergedAdapter(model, "policy")
    runs = []
    for batch in ctx["rollout_batches"]:
        query, qmask = encode_prompts(
            tok,
            [A.text(P) for _ in range(batch)],
            max_len=P + 8,
            chat_template=False,
            device=device,
        )
        for cache in ("dynamic", "static"):
            times, tokens = [], 0
            for i in range(1 + ctx["rollout_repeats"]):
                peer.sync()
                t0 = time.perf_counter()
                with merger.merged():
                    _ids, mask = generate(
                        model,
                        tok,
                        query,
                        qmask,
                        temperature=1.0,
                        max_new_tokens=C,
                        eos_ids=[],
                        cache=cache,
                        max_cache_len=cfg.max_seq_len,
                    )
                peer.sync()
                if i:  # the first call is warm-up (and compile)
                    times.append(time.perf_counter() - t0)
                    tokens = int(mask.sum())
            med = statistics.median(times)
            runs.append(
                dict(
                    batch=batch,
                    cache=cache,
                    s_per_call=med,
                    tokens_per_call=tokens,
                    tokens_per_s=tokens / med,
                )
            )
            log(f"rollout batch {batch} {cache}: {tokens / med:.1f} tok/s")
    fell_back = bool(getattr(model, "_rlhf_static_cache_failed", False))
    return dict(
        bench="ours_rollout",
        prompt_tokens=P,
        new_tokens=C,
        runs=runs,
        static_fell_back_to_dynamic=fell_back,
        peak_mem_gb=peak_gb(),
    )


# --------------------------------------------------------------------------------------------
# TRL side (the peer's own functions)
# --------------------------------------------------------------------------------------------


class SkipBench(Exception):
    """A benchmark that cannot run here (a missing package or module); reported, not failed."""


def _trl(fn):
    def run(A, ctx):
        if importlib.util.find_spec("trl") is None:
            raise SkipBench(
                "trl is not installed; pip install trl==1.16.0 to run TRL's side in the same process"
            )
        tctx = dict(
            ctx,
            steps=ctx["steps"],
            warmup=ctx["warmup"],
            grpo_steps=ctx["rl_steps"],
            grpo_warmup=ctx["rl_warmup"],
        )
        return fn(A, tctx)

    return run


# Each of ours next to TRL's, so that a run cut short (a time limit) still has whole pairs;
# PPO scores with the reward model that ours_reward trains.
BENCHES = [
    ("sft", "ours_sft", bench_ours_sft),
    ("sft8", f"ours_sft_b{BATCH}", bench_ours_sft_same_batch),
    ("trl_sft", "trl_sft", _trl(peer.bench_sft)),
    ("reward", "ours_reward", bench_ours_reward),
    ("trl_reward", "trl_reward", _trl(peer.bench_reward)),
    ("grpo", "ours_grpo", bench_ours_grpo),
    ("trl_grpo", "trl_grpo", _trl(peer.bench_grpo)),
    ("rollout", "ours_rollout", bench_ours_rollout),
    ("ppo", "ours_ppo", bench_ours_ppo),
]


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def _ok(results, name):
    r = results.get(name)
    return r if r and r.get("status") == "ok" else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def comparisons(results: dict) -> list[dict]:
    """Our/TRL ratios and the issue's goals."""
    out = []

    def add(what, ours, trl, unit, goal=None, higher_is_better=True):
        ratio = _ratio(ours, trl) if higher_is_better else _ratio(trl, ours)
        out.append(
            dict(
                metric=what,
                ours=ours,
                trl=trl,
                unit=unit,
                ratio=ratio,
                goal=goal,
                meets_goal=(ratio >= goal) if (ratio is not None and goal is not None) else None,
            )
        )

    t = _ok(results, "trl_sft")
    for name in ("ours_sft", f"ours_sft_b{BATCH}"):
        o = _ok(results, name)
        if o or name == "ours_sft":
            add(
                "SFT tokens/s (ours batch {}{})".format(
                    o["batch"] if o else "?", ", auto" if o and o["batch_picked"] == "auto" else ""
                ),
                o and o["tokens_per_s"],
                t and t["tokens_per_s"],
                "tok/s",
                GOALS["sft"],
            )
    o, t = _ok(results, "ours_reward"), _ok(results, "trl_reward")
    add(
        f"RM comparisons/s (ours K=4, {o['prompts_per_step'] if o else '?'} prompts)",
        o and o["comparisons_per_s"],
        t and t["pairs_per_s"],
        "cmp/s",
        GOALS["reward"],
    )
    t = _ok(results, "trl_grpo")
    # TRL's tokens per second inside generate (95% of its step), else per whole step
    trl_gen = t and (t.get("gen_only_tokens_per_s") or t.get("completion_tokens_per_s"))
    for name in ("ours_ppo", "ours_grpo"):
        o = _ok(results, name)
        add(
            f"{name[5:].upper()} rollout completion tok/s (batch {BATCH})",
            o and (o.get("rollout_tokens_per_s") or o.get("perf_tokens_per_s")),
            trl_gen,
            "tok/s",
            GOALS["generation"],
        )
    o = _ok(results, "ours_rollout")
    for run in o["runs"] if o else []:
        add(
            f"rollout tok/s, batch {run['batch']}, {run['cache']} cache",
            run["tokens_per_s"],
            trl_gen,
            "tok/s",
            GOALS["generation"],
        )
    o = _ok(results, "ours_grpo")
    add(
        "GRPO s/step",
        o and o["median_s_per_step"],
        t and t["median_s_per_step"],
        "s",
        None,
        higher_is_better=False,
    )
    o = _ok(results, "ours_ppo")
    # the SFT run at PPO's batch (8 rows): ours_sft_b8, or ours_sft when that ran at 8
    s = _ok(results, f"ours_sft_b{BATCH}") or (
        _ok(results, "ours_sft") if (_ok(results, "ours_sft") or {}).get("batch") == BATCH else None
    )
    if o and s and o.get("peak_mem_gb") and s.get("peak_mem_gb"):
        r = o["peak_mem_gb"] / s["peak_mem_gb"]
        out.append(
            dict(
                metric=f"PPO peak / our SFT peak (batch {BATCH})",
                ours=o["peak_mem_gb"],
                trl=None,
                unit="GB",
                ratio=r,
                goal=GOALS["ppo_peak_vs_sft"],
                meets_goal=r <= GOALS["ppo_peak_vs_sft"],
            )
        )
    return out


def fmt(x, nd=3):
    return peer.fmt(x, nd)


def summary_table(results: dict, comps: list[dict]) -> str:
    rows = [("bench", "status", "med s/step", "throughput", "unit", "peak GB", "split / note")]
    for name, r in results.items():
        if r.get("status") != "ok":
            rows.append(
                (
                    name,
                    r.get("status", "?"),
                    "-",
                    "-",
                    "-",
                    "-",
                    (r.get("reason") or r.get("error") or "")[:70],
                )
            )
            continue
        if name in ("ours_sft", f"ours_sft_b{BATCH}", "trl_sft"):
            thr, unit, note = (
                r.get("tokens_per_s"),
                "tok/s",
                f"batch {r.get('batch')} x {r.get('seq_len')}",
            )
        elif name == "ours_reward":
            thr, unit, note = (
                r.get("comparisons_per_s"),
                "cmp/s",
                f"{r['prompts_per_step']} prompts x K={K}",
            )
        elif name == "trl_reward":
            thr, unit, note = r.get("pairs_per_s"), "pairs/s", f"{BATCH} pairs"
        elif name in ("ours_ppo", "ours_grpo"):
            thr, unit = r.get("completion_tokens_per_s"), "compl tok/s"
            note = "rollout {} / score {} / train {} s".format(
                fmt(r.get("perf_rollout_s"), 3),
                fmt(r.get("perf_score_s"), 3),
                fmt(r.get("perf_train_s"), 3),
            )
        elif name == "ours_rollout":
            best = max(r["runs"], key=lambda x: x["tokens_per_s"])
            thr, unit = best["tokens_per_s"], "gen tok/s"
            note = f"best: batch {best['batch']}, {best['cache']} cache (all settings below)"
        elif name == "trl_grpo":
            thr, unit = r.get("completion_tokens_per_s"), "compl tok/s"
            note = f"generate {fmt(r.get('generate_s_per_step'), 3)} s"
        else:
            thr, unit, note = None, "", ""
        rows.append(
            (
                name,
                "ok",
                fmt(r.get("median_s_per_step"), 4),
                fmt(thr, 1),
                unit,
                fmt(r.get("peak_mem_gb"), 2),
                note,
            )
        )
    lines = _table(rows)
    crow = [("ours vs TRL", "ours", "TRL", "ratio", "goal", "met")]
    for c in comps:
        crow.append(
            (
                c["metric"],
                fmt(c["ours"], 2),
                fmt(c["trl"], 2),
                (fmt(c["ratio"], 2) + "x") if c["ratio"] else "-",
                (("<= " if "peak" in c["metric"] else ">= ") + fmt(c["goal"], 1) + "x")
                if c["goal"]
                else "-",
                {True: "yes", False: "NO", None: "-"}[c["meets_goal"]],
            )
        )
    return lines + "\n\n" + _table(crow)


def _table(rows) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def env_info(args) -> dict:
    info = dict(
        bench="env",
        size=args.size,
        python=platform.python_version(),
        torch=torch.__version__,
        cuda_available=CUDA,
        device=str(peer.DEVICE),
        dtype=str(peer.DTYPE),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        gpu=torch.cuda.get_device_name(0) if CUDA else None,
        gpu_mem_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        if CUDA
        else None,
    )
    for pkg in ("transformers", "peft", "trl", "accelerate", "datasets"):
        info[pkg] = peer.pkg_version(pkg)
    return info


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", choices=sorted(STEPS), default="tiny")
    ap.add_argument(
        "--only",
        default=",".join(k for k, _, _ in BENCHES),
        help="comma list of: " + ",".join(k for k, _, _ in BENCHES),
    )
    ap.add_argument(
        "--steps", type=int, default=None, help="timed steps for SFT / reward (and TRL's)"
    )
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps for SFT / reward")
    ap.add_argument("--rl-steps", type=int, default=None, help="timed PPO / GRPO steps")
    ap.add_argument(
        "--sft-batch",
        type=lambda v: v if v == "auto" else int(v),
        default=BATCH,
        help='our SFT micro-batch (TRL: 8), or "auto" (from free GPU memory)',
    )
    ap.add_argument(
        "--rm-batch",
        type=lambda v: v if v == "auto" else int(v),
        default=(2 * BATCH) // K,
        help='our reward-model prompts per step (4 x K=4 = TRL\'s 16 sequences), or "auto"',
    )
    ap.add_argument(
        "--grad-ckpt",
        choices=["trl-default", "on", "off"],
        default="trl-default",
        help="gradient checkpointing in TRL's trainers (TRL 1.16 default: on); ours is off",
    )
    ap.add_argument(
        "--max-bench-s", type=float, default=None, help="TRL per-trainer wall guard (s)"
    )
    ap.add_argument(
        "--rollout-batches",
        default=None,
        help="comma list of rollout batch sizes for ours_rollout (default: per size)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument(
        "--out",
        default=None,
        help="result file (default: $OUT/engine-bench.json or ./engine-bench.json)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    size = dict(peer.SIZES[args.size])
    steps = dict(STEPS[args.size])
    ctx = {k: v for k, v in size.items() if k != "model"}
    ctx.update(steps)
    if args.steps is not None:
        ctx["steps"] = args.steps
    if args.warmup is not None:
        ctx["warmup"] = args.warmup
    if args.rl_steps is not None:
        ctx["rl_steps"] = args.rl_steps
    ctx["grpo_completion"] = steps["grpo_completion"]
    ctx["max_bench_s"] = (
        args.max_bench_s if args.max_bench_s is not None else size.get("max_bench_s")
    )
    ctx["sft_batch"] = args.sft_batch
    ctx["rm_batch"] = args.rm_batch
    if args.rollout_batches:
        ctx["rollout_batches"] = [int(b) for b in args.rollout_batches.split(",")]
    ctx["grad_ckpt"] = {"trl-default": None, "on": True, "off": False}[args.grad_ckpt]
    ctx["grad_ckpt_ours"] = False
    ctx["peak_tflops"] = peer.peak_tflops(None)
    out_path = args.out or os.path.join(os.environ.get("OUT") or ".", "engine-bench.json")
    workdir = tempfile.mkdtemp(prefix="engine_bench_")
    ctx["workdir"] = workdir

    env = env_info(args)
    print(json.dumps(env), flush=True)
    log(
        f"size={args.size} device={peer.DEVICE} dtype={peer.DTYPE}; building the peer's tokenizer + model"
    )
    A = peer.Assets(size, workdir)
    model_rec = dict(
        bench="setup",
        status="ok",
        arch="Qwen2ForCausalLM (random init)",
        **size["model"],
        n_params_total=A.n_total,
        tokenizer_vocab=A.tok_vocab,
        assets_setup_s=A.setup_s,
        lora=dict(r=16, alpha=32, dropout=0.05, target_modules=peer.LORA_TARGETS),
    )
    print(json.dumps(model_rec), flush=True)

    wanted = {x.strip() for x in args.only.split(",") if x.strip()}
    results: dict[str, dict] = {}
    try:
        for key, name, fn in BENCHES:
            if key not in wanted:
                continue
            peer.cleanup()
            log(f"--- {name} ---")
            t0 = time.time()
            try:
                rec = fn(A, ctx)
                rec["status"] = "ok"
            except SkipBench as exc:
                rec = dict(bench=name, status="skipped", reason=str(exc))
                log(f"{name} SKIPPED: {exc}")
            except Exception as exc:  # one failure must not hide the others
                rec = dict(
                    bench=name,
                    status="error",
                    error=f"{type(exc).__name__}: {exc}"[:2000],
                    traceback=traceback.format_exc()[-4000:],
                )
                log(f"{name} FAILED: {type(exc).__name__}: {exc}")
            rec["wall_s"] = round(time.time() - t0, 2)
            rec = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in rec.items()}
            results[name] = rec
            print(json.dumps(rec, default=str), flush=True)
    except KeyboardInterrupt:  # a time limit (timeout --signal=INT): report what finished
        log("INTERRUPTED; writing the results measured so far")
    peer.cleanup()

    comps = comparisons(results)
    for c in comps:
        print(json.dumps({"bench": "ratio", **c}, default=str), flush=True)
    payload = dict(
        env=env,
        size=args.size,
        model=model_rec,
        ctx={k: v for k, v in ctx.items() if k != "workdir"},
        results=list(results.values()),
        comparisons=comps,
        total_wall_s=round(time.time() - peer.T_START, 2),
    )
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=2, default=str)
    os.replace(tmp, out_path)

    print(
        f"\n=== engine vs TRL: size={args.size} device={peer.DEVICE} ({env.get('gpu') or platform.processor() or 'cpu'}) "
        f"dtype={peer.DTYPE}, LoRA r=16, batch {BATCH} ==="
    )
    print(summary_table(results, comps))
    n_err = sum(r.get("status") == "error" for r in results.values())
    n_ok = sum(r.get("status") == "ok" for r in results.values())
    n_skip = sum(r.get("status") == "skipped" for r in results.values())
    print(
        f"{n_ok} ok, {n_skip} skipped, {n_err} failed; total wall {time.time() - peer.T_START:.1f}s; "
        f"results -> {out_path}",
        flush=True,
    )
    shutil.rmtree(workdir, ignore_errors=True)
    return 0 if n_err == 0 else 2


if __name__ == "__main__":
    sys.exit(main())
