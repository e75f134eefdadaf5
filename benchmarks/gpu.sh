#!/usr/bin/env bash
# Every GPU check and benchmark in one call, for a lent GPU machine (torch, transformers,
# peft and accelerate there; no Django, no internet). Output lands in $OUT.
#
# Prepare here, where pip reaches PyPI (TRL and the parts of `datasets` it needs, as wheels):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     -d var/gpu-wheels trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# then run it on the device with `carry: ["var/gpu-wheels"]`:
#   bash benchmarks/gpu.sh                 # --size base on the GPU
#   SIZE=tiny bash benchmarks/gpu.sh       # the same script on a CPU, to test it first
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-var/gpu-out}
SIZE=${SIZE:-base}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

{
  date -u
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "| transformers", transformers.__version__, "| peft", peft.__version__)'
} 2>&1 | tee "$OUT/env.txt"

if ls var/gpu-wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target var/extra-site var/gpu-wheels/*.whl \
    && export PYTHONPATH="$PWD/var/extra-site${PYTHONPATH:+:$PYTHONPATH}"
fi

# 1. The engine end to end on this device through the CLI (bf16 on a GPU that has it).
work=$(mktemp -d)
"$PY" -m rlhf tiny-model "$work/tiny"
"$PY" - "$work" <<'PY' 2>&1 | tee "$OUT/engine-smoke.txt"
import json, sys, time
from pathlib import Path
from rlhf.runner import run
work = Path(sys.argv[1]); model = str(work / "tiny")
ranked = [{"prompt": f"q{i}", "completions": [f"please answer {i}", f"no {i}"], "ranking": [[0], [1]]} for i in range(32)]
prompts = [{"prompt": f"q{i}"} for i in range(8)]
length = {"reward_fn": lambda p, c: float(len(c)) / 64}
for kind, data, extra in [
    ("sft", [{"prompt": f"q{i}", "completion": f"answer {i}"} for i in range(32)], {}),
    ("reward", ranked, {}),
    ("dpo", ranked, {}),
    ("grpo", prompts, length),  # rollouts with the static KV cache, compiled on a GPU
    ("ppo", prompts, length),
]:
    t = time.perf_counter()
    res = run(kind, {"model": model, "max_steps": 4, "batch_size": 4}, data, output_dir=work / kind, **extra)
    print(json.dumps({"smoke": kind, "ok": True, "step": res.step, "s": round(time.perf_counter() - t, 2)}))
PY

# 2. The benchmark, ours and TRL's in the same run: our SFT and reward micro-batches picked
# from the free GPU memory ("auto"), TRL with its defaults. Each result is printed (and kept
# in engine-bench.txt) as soon as it is measured, so a run cut short by the time limit still
# reports the pairs it finished.
timeout --signal=INT "${BENCH_LIMIT_S:-450}" "$PY" benchmarks/engine.py --size "$SIZE" \
  --sft-batch auto --rm-batch auto --out "$OUT/engine-bench.json" 2>&1 \
  | tee "$OUT/engine-bench.txt"
echo "done: $OUT"
