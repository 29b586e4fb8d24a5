"""PatchDiscriminator: spectral-norm semantics, interop round trip, reference manifest, errors."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fluxflow_jax.interop.common import InteropError, count_params
from fluxflow_jax.interop.discriminator import (disc_from_torch, disc_template, disc_to_torch,
                                                infer_disc_config)
from fluxflow_jax.models.discriminator import PatchDiscriminator, SNDense

MANIFEST = Path(__file__).parent / "fixtures" / "parity" / "manifest_phase1" / "D_img.keys.json"
TINY = dict(in_channels=3, base_ch=4, depth=2, ctx_dim=6)


def random_variables(config, seed=0):
    """Variables with the model's structure, filled by numpy (``init`` compiles one RNG kernel per
    shape, which costs tens of seconds on the shared CPU; init itself is tested on one layer)."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        if path[-1] in ("u", "v"):
            x = rng.standard_normal(s.shape)
            return (x / np.linalg.norm(x)).astype(np.float32)
        return (0.3 * rng.standard_normal(s.shape)).astype(np.float32)

    flat = traverse_util.flatten_dict(disc_template(config))
    return traverse_util.unflatten_dict({p: fill(p, s) for p, s in flat.items()})


def _init(config=TINY, hw=(8, 8), seed=0):
    model = PatchDiscriminator(**config)
    rng = np.random.default_rng(seed + 1)
    x = jnp.asarray(rng.standard_normal((2, *hw, config["in_channels"])), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, config["ctx_dim"])), jnp.float32)
    return model, random_variables(config, seed), x, ctx


def _train_apply(model, variables, x, ctx):
    """One jitted train-mode call (op-by-op dispatch is slow on the shared 2-core CPU)."""
    fn = jax.jit(lambda v, x, c: model.apply(v, x, c, train=True, mutable=["spectral"]))
    return fn(variables, x, ctx)


def _flat(tree):
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, dict(tree)))


def _assert_trees_equal(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=str(k))


def test_roundtrip_is_bit_identical_including_u_v():
    model, variables, x, ctx = _init()
    # Move u/v off their init values so the round trip is checked on trained-looking state.
    _, mutated = _train_apply(model, variables, x, ctx)
    variables = {"params": variables["params"], "spectral": mutated["spectral"]}
    sd = disc_to_torch(variables, TINY, prefix="D_img.")
    assert all(k.startswith("D_img.") for k in sd)
    assert sum(k.endswith("weight_u") for k in sd) == 2 + 4 * TINY["depth"] + 1 + 2
    back, config = disc_from_torch(sd, prefix="D_img.")
    assert config == TINY
    _assert_trees_equal(back, variables)
    again = disc_to_torch(back, config, prefix="D_img.")
    assert again.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(again[k], sd[k], err_msg=k)


def test_export_matches_reference_manifest_key_for_key():
    manifest = json.loads(MANIFEST.read_text())
    ref = {k: tuple(v) for k, v in manifest["keys"].items()}
    # The manifest keys carry no "D_img." prefix (the prefix is the trainer file's, added on save).
    assert not any(k.startswith("D_img.") for k in ref)
    config = dict(in_channels=3, base_ch=64, depth=4, ctx_dim=128)
    assert {k: manifest["config"][k] for k in manifest["config"]} == \
        {k: config[k] for k in manifest["config"]}
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), disc_template(config))
    sd = disc_to_torch(zeros, config)
    assert {k: v.shape for k, v in sd.items()} == ref
    assert infer_disc_config({k: np.zeros(s, np.float32) for k, s in ref.items()}) == config


def test_param_count_at_training_size():
    template = disc_template(dict(in_channels=3, base_ch=64, depth=4, ctx_dim=128))
    assert count_params(template) == 45_105_473
    assert count_params(disc_template(dict(in_channels=3, base_ch=64, depth=4, ctx_dim=0))) == \
        45_105_473 - (128 * 1024 + 1024 + 1024 * 1024 + 1024)


