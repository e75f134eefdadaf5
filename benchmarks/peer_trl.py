# ruff: noqa
# Vendored verbatim from the peer benchmark ../shared/peer-bench/bench_trl.py (the TRL 1.16 anchor used
# for docs/benchmarks.md), so that benchmarks/engine.py builds the SAME model, tokenizer and data and runs
# the SAME TRL trainers on any machine with this repository. Do not edit: refresh it from the source instead.

#!/usr/bin/env python3
"""TRL throughput anchor: peer-baseline benchmark for Hugging Face TRL trainers.

Self-contained: random-weight Qwen2-architecture models (AutoModelForCausalLM.from_config), a byte-level BPE
tokenizer trained on synthetic text at start-up, synthetic datasets, no downloads (HF_HUB_OFFLINE=1).

Benchmarks (each isolated; an exception in one is reported and the others still run):
  1. trl_sft       TRL SFTTrainer, prompt/completion text, LoRA                        -> tokens/s
  2. trl_reward    TRL RewardTrainer, explicit-prompt chosen/rejected pairs, LoRA     -> pairs/s, tokens/s
  3. trl_grpo      TRL GRPOTrainer, rule-based reward, transformers generate, LoRA    -> s/step, completion tokens/s
  4. torch_roofline  plain-torch LoRA forward+backward(+AdamW) at the SFT shape, no trainer overhead
                     (gradient checkpointing off and on) and forward-only tokens/s;
     gpu_matmul    8192^3 bf16 matmul TFLOP/s (GPU only)

MFU convention (read this before quoting MFU numbers): flops/token = 6*N where N = parameters taking part in
matmuls per token (all non-embedding weights + the LM head, which is the tied embedding; the input embedding
lookup is free). 6N = 2N forward + 4N backward, which is the FULL fine-tuning count. With LoRA the frozen base
weights get no weight-gradient matmul, so the real backward is ~2N (activation grads only) and the real total is
~4N without gradient checkpointing, ~6N with it (checkpointing re-runs the 2N forward). So "mfu_6N" is an
upper-bound convention for LoRA, comparable across frameworks; "mfu_4N" (= 2/3 of it) is the LoRA-true figure
when checkpointing is off. Attention score FLOPs (~12*L*H*S per token) are ignored (~6% at S=512 for the base).
Peak = datasheet dense bf16 (989 TFLOP/s for H100/H200 SXM); "mfu_6N_vs_matmul" uses the measured 8192^3 matmul.

Usage: python3 bench_trl.py --size tiny|small|base [--only sft,reward,grpo,roofline,matmul]
Results: one JSON object per benchmark on stdout, a summary table, and $OUT/anchor.json (else ./anchor.json),
rewritten after every benchmark so a killed run keeps what finished.
"""

import os

# Offline and quiet, before any Hugging Face import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import argparse
import gc
import json
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings

T_START = time.time()

import numpy as np
import torch

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

# --------------------------------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------------------------------
SIZES = {
    # CPU smoke test: whole script < 3 min on 2 cores.
    "tiny": dict(
        model=dict(
            hidden_size=128,
            intermediate_size=352,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=4096,
            max_position_embeddings=2048,
        ),
        seq=64,
        sft_prompt=16,
        rm_prompt=16,
        grpo_prompt=16,
        grpo_completion=16,
        warmup=2,
        steps=20,
        grpo_warmup=1,
        grpo_steps=5,
        roof_warmup=2,
        roof_steps=10,
        max_bench_s=None,
    ),
    # In between: ~40M params.
    "small": dict(
        model=dict(
            hidden_size=512,
            intermediate_size=1792,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=32000,
            max_position_embeddings=32768,
        ),
        seq=512,
        sft_prompt=64,
        rm_prompt=64,
        grpo_prompt=64,
        grpo_completion=128,
        warmup=3,
        steps=20,
        grpo_warmup=2,
        grpo_steps=5,
        roof_warmup=3,
        roof_steps=20,
        max_bench_s=90,
    ),
    # Qwen2.5-0.5B shape with a 32k vocab.
    "base": dict(
        model=dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=32000,
            max_position_embeddings=32768,
        ),
        seq=512,
        sft_prompt=64,
        rm_prompt=64,
        grpo_prompt=64,
        grpo_completion=128,
        warmup=3,
        steps=20,
        grpo_warmup=2,
        grpo_steps=5,
        roof_warmup=3,
        roof_steps=20,
        max_bench_s=90,
    ),
}
BATCH = (
    8  # per-device batch: SFT sequences, RM pairs, GRPO completions (= 1 prompt x 8 generations)
)
NUM_GENERATIONS = 8
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2: pad, bos-of-turn, eos
PAD, EOS = "<|endoftext|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Datasheet dense bf16 peaks (TFLOP/s); matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = [
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H800", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 125.0),
    ("B200", 2250.0),
]

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32


