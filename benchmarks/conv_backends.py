"""YNNPACK's convolutions vs XLA's own on CPU: the measurements behind ``fluxflow_jax.xla``.

Two parts, both in this one process, each pair compiled twice (``jax.jit`` as jaxlib defaults,
and with ``fluxflow_jax.xla.compiler_options()``, which takes convolutions out of YNNPACK) and
timed alternately:

* ``--grid``: a 3x3 same-width convolution, forward + both gradients, over batch x size x width;
  the crossover rule of ``xla.CONV_ELEMENTS_XLA`` comes from it.
* ``--cases``: whole gradient steps (loss + ``value_and_grad``) of ``benchmarks/_cases.py``,
  and what ``xla.jit`` chose for each.

    python benchmarks/conv_backends.py --grid --cases disc,disc64,vae16,vae32_128,flow,flow512
    python benchmarks/conv_backends.py --grid --shapes 2x128x128,8x32x64 \
        --dtypes float32,bfloat16 --out benchmarks/results/conv_backends_bf16.json

Prints a table and writes ``results/conv_backends.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

GRID = [(b, s, c) for b in (2, 8) for s in (16, 32, 64, 128) for c in (16, 32, 64, 128, 256)
        if b * s * s * c <= 2 ** 23 and (b == 2 or c >= 32)]


def _time_pair(f_default, f_xla, args, reps: int) -> tuple[float, float]:
    """Median seconds of each, alternating calls after one warm-up call each."""
    import jax

    for f in (f_default, f_xla):
        jax.block_until_ready(f(*args))
    ts: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(reps):
        for i, f in enumerate((f_default, f_xla)):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            ts[i].append(time.perf_counter() - t0)
    return statistics.median(ts[0]), statistics.median(ts[1])


def grid(reps: int, shapes: list[tuple[int, int, int]], dtypes: list[str]) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from fluxflow_jax import xla

    def loss(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.tanh(y.astype(jnp.float32)))
    g = jax.grad(loss, argnums=(0, 1))
    rows = []
    for dt in dtypes:
        for b, s, c in shapes:
            x = jax.random.normal(jax.random.key(0), (b, s, s, c)).astype(dt)
            w = (0.05 * jax.random.normal(jax.random.key(1), (3, 3, c, c))).astype(dt)
            td, tx = _time_pair(jax.jit(g), jax.jit(g, compiler_options=xla.compiler_options()),
                                (x, w), reps)
            rows.append({"dtype": dt, "batch": b, "size": s, "width": c,
                         "elements": b * s * s * c, "ynn_ms": td * 1e3, "xla_ms": tx * 1e3,
                         "ynn_over_xla": td / tx})
            print(f"  {dt:8s} B{b} {s:4d} px x {c:4d} ch  {b * s * s * c:>9d} el  YNNPACK "
                  f"{td * 1e3:8.2f} ms  XLA {tx * 1e3:8.2f} ms  ratio {td / tx:5.2f}", flush=True)
    return rows


def cases(names: list[str], reps: int) -> list[dict]:
    import jax

    from _cases import CASES, build_case
    from fluxflow_jax import xla

    rows = []
    for name in names:
        params, extra, parts, _, _ = build_case(CASES[name])
        names_, loss = parts[0]
        sub = {k: params[k] for k in names_}

        def step(p, ex, k, loss=loss, params=params):
            return jax.value_and_grad(lambda q: loss({**params, **q}, ex, k), has_aux=True)(p)
        key = jax.random.key(0)
        chooser = xla.jit(step)
        chooser.lower(sub, extra, key)
        td, tx = _time_pair(jax.jit(step), jax.jit(step, compiler_options=xla.compiler_options()),
                            (sub, extra, key), reps)
        pick = "XLA" if chooser.uses_xla_convolutions else "YNNPACK"
        best = "XLA" if tx < td else "YNNPACK"
        rows.append({"case": name, "ynn_ms": td * 1e3, "xla_ms": tx * 1e3, "ynn_over_xla": td / tx,
                     "xla_jit_picks": pick})
        print(f"  {name:12s} YNNPACK {td * 1e3:9.1f} ms  XLA {tx * 1e3:9.1f} ms  ratio "
              f"{td / tx:5.2f}  xla.jit picks {pick} (faster here: {best})", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", action="store_true", help="time the convolution grid")
    ap.add_argument("--shapes", default="", help="grid shapes as BxSIZExWIDTH,... (default: all)")
    ap.add_argument("--dtypes", default="float32", help="grid dtypes, comma list")
    ap.add_argument("--cases", default="", help="comma list of benchmarks/_cases.py cases")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(HERE / "results" / "conv_backends.json"))
    args = ap.parse_args()
    import jax

    from fluxflow_jax import xla
    if xla.compiler_options() is None:
        raise SystemExit("no CPU backend, or XLA_FLAGS already sets the YNN fusion types")
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
           "jax": jax.__version__, "reps": args.reps,
           "threshold_elements": xla.CONV_ELEMENTS_XLA}
    if args.grid:
        print("3x3 convolution, forward + both gradients (median ms):")
        shapes = ([tuple(int(v) for v in t.split("x")) for t in args.shapes.split(",")]
                  if args.shapes else GRID)
        out["grid"] = grid(args.reps, shapes, args.dtypes.split(","))
    if args.cases:
        print("whole gradient steps (median ms):")
        out["cases"] = cases([c for c in args.cases.split(",") if c], args.reps)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
