"""Bezier activation behaviour beyond the reference fixtures (those run in test_parity.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fluxflow_jax.models import bezier


def test_bezier_rejects_channels_not_divisible_by_five():
    with pytest.raises(ValueError, match="divisible by 5"):
        bezier.bezier_activation(jnp.ones((2, 7)))


def test_bezier_grouping_is_consecutive_channels():
    # t=0 selects p0: with no t pre-activation, output f equals input channel 5f+1.
    x = np.zeros((1, 10), np.float32)
    x[0, 1], x[0, 6] = 3.0, -2.0
    y = bezier.bezier_activation(jnp.asarray(x), None, None)
    np.testing.assert_allclose(np.asarray(y), [[3.0, -2.0]])


def test_bezier_endpoints_and_gradient():
    # t -> 1 selects p3; gradient flows to every control point.
    x = jnp.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
    np.testing.assert_allclose(bezier.bezier_activation(x, None, None), [[5.0]])
    g = jax.grad(lambda v: bezier.bz_ss(v).sum())(jnp.linspace(-1, 1, 10).reshape(1, 10))
    assert np.all(np.isfinite(g)) and np.count_nonzero(np.asarray(g)) == 10


def test_unknown_pre_activation_raises():
    with pytest.raises(ValueError, match="pre-activation"):
        bezier.bezier_activation(jnp.ones((1, 5)), "softplus")


@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
def test_ablation_widths_and_activation(act):
    assert bezier.act_width(8, "bezier") == 40
    assert bezier.act_width(8, act) == 8
    x = jnp.linspace(-2, 2, 16).reshape(2, 8)
    np.testing.assert_allclose(np.asarray(bezier.apply_act(x, act)),
                               np.asarray(bezier.STANDARD_ACTIVATIONS[act](x)))
    tb = bezier.TrainableBezier(shape=(8,), activation=act)
    v = tb.init(jax.random.key(0), x)
    assert not v.get("params"), "ablated TrainableBezier must own no parameters"
    with pytest.raises(ValueError, match="activation must be one of"):
        bezier.act_width(8, "tanhh")


def test_head_site_follows_activation_unless_set():
    """The VAE's output sites: '' follows the model activation (ReLU clamps at 0), 'identity'
    is linear and parameter-free, 'bezier' keeps the trainable curve inside an ablation."""
    x = jnp.linspace(-2, 2, 24).reshape(8, 3)
    init = (-1.0, 0.25, 0.75, 1.0)
    site = bezier.head_site((3,), init, "relu", "", "rgb")
    assert float(site.apply(site.init(jax.random.key(0), x), x).min()) == 0.0
    lin = bezier.head_site((3,), init, "relu", "identity", "rgb")
    np.testing.assert_array_equal(np.asarray(lin(x)), np.asarray(x))
    bz = bezier.head_site((3,), init, "relu", "bezier", "rgb")
    assert set(bz.init(jax.random.key(0), x)["params"]) == {"p0", "p1", "p2", "p3"}
    with pytest.raises(ValueError, match="head_activation must be one of"):
        bezier.head_site((3,), init, "relu", "linear", "rgb")


def _plain_bezier(x, t_pre, p_pre):
    """The activation written out without the library's checkpoint (autodiff keeps its
    intermediates)."""
    g = x.reshape(x.shape[:-1] + (x.shape[-1] // 5, 5))
    tf, pf = bezier.PRE_ACTIVATIONS[t_pre], bezier.PRE_ACTIVATIONS[p_pre]
    return bezier.bezier_curve(tf(g[..., 0]), pf(g[..., 1]), pf(g[..., 2]), pf(g[..., 3]),
                               pf(g[..., 4]))


@pytest.mark.parametrize("pres", [("sigmoid", "silu"), ("sigmoid", None)])
def test_bezier_backward_recomputes_from_its_input(pres):
    """Same values and gradients as autodiff of the written-out curve, and less live memory in
    a compiled gradient through three conv -> Bezier sites: the backward keeps only each site's
    input."""
    r = np.random.default_rng(0)
    x = jnp.asarray(r.standard_normal((4, 32, 32, 16)), jnp.float32)
    ws = [jnp.asarray(r.standard_normal((3, 3, 16, 80)) * 0.2, jnp.float32) for _ in range(3)]

    def loss(act):
        def f(ws, x):
            h = x
            for w in ws:
                h = act(jax.lax.conv_general_dilated(h, w, (1, 1), "SAME",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC")),
                        *pres)
            return jnp.sum(jnp.square(h))
        return f

    ours, plain = loss(bezier.bezier_activation), loss(_plain_bezier)
    y = x[..., :15]
    np.testing.assert_array_equal(bezier.bezier_activation(y, *pres), _plain_bezier(y, *pres))
    g_ours, g_plain = jax.grad(ours, (0, 1))(ws, x), jax.grad(plain, (0, 1))(ws, x)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))

    def live_bytes(f):
        ma = jax.jit(jax.grad(f, (0, 1))).lower(ws, x).compile().memory_analysis()
        return ma.temp_size_in_bytes
    assert live_bytes(ours) < live_bytes(plain), (live_bytes(ours), live_bytes(plain))


@pytest.mark.parametrize("pres", [("sigmoid", "silu"), ("sigmoid", None)])
def test_bezier_input_gradient_is_autodiffs_bit_for_bit_and_differentiable_again(pres):
    """The columns come from one split (gradient: one concatenation) where autodiff of five
    slices sums five zero-padded tensors: the same input gradient exactly, at the site. A
    gradient of a gradient (as a gradient penalty would take) matches too."""
    r = np.random.default_rng(1)
    x = jnp.asarray(r.standard_normal((2, 7, 40)), jnp.float32)
    ct = jnp.asarray(r.standard_normal((2, 7, 8)), jnp.float32)

    def grad_of(act):
        return jax.grad(lambda x: jnp.sum(act(x, *pres) * ct))

    np.testing.assert_array_equal(grad_of(bezier.bezier_activation)(x), grad_of(_plain_bezier)(x))

    def grad_norm_grad(act):
        return jax.grad(lambda x: jnp.sum(jnp.square(grad_of(act)(x))))(x)

    g2 = [grad_norm_grad(a) for a in (bezier.bezier_activation, _plain_bezier)]
    np.testing.assert_allclose(g2[0], g2[1], rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(g2[0]).max()) > 0