def log(msg):
    print(f"[bench_trl {time.time() - T_START:7.1f}s] {msg}", file=sys.stderr, flush=True)


def sync():
    if CUDA:
        torch.cuda.synchronize()


def cleanup():
    gc.collect()
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mem_gb():
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if CUDA else None


def pkg_version(name):
    try:
        import importlib.metadata as md

        return md.version(name)
    except Exception:
        return None


def peak_tflops(override):
    if override:
        return float(override)
    if not CUDA:
        return None
    name = torch.cuda.get_device_name(0)
    for key, val in PEAK_BF16_TFLOPS:
        if key in name:
            return val
    return None


# --------------------------------------------------------------------------------------------------------------------
# Synthetic text, tokenizer, model
# --------------------------------------------------------------------------------------------------------------------
class Assets:
    """Tokenizer + model config + saved checkpoint + synthetic text generator with exact token-length control."""

    def __init__(self, size_cfg, workdir, seed=0):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

        t0 = time.time()
        mcfg = size_cfg["model"]
        vocab = mcfg["vocab_size"]
        rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)

        # Lexicon of pseudo-words with a Zipf frequency profile.
        cons, vows, codas = "bcdfghjklmnprstvwz", "aeiou", ["", "n", "r", "s", "l"]
        syll = [c + v + k for c in cons for v in vows for k in codas]
        words = set()
        while len(words) < vocab:
            words.add("".join(rng.choice(syll) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))))
        lex = sorted(words)
        rng.shuffle(lex)
        self.lex = lex
        ranks = np.arange(len(lex), dtype=np.float64)
        p = 1.0 / (ranks + 10.0) ** 1.1
        self.p = p / p.sum()

        # Byte-level BPE trained to the model's vocab size. Every line starts with a space so that every word is
        # seen (and later generated) as the ' word' pre-token: token counts then add up word by word.
        def corpus():
            order = list(range(len(lex)))
            rng.shuffle(order)
            for i in range(0, len(order), 64):
                yield "".join(" " + lex[j] for j in order[i : i + 64])
            n_extra = 8 * len(lex)
            sample = self.np_rng.choice(len(lex), size=n_extra, p=self.p)
            for i in range(0, n_extra, 64):
                yield "".join(" " + lex[j] for j in sample[i : i + 64])

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab,
            special_tokens=SPECIALS,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(corpus(), trainer=trainer)
        self.tokenizer_train_s = round(time.time() - t0, 2)
        self.tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            eos_token=EOS,
            pad_token=PAD,
            model_max_length=mcfg["max_position_embeddings"],
        )
        self.tokenizer.chat_template = CHAT_TEMPLATE
        self.tokenizer.padding_side = "right"
        self.tok_vocab = len(self.tokenizer)
        assert self.tok_vocab <= vocab, (self.tok_vocab, vocab)

        # Per-word token counts (as ' word'), and one-token words for exact length filling.
        enc = tok.encode_batch([" " + w for w in lex], add_special_tokens=False)
        self.counts = np.array([len(e.ids) for e in enc], dtype=np.int64)
        self.one_tok = np.nonzero(self.counts == 1)[0]
        assert len(self.one_tok) > 0, "no single-token words; cannot control lengths"

        # Model config (Qwen2 architecture) and a saved random-weight checkpoint + tokenizer.
        self.config = Qwen2Config(
            **mcfg,
            tie_word_embeddings=True,
            rms_norm_eps=1e-6,
            hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            use_sliding_window=False,
            attention_dropout=0.0,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            bos_token_id=None,
        )
        self.path = os.path.join(workdir, "model")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(self.config, dtype=DTYPE)
        model.generation_config.eos_token_id = self.tokenizer.eos_token_id
        model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        model.generation_config.bos_token_id = None
        self.n_total = sum(p.numel() for p in model.parameters())  # tied: lm_head counted once
        emb = model.get_input_embeddings().weight.numel()
        self.n_nonemb = self.n_total - emb
        h = mcfg["hidden_size"]
        self.n_matmul_lm = self.n_nonemb + mcfg["vocab_size"] * h  # + LM head matmul (tied weights)
        self.n_matmul_rm = self.n_nonemb + h  # + score head (hidden -> 1)
        model.save_pretrained(self.path)
        self.tokenizer.save_pretrained(self.path)
        del model
        gc.collect()
        self.setup_s = round(time.time() - t0, 2)
        self._check_lengths()

    def text(self, n_tokens):
        """Space-led pseudo-text of exactly n_tokens tokens (no special tokens)."""
        idx = self.np_rng.choice(len(self.lex), size=max(n_tokens, 1), p=self.p)
        cs = np.cumsum(self.counts[idx])
        k = int(np.searchsorted(cs, n_tokens, side="right"))
        used = int(cs[k - 1]) if k > 0 else 0
        fill = self.np_rng.choice(self.one_tok, size=n_tokens - used)
        return "".join(" " + self.lex[i] for i in list(idx[:k]) + list(fill))

    def n_tokens(self, s):
        return len(self.tokenizer(s, add_special_tokens=False)["input_ids"])

    def _check_lengths(self):
        for n in (1, 7, 64, 200):
            a, b = self.text(n), self.text(n + 3)
            assert self.n_tokens(a) == n, (n, self.n_tokens(a))
            assert self.n_tokens(a + b) == 2 * n + 3
            assert self.n_tokens(a + EOS) == n + 1

    def load_lm(self):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.path, dtype=DTYPE)
        return model.to(DEVICE)

    def load_rm(self):
        from transformers import AutoModelForSequenceClassification

        cfg = self.config.__class__.from_dict(self.config.to_dict())
        cfg.num_labels = 1
        cfg.pad_token_id = self.tokenizer.pad_token_id
        torch.manual_seed(1)
        model = AutoModelForSequenceClassification.from_config(cfg, dtype=DTYPE)
        return model.to(DEVICE)