def test_rectangular_odd_input_and_batch_one():
    model, variables, _, _ = _init()
    x = jax.random.normal(jax.random.key(5), (1, 18, 26, 3))  # AvgPool floors: 18->9->4, 26->13->6
    ctx = jax.random.normal(jax.random.key(6), (1, TINY["ctx_dim"]))
    plain = jax.jit(model.apply)(variables, x)
    with_feats = jax.jit(lambda v, x, c: model.apply(v, x, c, return_feats=True))
    feats, cond = with_feats(variables, x, ctx)
    assert plain.shape == cond.shape == (1, 4, 6, 1)
    assert feats.shape == (1, TINY["base_ch"] * 2 ** TINY["depth"])
    # The projection term is one scalar per image, added to every patch logit.
    diff = np.asarray(cond - plain)
    np.testing.assert_allclose(diff, np.full_like(diff, diff.flat[0]), rtol=1e-5, atol=1e-6)
    assert abs(diff.flat[0]) > 1e-6


def test_eval_keeps_u_v_and_train_updates_them():
    model, variables, x, ctx = _init()
    _, eval_mut = jax.jit(lambda v: model.apply(v, x, ctx, mutable=["spectral"]))(variables)
    _assert_trees_equal(eval_mut["spectral"], variables["spectral"])
    _, train_mut = _train_apply(model, variables, x, ctx)
    before, after = _flat(variables["spectral"]), _flat(train_mut["spectral"])
    assert before.keys() == after.keys()
    # The head's u is [1] (one output channel): it stays +-1; every other vector moves.
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == {k for k in before if before[k].size > 1}
    assert all(abs(np.linalg.norm(v) - 1.0) < 1e-5 for v in after.values())
    with pytest.raises(ValueError, match="mutable=\\['spectral'\\]"):
        model.apply(variables, x, ctx, train=True)


def test_init_does_no_power_iteration():
    layer = SNDense(5)
    x = jnp.ones((1, 7))
    a = layer.init(jax.random.key(3), x, train=True)
    b = layer.init(jax.random.key(3), x, train=False)
    _assert_trees_equal(a, b)
    assert a["spectral"]["u"].shape == (5,) and a["spectral"]["v"].shape == (7,)
    assert all(abs(np.linalg.norm(v) - 1.0) < 1e-5 for v in _flat(a["spectral"]).values())
    # torch's default init bounds: U(+-1/sqrt(fan_in)) for weight and bias.
    assert np.abs(a["params"]["kernel"]).max() <= 7 ** -0.5


def test_discriminator_init_builds_every_layer_without_ctx():
    # ctx_proj exists after an init without context, as torch always builds it.
    shapes = jax.eval_shape(lambda k: PatchDiscriminator(**TINY).init(k, jnp.ones((1, 8, 8, 3))),
                            jax.random.key(0))
    assert _flat(shapes).keys() == _flat(disc_template(TINY)).keys()
    assert "ctx_proj" in shapes["params"] and "ctx_proj" in shapes["spectral"]


def test_power_iteration_step_and_convergence_to_spectral_norm():
    layer = SNDense(5)
    x = jax.random.normal(jax.random.key(0), (3, 7))
    variables = layer.init(jax.random.key(1), x)
    w = np.asarray(variables["params"]["kernel"]).T  # torch [out, in]
    u0 = np.asarray(variables["spectral"]["u"])
    _, mut = layer.apply(variables, x, train=True, mutable=["spectral"])
    v1 = w.T @ u0 / np.linalg.norm(w.T @ u0)
    u1 = w @ v1 / np.linalg.norm(w @ v1)
    np.testing.assert_allclose(mut["spectral"]["v"], v1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mut["spectral"]["u"], u1, rtol=1e-5, atol=1e-6)
    state = dict(variables)
    step = jax.jit(lambda s: layer.apply(s, x, train=True, mutable=["spectral"])[1])
    for _ in range(100):
        state = {"params": variables["params"], **step(state)}
    y = layer.apply(state, x)
    expected = x @ (w.T / np.linalg.norm(w, 2)) + np.asarray(variables["params"]["bias"])
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def test_gradient_flows_through_weights_not_u_v():
    model, variables, x, ctx = _init()

    def loss(params, spectral):
        out, _ = model.apply({"params": params, "spectral": spectral}, x, ctx, train=True,
                             mutable=["spectral"])
        return jnp.sum(out ** 2)

    g_params, g_spec = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"],
                                                               variables["spectral"])
    for k, g in _flat(g_params).items():
        assert np.all(np.isfinite(g)) and np.any(g != 0), f"no gradient for {k}"
    assert all(not np.any(g) for g in _flat(g_spec).values())


