#!/usr/bin/env bash
# Issue 11, item 4: the one prepared script for a lent GPU machine. The device tool runs it in the
# repository root and brings back what it writes under $OUT.
#
# Before the call, on this machine (the reference's sources travel as an ignored folder):
#   mkdir -p .refsrc/core .refsrc/training
#   git --git-dir=/work/.mirror/danny-mio+fluxflow-core/repo archive HEAD | tar -x -C .refsrc/core
#   git --git-dir=/work/.mirror/danny-mio+fluxflow-training/repo archive HEAD \
#       | tar -x -C .refsrc/training
# The call: command `bash benchmarks/gpu_session.sh`, carry [".refsrc"], timeout_s 560.
#
# What it does: writes what the machine has ($OUT/env.txt: the GPU, Python, and whether jax,
# flax, optax, torch, einops... import, with versions), then, within BUDGET_S seconds (default
# 480; `timeout` stops it), benchmarks/vs_reference.py with both sides on the GPU
# (--device gpu: fp32 as TF32 on both, and bf16) over the `gpu` suite of benchmarks/_cases.py,
# the Phase 1 sizes, fastest first. Every finished case is in $OUT/vs_reference_gpu.json.partial
# at once, so a run cut short keeps them; a case that fails (out of memory) is reported and the
# run goes on (--keep_going). Rows: step time, ref/ours, % of the measured 8192^2 matmul and MFU
# against the datasheet peak, device memory of both sides.
set -uo pipefail
OUT=${OUT:-runs/gpu_session}
BUDGET_S=${BUDGET_S:-480}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python3 - <<'PY'
import importlib
import sys

print("python", sys.version.split()[0])
for name in ("numpy", "jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "ml_collections",
             "safetensors", "transformers", "torch", "einops"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:  # report every missing piece, not only the first
        print(name, "MISSING:", type(e).__name__, e)
for probe in ("import jax; print('jax devices', jax.devices())",
              "import torch; print('torch cuda', torch.cuda.is_available(), torch.version.cuda)",
              "import fluxflow_jax; print('fluxflow_jax', fluxflow_jax.__file__)"):
    try:
        exec(probe)
    except Exception as e:
        print("FAILED:", probe, "->", type(e).__name__, e)
PY
} 2>&1 | tee "$OUT/env.txt"
timeout --signal=INT "$BUDGET_S" python3 benchmarks/vs_reference.py --device gpu --suite gpu \
    --dtypes float32,bfloat16 --threads 8 --warmup 2 --steps 5 --rounds 1 --ref_cap 0 \
    --torch_python python3 --ref_src .refsrc --keep_going --worker_timeout 300 \
    --out "$OUT/vs_reference_gpu.json" 2>&1 | tee "$OUT/vs_reference_gpu.txt"
echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/vs_reference_gpu.txt"
