"""Parity checks for the Bezier activations (components BezierActivation, TrainableBezier)."""
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from fluxflow_jax.interop.common import from_torch_layout
from fluxflow_jax.models import bezier
from parity_utils import assert_close_ref, load_case, nchw_to_nhwc, nhwc_to_nchw


def _pre(name):
    return None if name == "None" else name


def check_bezier_activation(case: Path) -> None:
    _, io, _ = load_case(case)
    outs = [k for k in io if k.startswith("out_")]
    assert outs, f"no outputs in {case}"
    for key in outs:
        rank, t_pre, p_pre = re.fullmatch(r"out_(\d)d_t-(\w+)_p-(\w+)", key).groups()
        x = io[f"x_{rank}d"]
        if rank == "4":  # reference groups channels on axis 1; ours on the last axis
            y = nhwc_to_nchw(bezier.bezier_activation(jnp.asarray(nchw_to_nhwc(x)),
                                                      _pre(t_pre), _pre(p_pre)))
        else:
            y = bezier.bezier_activation(jnp.asarray(x), _pre(t_pre), _pre(p_pre))
        assert_close_ref(y, io[key], key)


def check_trainable_bezier(case: Path) -> None:
    cfg, io, weights = load_case(case)
    checked = 0
    for name, kw in cfg["kwargs"].items():
        shape = kw["shape"]
        ours = (int(np.prod(shape)),)
        kind = "c11" if len(shape) == 3 else "plain"
        params = {f"p{i}": from_torch_layout(weights[f"{name}.p{i}"], kind, ours) for i in range(4)}
        mod = bezier.TrainableBezier(shape=ours)
        for key in [k for k in io if k.startswith(name + "_out_")]:
            x = io[f"x_{key[-2]}d"]
            if x.ndim == 4:
                y = nhwc_to_nchw(mod.apply({"params": params}, jnp.asarray(nchw_to_nhwc(x))))
            else:
                y = mod.apply({"params": params}, jnp.asarray(x))
            assert_close_ref(y, io[key], key)
            checked += 1
    assert checked, f"no outputs checked in {case}"


CHECKS = {"BezierActivation": check_bezier_activation, "TrainableBezier": check_trainable_bezier}