def test_sigma_is_differentiated_with_u_v_constant():
    layer = SNDense(4)
    x = jax.random.normal(jax.random.key(0), (2, 3))
    variables = layer.init(jax.random.key(1), x)
    u, v = (jnp.asarray(variables["spectral"][k]) for k in ("u", "v"))

    def ours(kernel):
        return jnp.sum(layer.apply({"params": {**variables["params"], "kernel": kernel},
                                    "spectral": variables["spectral"]}, x) ** 2)

    def manual(kernel):  # y = x W/sigma + b, sigma = u.(W v) with W = kernel^T
        sigma = u @ (kernel.T @ v)
        return jnp.sum((x @ (kernel / sigma) + variables["params"]["bias"]) ** 2)

    k = variables["params"]["kernel"]
    np.testing.assert_allclose(jax.grad(ours)(k), jax.grad(manual)(k), rtol=1e-4, atol=1e-6)


def test_passes_two_equals_two_successive_train_calls():
    """The D step's real+fake in one call: logits, stored u/v and gradients of two calls."""
    model, variables, x, ctx = _init(hw=(16, 12))
    rng = np.random.default_rng(5)
    x2 = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    ctx2 = jnp.asarray(rng.standard_normal(ctx.shape), jnp.float32)

    def two_calls(params, spectral):
        a, upd = model.apply({"params": params, "spectral": spectral}, x, ctx, train=True,
                             mutable=["spectral"])
        b, upd = model.apply({"params": params, "spectral": upd["spectral"]}, x2, ctx2,
                             train=True, mutable=["spectral"])
        return jnp.sum(a ** 2) - jnp.sum(b), (jnp.concatenate([a, b]), upd["spectral"])

    def one_call(params, spectral):
        out, upd = model.apply({"params": params, "spectral": spectral},
                               jnp.concatenate([x, x2]), jnp.concatenate([ctx, ctx2]),
                               train=True, mutable=["spectral"], passes=2)
        return jnp.sum(out[:2] ** 2) - jnp.sum(out[2:]), (out, upd["spectral"])

    (la, (oa, sa)), ga = jax.jit(jax.value_and_grad(two_calls, has_aux=True))(
        variables["params"], variables["spectral"])
    (lb, (ob, sb)), gb = jax.jit(jax.value_and_grad(one_call, has_aux=True))(
        variables["params"], variables["spectral"])
    # The chunks see different sigmas (one power iteration apart), not one shared scale.
    shared, _ = _train_apply(model, variables, jnp.concatenate([x, x2]),
                             jnp.concatenate([ctx, ctx2]))
    assert not np.allclose(np.asarray(shared[2:]), np.asarray(ob[2:]), rtol=1e-4, atol=0)
    np.testing.assert_allclose(ob, oa, rtol=2e-5, atol=1e-6)
    _assert_trees_equal(sb, sa)
    for k, g in _flat(gb).items():
        np.testing.assert_allclose(g, _flat(ga)[k], rtol=1e-4, atol=1e-5, err_msg=str(k))
    # Eval mode: every chunk uses the stored vectors, as separate eval calls do.
    ev = model.apply(variables, jnp.concatenate([x, x2]), jnp.concatenate([ctx, ctx2]),
                     passes=2)
    np.testing.assert_allclose(ev[2:], model.apply(variables, x2, ctx2), rtol=2e-5, atol=1e-6)
    with pytest.raises(ValueError, match="passes=3 must be >= 1 and divide the batch 4"):
        model.apply(variables, jnp.concatenate([x, x2]), jnp.concatenate([ctx, ctx2]),
                    passes=3)


def test_import_reports_every_problem_at_once():
    _, variables, _, _ = _init()
    sd = disc_to_torch(variables)
    del sd["backbone.2.conv1.0.weight_u"]
    sd["head.weight_orig"] = np.zeros((1, 3, 3, 3), np.float32)
    sd["backbone.9.bogus"] = np.zeros((1,), np.float32)
    with pytest.raises(InteropError) as e:
        disc_from_torch(sd, TINY)
    msg = str(e.value)
    assert "backbone.2.conv1.0.weight_u" in msg and "missing" in msg
    assert "head.weight_orig" in msg and "[1, 3, 3, 3]" in msg and "[1, 16, 3, 3]" in msg
    assert "backbone.9.bogus" in msg and "unexpected" in msg
    with pytest.raises(InteropError, match="backbone.0.0.weight_orig"):
        infer_disc_config({"head.bias": np.zeros(1)})
    with pytest.raises(InteropError, match="unknown PatchDiscriminator config keys"):
        disc_from_torch(disc_to_torch(variables), {**TINY, "base": 4})


