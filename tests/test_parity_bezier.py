"""Bezier activations against the PyTorch reference fixtures."""
import re

import jax.numpy as jnp
import numpy as np
import pytest

from fluxflow_jax.interop.common import from_torch_layout
from fluxflow_jax.models import bezier
from parity_utils import assert_close_ref, cases, load_case, nchw_to_nhwc, nhwc_to_nchw

BEZIER_CASES = cases("BezierActivation")
TRAINABLE_CASES = cases("TrainableBezier")


def _pre(name):
    return None if name == "None" else name


@pytest.mark.parametrize("case", BEZIER_CASES, ids=lambda p: p.name)
def test_bezier_activation_matches_reference(case):
    _, io, _ = load_case(case)
    outs = [k for k in io if k.startswith("out_")]
    assert outs, f"no outputs in {case}"
    for key in outs:
        rank, t_pre, p_pre = re.fullmatch(r"out_(\d)d_t-(\w+)_p-(\w+)", key).groups()
        x = io[f"x_{rank}d"]
        if rank == "4":  # reference groups channels on axis 1; ours on the last axis
            y = nhwc_to_nchw(bezier.bezier_activation(jnp.asarray(nchw_to_nhwc(x)), _pre(t_pre), _pre(p_pre)))
        else:
            y = bezier.bezier_activation(jnp.asarray(x), _pre(t_pre), _pre(p_pre))
        assert_close_ref(y, io[key], key)


@pytest.mark.parametrize("case", TRAINABLE_CASES, ids=lambda p: p.name)
def test_trainable_bezier_matches_reference(case):
    cfg, io, weights = load_case(case)
    for name, kw in cfg["kwargs"].items():
        shape = kw["shape"]
        ours_shape = (int(np.prod(shape)),)
        kind = "c11" if len(shape) == 3 else "plain"
        params = {f"p{i}": from_torch_layout(weights[f"{name}.p{i}"], kind, ours_shape) for i in range(4)}
        mod = bezier.TrainableBezier(shape=ours_shape)
        for key in [k for k in io if k.startswith(name + "_out_")]:
            rank = key[-2]
            x = io[f"x_{rank}d"]
            if rank == "4":
                y = nhwc_to_nchw(mod.apply({"params": params}, jnp.asarray(nchw_to_nhwc(x))))
            else:
                y = mod.apply({"params": params}, jnp.asarray(x))
            assert_close_ref(y, io[key], key)


def test_bezier_rejects_channels_not_divisible_by_five():
    with pytest.raises(ValueError, match="divisible by 5"):
        bezier.bezier_activation(jnp.ones((2, 7)))


def test_bezier_grouping_is_consecutive_channels():
    # t=0 selects p0: with t-pre None, output f equals input channel 5f+1.
    x = np.zeros((1, 10), np.float32)
    x[0, 1], x[0, 6] = 3.0, -2.0
    y = bezier.bezier_activation(jnp.asarray(x), None, None)
    np.testing.assert_allclose(np.asarray(y), [[3.0, -2.0]])


@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
def test_ablation_widths_and_activation(act):
    assert bezier.act_width(8, "bezier") == 40
    assert bezier.act_width(8, act) == 8
    x = jnp.linspace(-2, 2, 16).reshape(2, 8)
    y = bezier.apply_act(x, act)
    assert y.shape == x.shape
    np.testing.assert_allclose(np.asarray(y), np.asarray(bezier.STANDARD_ACTIVATIONS[act](x)))
    with pytest.raises(ValueError, match="activation must be one of"):
        bezier.act_width(8, "tanhh")
