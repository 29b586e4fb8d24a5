"""Memory per device of the Phase 1 training steps: replicated (data parallel) against FSDP.

    python benchmarks/memory_per_device.py                      # 8 devices, ~10 min on 2 CPU cores
    python benchmarks/memory_per_device.py --devices 8 --cases vae512,vae1024,flow --remat

Nothing is allocated and nothing runs: each step is built exactly as training builds it
(``train.build_stage`` on ``configs/phase1.py`` for the VAE step and ``configs/phase2.py`` for the
flow step, ``train.create_state`` under ``jax.eval_shape``, ``train.state_shardings`` from the
config's mesh and rules, ``train.make_step_fns``), lowered with abstract inputs and compiled for
``--devices`` devices (fake CPU devices here: XLA partitions the program the same way it would for
8 GPUs/TPU cores, so the per-device sizes are the same model, batch and layout on an accelerator;
the CPU backend's temporaries - fusion and scheduling choices - differ from a GPU's, so read the
``temp`` column as an estimate and ``state`` as exact). Per device, from XLA's
``compiled.memory_analysis()``:

* ``state``: the train state's share (parameters, optimizer moments, EMA) - the arguments;
* ``temp``: activations and other temporaries of the step;
* ``peak``: arguments + outputs - donated aliases + temporaries.

Layouts: ``replicated`` = mesh ``(('data', N),)``, every device holds the whole state;
``fsdp`` = mesh ``(('fsdp', N),)`` with the default rule (every array's largest divisible dimension
sharded), the batch split over the same axis. The global batch is ``N x --per_device_batch``.
Results: a table on stdout and ``benchmarks/results/memory_per_device.json``.
"""
from __future__ import annotations

import argparse
import os
import sys

# fake devices must be requested before jax is imported
_N = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--devices=")), "8")
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={_N}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fluxflow_jax import train  # noqa: E402
from fluxflow_jax.models import registry  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = {  # name: (config file, stage, image px, step kind)
    "vae512": ("configs/phase1.py", "phase1_vae", 512, "vae"),
    "vae1024": ("configs/phase1.py", "phase1_vae", 1024, "vae"),
    "flow": ("configs/phase2.py", "phase2_flow", 512, "flow"),
}
LAYOUTS = {"replicated": lambda n: (("data", n),), "fsdp": lambda n: (("fsdp", n),)}


def _config(path: str):
    spec = importlib.util.spec_from_file_location("cfg", ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config("")


def measure(case: str, layout: str, n: int, per_device_batch: int, remat: bool) -> dict:
    cfg_path, stage, px, kind = CASES[case]
    config = _config(cfg_path)
    config.mesh = LAYOUTS[layout](n)
    config.batch_size = n * per_device_batch
    config.model.remat = remat
    config.stages[stage].epochs, config.stages[stage].steps = 0, 10_000  # no data to count epochs
    st = train.build_stage(config, stage, with_data=False)
    length = int(config.max_length)
    params, spectral = jax.eval_shape(
        lambda: registry.init_params(st.models, jax.random.key(0), (64, 64), length))
    state = jax.eval_shape(lambda p, s: train.create_state(st, p, s)[0], params, spectral)
    txs = train.make_txs(st.cfg, params, st.total_steps, stage)
    shardings = train.state_shardings(st, state)
    abstract = train.abstract_state(state, shardings)
    b = st.global_batch
    batch = {"image": jax.ShapeDtypeStruct((b, px, px, 3), jnp.float32),
             "input_ids": jax.ShapeDtypeStruct((b, length), jnp.int32),
             "attention_mask": jax.ShapeDtypeStruct((b, length), jnp.int32)}
    fn = train.make_step_fns(st, txs, shardings)[kind]
    t0 = time.perf_counter()
    compiled = fn.lower(abstract, batch, st.rng).compile()
    ma = compiled.memory_analysis()
    arg, out = int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes)
    alias, temp = int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes)
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
    return {"case": case, "step": kind, "layout": layout, "devices": n, "image": px,
            "global_batch": b, "per_device_batch": per_device_batch, "remat": remat,
            "params_total": n_params, "state_bytes": arg, "output_bytes": out,
            "alias_bytes": alias, "temp_bytes": temp, "peak_bytes": arg + out - alias + temp,
            "compile_s": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=int(_N))
    ap.add_argument("--cases", default="vae512,vae1024,flow")
    ap.add_argument("--layouts", default="replicated,fsdp")
    ap.add_argument("--per_device_batch", type=int, default=1)
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/memory_per_device.json"))
    a = ap.parse_args(argv)
    if jax.device_count() != a.devices:
        raise SystemExit(f"--devices={a.devices} but jax sees {jax.device_count()} devices "
                         "(XLA_FLAGS was already set?)")
    gib = 2 ** 30
    rows = []
    print(f"{'case':8s} {'layout':10s} {'batch':>5s} {'state GiB':>9s} {'temp GiB':>9s} "
          f"{'peak GiB':>9s} {'compile s':>9s}")
    for case in a.cases.split(","):
        for layout in a.layouts.split(","):
            r = measure(case, layout, a.devices, a.per_device_batch, a.remat)
            rows.append(r)
            print(f"{case:8s} {layout:10s} {r['global_batch']:5d} {r['state_bytes'] / gib:9.3f} "
                  f"{r['temp_bytes'] / gib:9.3f} {r['peak_bytes'] / gib:9.3f} "
                  f"{r['compile_s']:9.1f}", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                               "backend": jax.default_backend(), "jax": jax.__version__,
                               "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
