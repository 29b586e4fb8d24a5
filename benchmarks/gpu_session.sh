#!/usr/bin/env bash
# Issue 11, item 4: the one prepared script for a lent GPU machine. The device tool runs it in the
# repository root and brings back what it writes under $OUT.
#
# Before the call, on this machine: `bash benchmarks/gpu_prepare.sh` (the reference's sources
# and the wheels of what the device may lack, as two ignored folders).
# The call: command `bash benchmarks/gpu_session.sh`, carry [".refsrc", ".devwheels"],
# timeout_s 560.
#
# What it does: installs, from .devwheels and into $DEPS, each package whose import fails there
# (the device cannot reach an index; `pip --no-index --no-deps`, so nothing it has is replaced);
# writes what the machine has ($OUT/env.txt: the GPU, Python, and whether jax,
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
DEPS=${DEPS:-/tmp/fluxflow_devdeps}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}:$DEPS"
{
  if [ -d .devwheels ]; then
    for pair in absl:absl_py etils:etils typing_extensions:typing_extensions msgpack:msgpack \
        yaml:pyyaml pygments:pygments rich:rich cloudpickle:cloudpickle filelock:filelock \
        safetensors:safetensors ml_collections:ml_collections einops:einops optax:optax \
        flax:flax; do
      mod=${pair%%:*}
      if ! python3 -c "import $mod" 2>/dev/null; then
        echo "installing ${pair##*:} from .devwheels (import $mod failed)"
        python3 -m pip install -q --no-index --no-deps --find-links .devwheels \
            --target "$DEPS" "${pair##*:}" || echo "FAILED: pip install ${pair##*:}"
      fi
    done
  fi
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