def lora_config(task_type):
    from peft import LoraConfig

    return LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        bias="none",
        target_modules=list(LORA_TARGETS),
        task_type=task_type,
    )


# --------------------------------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------------------------------
def make_step_timer(max_wall_s, min_steps):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time between consecutive optimizer-step ends (CUDA-synchronized): includes data loading, generation,
        forward, backward, optimizer and all trainer overhead. Also snapshots counters after every step."""

        def __init__(self):
            self.step_s, self.tokens, self.extra = [], [], []
            self.trainer = None
            self.counter = None  # callable returning a cumulative counter (e.g. completion tokens)
            self.stopped_early = False

        def on_train_begin(self, args, state, control, **kw):
            sync()
            self.t_begin = self.t_last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            t = time.perf_counter()
            self.step_s.append(t - self.t_last)
            self.t_last = t
            self.tokens.append(getattr(self.trainer, "_total_train_tokens", None))
            self.extra.append(self.counter() if self.counter else None)
            if max_wall_s and t - self.t_begin > max_wall_s and len(self.step_s) >= min_steps:
                self.stopped_early = True
                control.should_training_stop = True
            return control

    return StepTimer()


def summarize_steps(step_s, warmup):
    timed = step_s[warmup:]
    if not timed:
        raise RuntimeError(f"no timed steps (ran {len(step_s)} steps, warmup {warmup})")
    return dict(
        steps_timed=len(timed),
        warmup_steps=warmup,
        median_s_per_step=statistics.median(timed),
        mean_s_per_step=statistics.fmean(timed),
        min_s_per_step=min(timed),
        max_s_per_step=max(timed),
        warmup_s=[round(x, 4) for x in step_s[:warmup]],
    )


def counter_delta(series, warmup):
    if not series or series[-1] is None or len(series) <= warmup:
        return None
    start = series[warmup - 1] if warmup > 0 else 0
    return series[-1] - start


def add_mfu(rec, tokens_per_s, n_matmul, ctx, factor=6, key="mfu_6N"):
    rec[f"model_flops_per_token_{factor}N"] = factor * n_matmul
    rec[f"achieved_tflops_{factor}N"] = round(factor * n_matmul * tokens_per_s / 1e12, 3)
    pk = ctx["peak_tflops"]
    rec[key] = round(factor * n_matmul * tokens_per_s / (pk * 1e12), 4) if pk else None


def common_train_kwargs(ctx, name, max_steps):
    kw = dict(
        output_dir=os.path.join(ctx["workdir"], name),
        per_device_train_batch_size=BATCH,
        max_steps=max_steps,
        gradient_accumulation_steps=1,
        logging_steps=max_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        bf16=CUDA,
        fp16=False,
        seed=0,
        dataloader_pin_memory=CUDA,
        learning_rate=1e-4,
    )
    if ctx["grad_ckpt"] is not None:
        kw["gradient_checkpointing"] = ctx["grad_ckpt"]
    return kw


def trainer_record(rec, trainer, timer, warmup):
    rec.update(summarize_steps(timer.step_s, warmup))
    rec["stopped_early_by_time_guard"] = timer.stopped_early
    rec["gradient_checkpointing"] = bool(trainer.args.gradient_checkpointing)
    rec["bf16_autocast"] = bool(trainer.args.bf16)
    rec["trainable_params"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    rec["peak_mem_gb"] = peak_mem_gb()


# --------------------------------------------------------------------------------------------------------------------
# 1. SFT
# --------------------------------------------------------------------------------------------------------------------
def bench_sft(A, ctx):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    S, P, W, T = ctx["seq"], ctx["sft_prompt"], ctx["warmup"], ctx["steps"]
    n_rows = BATCH * (W + T) + BATCH
    # prompt + completion + EOS > S tokens, so TRL truncates every example to exactly S: no padding.
    ds = Dataset.from_dict(
        {
            "prompt": [A.text(P) for _ in range(n_rows)],
            "completion": [A.text(S - P + 8) for _ in range(n_rows)],
        }
    )
    t0 = time.time()
    model = A.load_lm()
    args = SFTConfig(**common_train_kwargs(ctx, "sft", W + T), max_length=S, packing=False)
    timer = make_step_timer(ctx["max_bench_s"], W + 2)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=A.tokenizer,
        peft_config=lora_config("CAUSAL_LM"),
        callbacks=[timer],
    )
    timer.trainer = trainer
    setup_s = time.time() - t0
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    rec = dict(bench="trl_sft", seq_len=S, batch=BATCH, prompt_tokens=P, setup_s=round(setup_s, 2))
    trainer_record(rec, trainer, timer, W)
    tok = counter_delta(timer.tokens, W)
    tok_per_step = tok / rec["steps_timed"] if tok is not None else BATCH * S
    rec["tokens_per_step"] = tok_per_step
    rec["tokens_counted_by"] = (
        "trainer._total_train_tokens" if tok is not None else "nominal batch*seq"
    )
    rec["tokens_per_s"] = tok_per_step / rec["median_s_per_step"]
    rec["samples_per_s"] = BATCH / rec["median_s_per_step"]
    add_mfu(rec, rec["tokens_per_s"], A.n_matmul_lm, ctx)
    del trainer, model
    return rec


# --------------------------------------------------------------------------------------------------------------------
# 2. Reward model
# --------------------------------------------------------------------------------------------------------------------
def bench_reward(A, ctx):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    S, P, W, T = ctx["seq"], ctx["rm_prompt"], ctx["warmup"], ctx["steps"]
    n_rows = BATCH * (W + T) + BATCH
    # Explicit-prompt preference format; TRL concatenates prompt+chosen, appends EOS, and DROPS (does not truncate)
    # pairs longer than max_length, so prompt + response + EOS is built to be exactly S tokens.
    ds = Dataset.from_dict(
        {
            "prompt": [A.text(P) for _ in range(n_rows)],
            "chosen": [A.text(S - P - 1) for _ in range(n_rows)],
            "rejected": [A.text(S - P - 1) for _ in range(n_rows)],
        }
    )
    t0 = time.time()
    model = A.load_rm()
    args = RewardConfig(**common_train_kwargs(ctx, "reward", W + T), max_length=S)
    timer = make_step_timer(ctx["max_bench_s"], W + 2)
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=A.tokenizer,
        peft_config=lora_config("SEQ_CLS"),
        callbacks=[timer],
    )
    timer.trainer = trainer
    n_kept = len(trainer.train_dataset)
    if n_kept < BATCH * (W + T):
        raise RuntimeError(f"RewardTrainer kept only {n_kept}/{n_rows} pairs (length filter)")
    setup_s = time.time() - t0
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    rec = dict(
        bench="trl_reward", seq_len=S, batch_pairs=BATCH, prompt_tokens=P, setup_s=round(setup_s, 2)
    )
    trainer_record(rec, trainer, timer, W)
    tok = counter_delta(timer.tokens, W)
    tok_per_step = tok / rec["steps_timed"] if tok is not None else 2 * BATCH * S
    rec["tokens_per_step"] = tok_per_step
    rec["tokens_counted_by"] = (
        "trainer._total_train_tokens" if tok is not None else "nominal 2*batch*seq"
    )
    rec["tokens_per_s"] = tok_per_step / rec["median_s_per_step"]
    rec["pairs_per_s"] = BATCH / rec["median_s_per_step"]
    add_mfu(rec, rec["tokens_per_s"], A.n_matmul_rm, ctx)
    del trainer, model
    return rec


# --------------------------------------------------------------------------------------------------------------------
# 3. GRPO
# --------------------------------------------------------------------------------------------------------------------
def bench_grpo(A, ctx):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    P, C, W, T = ctx["grpo_prompt"], ctx["grpo_completion"], ctx["grpo_warmup"], ctx["grpo_steps"]
    stats = {"completion_tokens": 0, "completions": 0, "gen_s": 0.0, "gen_calls": 0}

    def reward_len(completions, completion_ids=None, **kwargs):
        if completion_ids is not None:
            stats["completion_tokens"] += sum(len(c) for c in completion_ids)
        stats["completions"] += len(completions)
        return [-abs(len(c) - 200) / 200.0 for c in completions]

    n_prompts = (W + T) * BATCH // NUM_GENERATIONS + 16
    ds = Dataset.from_dict({"prompt": [A.text(P) for _ in range(n_prompts)]})
    t0 = time.time()
    model = A.load_lm()
    args = GRPOConfig(
        **common_train_kwargs(ctx, "grpo", W + T),
        num_generations=NUM_GENERATIONS,
        max_completion_length=C,
        use_vllm=False,
        log_completions=False,
        temperature=1.0,
    )
    timer = make_step_timer(ctx["max_bench_s"], W + 2)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_len,
        args=args,
        train_dataset=ds,
        processing_class=A.tokenizer,
        peft_config=lora_config("CAUSAL_LM"),
        callbacks=[timer],
    )
    timer.trainer = trainer
    timer.counter = lambda: (stats["completion_tokens"], stats["completions"], stats["gen_s"])
    # Time the transformers.generate part (method exists in TRL 1.16; skipped silently if renamed).
    gen_fn = getattr(trainer, "_generate_single_turn", None)
    if gen_fn is not None:

        def timed_gen(*a, **k):
            sync()
            t = time.perf_counter()
            out = gen_fn(*a, **k)
            sync()
            stats["gen_s"] += time.perf_counter() - t
            stats["gen_calls"] += 1
            return out

        trainer._generate_single_turn = timed_gen
    setup_s = time.time() - t0
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    rec = dict(
        bench="trl_grpo",
        prompt_tokens=P,
        max_completion_length=C,
        num_generations=NUM_GENERATIONS,
        completions_per_step=BATCH,
        prompts_per_step=BATCH // NUM_GENERATIONS,
        generation="transformers",
        setup_s=round(setup_s, 2),
    )
    trainer_record(rec, trainer, timer, W)
    ex = timer.extra
    start = ex[W - 1] if W > 0 else (0, 0, 0.0)
    comp_tok = ex[-1][0] - start[0]
    n_comp = ex[-1][1] - start[1]
    gen_s = ex[-1][2] - start[2]
    n = rec["steps_timed"]
    rec["completion_tokens_per_step"] = comp_tok / n
    rec["mean_completion_len"] = comp_tok / max(n_comp, 1)
    rec["completion_tokens_per_s"] = rec["completion_tokens_per_step"] / rec["median_s_per_step"]
    rec["completions_per_s"] = BATCH / rec["median_s_per_step"]
    rec["generate_s_per_step"] = gen_s / n if gen_fn is not None else None
    rec["generate_fraction"] = (gen_s / sum(timer.step_s[W:])) if gen_fn is not None else None
    rec["gen_only_tokens_per_s"] = (comp_tok / gen_s) if gen_fn is not None and gen_s > 0 else None
    del trainer, model
    return rec


# --------------------------------------------------------------------------------------------------------------------
# 4. Plain-torch roofline (LoRA fwd+bwd without trainer) and matmul
# --------------------------------------------------------------------------------------------------------------------
def bench_roofline(A, ctx):
    from peft import get_peft_model

    S, W, T = ctx["seq"], ctx["roof_warmup"], ctx["roof_steps"]
    V = A.config.vocab_size
    rec = dict(
        bench="torch_roofline",
        seq_len=S,
        batch=BATCH,
        tokens_per_step=BATCH * S,
        dtype=str(DTYPE),
        note="LoRA(r16) fwd+bwd+AdamW on random ids, bf16 autocast on GPU, no Trainer; "
        "fwd_only = eval+no_grad",
    )
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(3, V, (BATCH, S), generator=g).to(DEVICE)
    amp = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if CUDA
        else (lambda: torch.autocast("cpu", enabled=False))
    )

    for ckpt in (False, True):
        cleanup()
        model = get_peft_model(A.load_lm(), lora_config("CAUSAL_LM"))
        if ckpt:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            model.enable_input_require_grads()
        model.config.use_cache = False
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=CUDA)
        times = []
        for i in range(W + T):
            sync()
            t = time.perf_counter()
            with amp():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            times.append(time.perf_counter() - t)
        tag = "fwd_bwd_ckpt" if ckpt else "fwd_bwd"
        med = statistics.median(times[W:])
        rec[f"{tag}_median_s_per_step"] = med
        rec[f"{tag}_tokens_per_s"] = BATCH * S / med
        rec[f"{tag}_peak_mem_gb"] = peak_mem_gb()
        rec[f"{tag}_mfu_6N"] = (
            6 * A.n_matmul_lm * BATCH * S / med / (ctx["peak_tflops"] * 1e12)
            if ctx["peak_tflops"]
            else None
        )
        if not ckpt:
            # forward only (inference, no grad) on the same LoRA model
            model.eval()
            ftimes = []
            with torch.no_grad():
                for i in range(W + T):
                    sync()
                    t = time.perf_counter()
                    with amp():
                        model(input_ids=ids, use_cache=False)
                    sync()
                    ftimes.append(time.perf_counter() - t)
            fmed = statistics.median(ftimes[W:])
            rec["fwd_only_median_s_per_step"] = fmed
            rec["fwd_only_tokens_per_s"] = BATCH * S / fmed
            rec["fwd_only_mfu_2N"] = (
                2 * A.n_matmul_lm * BATCH * S / fmed / (ctx["peak_tflops"] * 1e12)
                if ctx["peak_tflops"]
                else None
            )
        del model, opt, params
    rec.update(
        steps_timed=T,
        warmup_steps=W,
        median_s_per_step=rec["fwd_bwd_median_s_per_step"],
        tokens_per_s=rec["fwd_bwd_tokens_per_s"],
        peak_mem_gb=rec["fwd_bwd_peak_mem_gb"],
    )
    add_mfu(rec, rec["tokens_per_s"], A.n_matmul_lm, ctx)
    add_mfu(rec, rec["tokens_per_s"], A.n_matmul_lm, ctx, factor=4, key="mfu_4N")
    return rec


def bench_matmul(A, ctx):
    if CUDA:
        n, dt, iters, warm = 8192, torch.bfloat16, 10, 3
    else:
        n, dt, iters, warm = 1024, torch.float32, 5, 2  # CPU code-path check only
    a = torch.randn(n, n, dtype=dt, device=DEVICE)
    b = torch.randn(n, n, dtype=dt, device=DEVICE)
    for _ in range(warm):
        a @ b
    sync()
    if CUDA:
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(iters):
            a @ b
        e1.record()
        torch.cuda.synchronize()
        secs = e0.elapsed_time(e1) / 1e3
    else:
        t = time.perf_counter()
        for _ in range(iters):
            a @ b
        secs = time.perf_counter() - t
    tflops = 2 * n**3 * iters / secs / 1e12
    pk = ctx["peak_tflops"]
    return dict(
        bench="gpu_matmul" if CUDA else "cpu_matmul",
        n=n,
        dtype=str(dt),
        iters=iters,
        median_s_per_step=secs / iters,
        tflops=round(tflops, 2),
        fraction_of_datasheet_peak=round(tflops / pk, 4) if pk else None,
        peak_mem_gb=peak_mem_gb(),
    )


# --------------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------------
BENCHES = [
    ("sft", "trl_sft", bench_sft),
    ("reward", "trl_reward", bench_reward),
    ("grpo", "trl_grpo", bench_grpo),
    ("roofline", "torch_roofline", bench_roofline),
    ("matmul", "gpu_matmul", bench_matmul),
]


def env_info(args):
    info = dict(
        bench="env",
        size=args.size,
        python=platform.python_version(),
        platform=platform.platform(),
        torch=torch.__version__,
        cuda_available=CUDA,
        device=str(DEVICE),
        dtype=str(DTYPE),
        torch_cuda=torch.version.cuda,
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        gpu=torch.cuda.get_device_name(0) if CUDA else None,
        gpu_mem_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        if CUDA
        else None,
    )
    for pkg in (
        "transformers",
        "trl",
        "peft",
        "accelerate",
        "datasets",
        "tokenizers",
        "huggingface_hub",
        "numpy",
        "pyarrow",
        "safetensors",
        "dill",
        "multiprocess",
        "xxhash",
        "fsspec",
    ):
        info[pkg] = pkg_version(pkg)
    return info


def fmt(x, nd=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{nd}f}"
    return str(x)


def summary_table(results):
    rows = [
        (
            "bench",
            "status",
            "steps",
            "med s/step",
            "throughput",
            "unit",
            "peak GB",
            "MFU(6N)",
            "MFU/matmul",
        )
    ]
    for r in results:
        if r.get("bench") == "env":
            continue
        b = r["bench"]
        if r.get("status") != "ok":
            rows.append(
                (b, r.get("status", "?"), "-", "-", "-", r.get("error", "")[:60], "-", "-", "-")
            )
            continue
        if b == "trl_grpo":
            thr, unit = r.get("completion_tokens_per_s"), "compl tok/s"
        elif b in ("gpu_matmul", "cpu_matmul"):
            thr, unit = r.get("tflops"), "TFLOP/s"
        else:
            thr, unit = r.get("tokens_per_s"), "tok/s"
        rows.append(
            (
                b,
                "ok",
                fmt(r.get("steps_timed", r.get("iters"))),
                fmt(r.get("median_s_per_step"), 4),
                fmt(thr, 1),
                unit,
                fmt(r.get("peak_mem_gb"), 2),
                fmt(r.get("mfu_6N"), 3),
                fmt(r.get("mfu_6N_vs_matmul"), 3),
            )
        )
        if b == "trl_reward":
            rows.append(
                ("  (pairs)", "", "", "", fmt(r.get("pairs_per_s"), 2), "pairs/s", "", "", "")
            )
        if b == "trl_grpo":
            rows.append(
                (
                    "  (gen only)",
                    "",
                    "",
                    fmt(r.get("generate_s_per_step"), 4),
                    fmt(r.get("gen_only_tokens_per_s"), 1),
                    "gen tok/s",
                    "",
                    "",
                    "",
                )
            )
        if b == "torch_roofline":
            rows.append(
                (
                    "  (ckpt on)",
                    "",
                    "",
                    fmt(r.get("fwd_bwd_ckpt_median_s_per_step"), 4),
                    fmt(r.get("fwd_bwd_ckpt_tokens_per_s"), 1),
                    "tok/s",
                    fmt(r.get("fwd_bwd_ckpt_peak_mem_gb"), 2),
                    fmt(r.get("fwd_bwd_ckpt_mfu_6N"), 3),
                    "",
                )
            )
            rows.append(
                (
                    "  (fwd only)",
                    "",
                    "",
                    fmt(r.get("fwd_only_median_s_per_step"), 4),
                    fmt(r.get("fwd_only_tokens_per_s"), 1),
                    "tok/s",
                    "",
                    "2N:" + fmt(r.get("fwd_only_mfu_2N"), 3),
                    "",
                )
            )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def write_results(path, env, results, args, extra):
    payload = dict(
        env=env,
        size=args.size,
        args=vars(args),
        results=results,
        **extra,
        mfu_convention="flops/token = 6*N_matmul (2N fwd + 4N bwd, full-FT count): an upper-bound "
        "convention for LoRA (true ~4N without grad checkpointing, ~6N with it); "
        "attention-score FLOPs ignored; peak = datasheet dense bf16",
        total_wall_s=round(time.time() - T_START, 2),
    )
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument(
        "--only",
        default="sft,reward,grpo,roofline,matmul",
        help="comma list of: sft,reward,grpo,roofline,matmul",
    )
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps for sft/reward/roofline (default per size)",
    )
    ap.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="warm-up steps for sft/reward/roofline (default per size)",
    )
    ap.add_argument(
        "--grpo-steps", type=int, default=None, help="timed GRPO steps (default per size)"
    )
    ap.add_argument(
        "--grpo-warmup", type=int, default=None, help="GRPO warm-up steps (default per size)"
    )
    ap.add_argument(
        "--grad-ckpt",
        choices=["trl-default", "on", "off"],
        default="trl-default",
        help="gradient checkpointing in the TRL trainers (TRL 1.16 default: on)",
    )
    ap.add_argument(
        "--max-bench-s",
        type=float,
        default=None,
        help="per-trainer wall guard: stop a TRL run after this many seconds of training (keeps >= "
        "warmup+2 steps; default 90 for small/base, off for tiny; 0 = off)",
    )
    ap.add_argument(
        "--peak-tflops", type=float, default=None, help="override datasheet bf16 peak for MFU"
    )
    ap.add_argument(
        "--workdir", default=None, help="scratch dir (default: a new temp dir, removed at exit)"
    )
    ap.add_argument(
        "--out", default=None, help="result file (default: $OUT/anchor.json or ./anchor.json)"
    )
    args = ap.parse_args()

    sz = SIZES[args.size]
    out_path = args.out or os.path.join(os.environ.get("OUT") or ".", "anchor.json")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    own_workdir = args.workdir is None
    workdir = tempfile.mkdtemp(prefix="bench_trl_") if own_workdir else args.workdir
    os.makedirs(workdir, exist_ok=True)
    os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(workdir, "hf_datasets_cache"))

    ctx = dict(sz)
    ctx.pop("model")
    if args.steps is not None:
        ctx["steps"] = ctx["roof_steps"] = args.steps
    if args.warmup is not None:
        ctx["warmup"] = ctx["roof_warmup"] = args.warmup
    if args.grpo_steps is not None:
        ctx["grpo_steps"] = args.grpo_steps
    if args.grpo_warmup is not None:
        ctx["grpo_warmup"] = args.grpo_warmup
    if args.max_bench_s is not None:
        ctx["max_bench_s"] = args.max_bench_s or None
    ctx.update(
        workdir=workdir,
        peak_tflops=peak_tflops(args.peak_tflops),
        grad_ckpt={"trl-default": None, "on": True, "off": False}[args.grad_ckpt],
    )

    env = env_info(args)
    env["peak_bf16_tflops_datasheet"] = ctx["peak_tflops"]
    print(json.dumps(env, default=str), flush=True)

    results, extra = [], {}
    log(f"size={args.size} device={DEVICE} dtype={DTYPE}; building tokenizer + model in {workdir}")
    try:
        A = Assets(sz, workdir)
    except Exception as e:  # nothing can run without the assets
        rec = dict(
            bench="setup",
            status="error",
            error=f"{type(e).__name__}: {e}",
            traceback=traceback.format_exc()[-4000:],
        )
        print(json.dumps(rec), flush=True)
        write_results(out_path, env, [rec], args, extra)
        sys.exit(1)
    extra["model"] = dict(
        arch="Qwen2ForCausalLM (random init)",
        **sz["model"],
        tie_word_embeddings=True,
        n_params_total=A.n_total,
        n_params_non_embedding=A.n_nonemb,
        n_matmul_params_lm=A.n_matmul_lm,
        n_matmul_params_rm=A.n_matmul_rm,
        tokenizer_vocab=A.tok_vocab,
        tokenizer_train_s=A.tokenizer_train_s,
        assets_setup_s=A.setup_s,
        lora=dict(r=16, alpha=32, dropout=0.05, target_modules=LORA_TARGETS),
    )
    setup_rec = dict(bench="setup", status="ok", **extra["model"])
    print(json.dumps(setup_rec), flush=True)
    log(
        f"assets ready: params={A.n_total / 1e6:.1f}M (matmul N={A.n_matmul_lm / 1e6:.1f}M), "
        f"tokenizer vocab={A.tok_vocab} trained in {A.tokenizer_train_s}s"
    )

    wanted = [x.strip() for x in args.only.split(",") if x.strip()]
    for key, name, fn in BENCHES:
        if key not in wanted:
            continue
        cleanup()
        log(f"--- {name} ---")
        t0 = time.time()
        try:
            rec = fn(A, ctx)
            rec["status"] = "ok"
        except Exception as e:
            rec = dict(
                bench=name,
                status="error",
                error=f"{type(e).__name__}: {e}"[:2000],
                traceback=traceback.format_exc()[-4000:],
            )
            log(f"{name} FAILED: {type(e).__name__}: {e}")
        rec["wall_s"] = round(time.time() - t0, 2)
        cleanup()
        rec = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in rec.items()}
        results.append(rec)
        print(json.dumps(rec, default=str), flush=True)
        write_results(out_path, env, results, args, extra)

    # MFU against the measured matmul rate, when there is one.
    mm = next((r for r in results if r["bench"] == "gpu_matmul" and r.get("status") == "ok"), None)
    if mm:
        extra["measured_matmul_tflops"] = mm["tflops"]
        for r in results:
            if r.get("status") == "ok" and r.get("achieved_tflops_6N") is not None:
                r["mfu_6N_vs_matmul"] = round(r["achieved_tflops_6N"] / mm["tflops"], 4)
    write_results(out_path, env, results, args, extra)

    print(
        "\n=== TRL anchor summary: size=%s device=%s (%s) dtype=%s, LoRA r=16, batch=%d ==="
        % (args.size, DEVICE, env.get("gpu") or platform.processor() or "cpu", DTYPE, BATCH)
    )
    print(summary_table(results))
    print(
        "MFU(6N): 6*N_matmul*tokens/s / datasheet bf16 peak; upper-bound convention for LoRA (see docstring). "
        "N_matmul=%.1fM (LM), %.1fM (RM)." % (A.n_matmul_lm / 1e6, A.n_matmul_rm / 1e6)
    )
    n_ok = sum(r.get("status") == "ok" for r in results)
    print(
        f"{n_ok}/{len(results)} benchmarks ok; total wall {time.time() - T_START:.1f}s; results -> {out_path}",
        flush=True,
    )
    if own_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(0 if n_ok == len(results) else 2)


if __name__ == "__main__":
    main()
