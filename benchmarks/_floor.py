"""Kernel floor of a benchmark case: the time its step's matmuls and convolutions alone take
with XLA:CPU's own kernels, each timed by itself at its exact shapes and parameters.

Why: the issue's targets are ratios to the reference, and after the allocator, dispatch and
layout work (benchmarks/README.md) the question left is whether a target is reachable at all on
a given CPU. Every ``dot_general`` and ``conv_general_dilated`` of the step - forward, the
backward that autodiff and our custom VJPs write, remat included - is collected from the step's
jaxpr, timed alone, and summed with its multiplicity. Everything else (element-wise work,
reductions, the optimizer, copies, dispatch) counts as free. So the floor is optimistic for us:
no arrangement of the same kernels runs the step faster, and ``ref / floor`` is the most any
such arrangement could reach against the reference's time in the same run. A convolution is
timed under both CPU convolution libraries (YNNPACK, XLA's; ``fluxflow_jax.xla``) and the faster
counts, so the floor does not depend on the per-step library choice either.
"""
from __future__ import annotations

import math
import time

OPS = ("dot_general", "conv_general_dilated")
WORK_FLOPS = 5e7     # each timed call runs about this much work (small ops are repeated)
MAX_COPIES = 32


def _key(eqn) -> str:
    avals = [(tuple(v.aval.shape), str(v.aval.dtype)) for v in eqn.invars]
    return f"{eqn.primitive.name}|{avals}|{sorted((k, repr(v)) for k, v in eqn.params.items())}"


def collect(jaxpr, mult: float = 1.0, found: dict | None = None) -> dict[str, dict]:
    """``{key: {eqn, count}}``: every matmul and convolution of ``jaxpr`` (a core ``Jaxpr``),
    sub-jaxprs included, with how many times one run of ``jaxpr`` executes it. A ``scan`` counts
    its body ``length`` times; a ``while`` or ``cond`` holding a matmul is refused (its trip
    count or branch is not known from the jaxpr)."""
    from fluxflow_jax.xla import _sub_jaxprs  # the same walk as the conv-library choice

    found = {} if found is None else found
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in OPS:
            found.setdefault(_key(eqn), {"eqn": eqn, "count": 0.0})["count"] += mult
            continue
        subs = list(_sub_jaxprs(eqn.params))
        if name in ("while", "cond"):
            if any(collect(j) for j in subs):
                raise ValueError(f"a {name} holding matmuls or convolutions: the kernel floor "
                                 "does not know how often it runs them")
            continue
        m = mult * (float(eqn.params["length"]) if name == "scan" else 1.0)
        for j in subs:
            collect(j, m, found)
    return found


def op_flops(eqn) -> float:
    """Multiply-adds x 2 of one matmul or convolution: output elements x contraction size."""
    out = math.prod(eqn.outvars[0].aval.shape)
    if eqn.primitive.name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return 2.0 * out * math.prod(lhs[i] for i in lc)
    rhs = eqn.invars[1].aval.shape
    spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
    kernel_in = rhs[spec[1]] * math.prod(rhs[i] for i in spec[2:])
    return 2.0 * out * kernel_in


def time_op(eqn, compiler_options: dict | None, reps: int = 5) -> float:
    """Best seconds of one run of ``eqn`` alone, jitted with ``compiler_options``; small ops run
    as several independent copies in one call so the call's own overhead is spread thin."""
    import jax
    import numpy as np

    copies = int(min(MAX_COPIES, max(1, WORK_FLOPS // max(op_flops(eqn), 1.0))))
    rng = np.random.default_rng(0)
    args = [[jax.device_put(rng.standard_normal(v.aval.shape).astype(v.aval.dtype))
             for v in eqn.invars] for _ in range(copies)]

    def run(all_args):
        return [eqn.primitive.bind(*a, **eqn.params) for a in all_args]

    fn = jax.jit(run, compiler_options=compiler_options)
    jax.block_until_ready(fn(args))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(args))
        best = min(best, time.perf_counter() - t0)
    return best / copies


def kernel_floor(jaxprs: list, reps: int = 5, per_op: list | None = None) -> dict:
    """The floor of one iteration made of ``jaxprs`` (one per optimizer step): ``{floor_ms,
    floor_gflop, ops, op_calls, conv_ms_xla, conv_ms_ynn}`` - the summed best time, the FLOPs it
    covers, distinct ops, op executions, and the convolutions' share under each library.
    ``per_op``, when a list, receives one dict per distinct op (its shapes, count, FLOPs and
    seconds per run under each library)."""
    from fluxflow_jax import xla

    found: dict[str, dict] = {}
    for j in jaxprs:
        collect(j, 1.0, found)
    xla_opts = xla.compiler_options()
    total = gflop = calls = conv_xla = conv_ynn = 0.0
    for item in found.values():
        eqn, n = item["eqn"], item["count"]
        t = t_ynn = time_op(eqn, None, reps)
        t_xla = None
        if eqn.primitive.name == "conv_general_dilated" and xla_opts:
            t_xla = time_op(eqn, xla_opts, reps)
            conv_xla, conv_ynn = conv_xla + n * t_xla, conv_ynn + n * t
            t = min(t, t_xla)
        if per_op is not None:
            per_op.append({"op": eqn.primitive.name, "count": n, "gflop": op_flops(eqn) / 1e9,
                           "shapes": [tuple(v.aval.shape) for v in (*eqn.invars, eqn.outvars[0])],
                           "s_default": t_ynn, "s_xla_conv": t_xla})
        total += n * t
        gflop += n * op_flops(eqn) / 1e9
        calls += n
    return {"floor_ms": round(1e3 * total, 2), "floor_gflop": round(gflop, 2),
            "floor_ops": len(found), "floor_op_calls": int(calls),
            "floor_conv_ms_xla": round(1e3 * conv_xla, 2),
            "floor_conv_ms_ynn": round(1e3 * conv_ynn, 2)}


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/_floor.py --case disc``: one case's kernel floor, its costliest ops
    with the time of each under both convolution libraries, and our step's time beside it."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    ap.add_argument("--case", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    import numpy as np
    from _cases import CASES
    from vs_reference import Ours

    if args.case not in CASES:
        ap.error(f"unknown case {args.case!r}; choose from {list(CASES)}")
    ours = Ours(CASES[args.case], args.dtype)
    ours.compile()
    ours.run()
    step = []
    for _ in range(5):
        t0 = time.perf_counter()
        ours.run()
        step.append(time.perf_counter() - t0)
    ops: list = []
    floor = kernel_floor(ours.jaxprs(), per_op=ops)
    print(f"{args.case}: step {1e3 * float(np.median(step)):.1f} ms (median of 5), {floor}")
    print(f"{'op':5s} {'count':>5s} {'GFLOP':>7s} {'ms (YNNPACK)':>12s} {'ms (XLA)':>9s}  shapes")
    for o in sorted(ops, key=lambda o: -o["count"] * min(o["s_default"], o["s_xla_conv"] or 1e9))[
            :args.top]:
        xla_ms = "-" if o["s_xla_conv"] is None else f"{1e3 * o['s_xla_conv']:.2f}"
        print(f"{o['op'][:4]:5s} {o['count']:5.0f} {o['gflop']:7.3f} {1e3 * o['s_default']:12.2f} "
              f"{xla_ms:>9s}  {o['shapes']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