def test_bad_inputs_raise():
    model, variables, x, ctx = _init()
    with pytest.raises(ValueError, match="ctx must be"):
        model.apply(variables, x, ctx[:, :3])
    with pytest.raises(ValueError, match="in_channels=3"):
        model.apply(variables, x[..., :2])
    plain = PatchDiscriminator(**{**TINY, "ctx_dim": 0})
    pv = random_variables({**TINY, "ctx_dim": 0})
    with pytest.raises(ValueError, match="ctx_dim=0"):
        plain.apply(pv, x, ctx)
    with pytest.raises(ValueError, match="'spectral'"):
        model.apply({"params": variables["params"]}, x)


_LAX_NHWC = ("NHWC", "HWIO", "NHWC")
CANONICAL = "b01f_01io->b01f"  # the convolution layout XLA:CPU maps to a library kernel


def conv_labels(hlo_text: str) -> list[str]:
    """The ``dim_labels`` of every convolution in compiled HLO text (test_xla uses it too)."""
    return [ln.split("dim_labels=")[1].split(",")[0] for ln in hlo_text.splitlines()
            if " convolution(" in ln]


@pytest.mark.parametrize("shape,k,pad", [((2, 9, 7, 3), 3, (1, 1)), ((2, 8, 8, 4), 3, (0, 0)),
                                         ((1, 6, 6, 2), 5, (2, 2)), ((2, 5, 6, 3), 3, (2, 1))])
def test_conv_stride1_and_its_first_and_second_gradients_equal_lax_conv_to_the_bit(shape, k, pad):
    """``layers.conv_stride1`` (the discriminator's convolution, and ``layers.Conv``'s at stride 1)
    computes what ``lax.conv_general_dilated`` does, and so do its input and kernel gradients and
    R1's gradient of a gradient: bit for bit, eagerly."""
    from fluxflow_jax.models.layers import conv_stride1

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, shape[-1], 4)), jnp.float32)
    plain = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), tuple((p, p) for p in pad), dimension_numbers=_LAX_NHWC)
    ours = lambda x, w: conv_stride1(x, w, pad)
    loss = lambda c: lambda x, w: jnp.sum(jnp.sin(c(x, w)))
    r1 = lambda c: lambda w: jnp.sum(jax.grad(loss(c))(x, w) ** 2)
    for a, b in [(plain(x, w), ours(x, w)),
                 *zip(jax.grad(loss(plain), (0, 1))(x, w), jax.grad(loss(ours), (0, 1))(x, w)),
                 (jax.grad(r1(plain))(w), jax.grad(r1(ours))(w))]:
        assert a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_conv_stride1_gradients_stay_in_the_library_layout_inside_lax_cond():
    """Inside a ``lax.cond`` branch XLA:CPU does not rewrite autodiff's gradient convolutions
    into its canonical layout and compiles them as plain loops (20-180x slower); conv_stride1's
    gradients are written in that layout, so every convolution of the compiled branch has it."""
    from fluxflow_jax.models.layers import conv_stride1

    x, g = jnp.ones((4, 8, 8, 16)), jnp.ones((4, 8, 8, 16))
    w = jnp.ones((3, 3, 16, 16))

    def hlo(conv):
        def f(x, g, w):
            grads = lambda: jax.vjp(conv, x, w)[1](g)
            return jax.lax.cond(jnp.sum(x) > 0, grads, lambda: (x, w))
        return jax.jit(f).lower(x, g, w).compile().as_text()

    plain = hlo(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                          dimension_numbers=_LAX_NHWC))
    ours = hlo(lambda x, w: conv_stride1(x, w, (1, 1)))
    assert len(conv_labels(plain)) == len(conv_labels(ours)) == 2  # dx, dW (no output used)
    assert set(conv_labels(plain)) != {CANONICAL}  # what the fix is for
    assert set(conv_labels(ours)) == {CANONICAL}
