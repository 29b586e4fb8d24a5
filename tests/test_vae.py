"""FluxCompressor / FluxExpander behaviour and their checkpoint interop (tiny sizes)."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fluxflow_jax.interop import vae as iv
from fluxflow_jax.interop.common import InteropError, count_params
from fluxflow_jax.models import vae
from fluxflow_jax.models.vae import FluxCompressor, FluxExpander

MANIFEST = Path(__file__).parent / "fixtures" / "parity" / "manifest_phase1" / "flxflow_final.keys.json"
C_CFG = dict(d_model=8, downscales=2, attn_layers=2, attn_heads=2)
E_CFG = dict(d_model=8, upscales=2)


def _img(b=2, h=32, w=32, seed=0):
    return jax.random.uniform(jax.random.key(seed), (b, h, w, 3), jnp.float32, -1.0, 1.0)


def _rand_vars(template, seed):
    """Random variables of a template's shapes, built in numpy (no init compile, which costs
    ~20 s per model on a loaded 2-core CPU); scaled like torch's fan-in init so that activations
    stay in range, and every parameter off its initial value."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, leaf in traverse_util.flatten_dict(dict(template)).items():
        shape = tuple(leaf.shape)
        if path[-1] == "kernel":
            fan = int(np.prod(shape)) // shape[-1]
            v = rng.uniform(-1, 1, shape) / np.sqrt(max(fan, 1))
        elif path[-1] == "scale":
            v = 1 + rng.uniform(-0.2, 0.2, shape)
        else:  # biases, Bezier control points, cls
            v = rng.uniform(-0.5, 0.5, shape)
        flat[path] = jnp.asarray(v, jnp.float32)
    return traverse_util.unflatten_dict(flat)


def _init_c(cfg=C_CFG, seed=1):
    return _rand_vars(iv.compressor_template(cfg), seed)


def _init_e(cfg=E_CFG, seed=2):
    return _rand_vars(iv.expander_template(cfg), seed)


def _flat(tree):
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, dict(tree)))


@pytest.fixture(scope="module")
def vae_vars():
    return _init_c(), _init_e()


def test_init_uses_reference_initialisation():
    """REFERENCE 1.10: Bezier control-point constants, MHA zero biases, ConvTranspose's torch
    fan-in (out*k*k), zero CLS token. (rbg keys: same semantics, a third of the compile time.)"""
    key = jax.random.key(0, impl="rbg")
    cv = jax.jit(lambda x: FluxCompressor(**C_CFG).init(key, x, sample=False))(_img(1))["params"]
    for name, init in (("mu_activation", vae.MU_INIT), ("logvar_activation", vae.LOGVAR_INIT)):
        for i, v in enumerate(init):
            np.testing.assert_array_equal(np.asarray(cv[name][f"p{i}"]), np.full(8, v, np.float32))
    attn = cv["token_attn_0"]["attn"]
    assert not np.asarray(attn["in_proj"]["bias"]).any() and not np.asarray(attn["out_proj"]["bias"]).any()
    assert np.abs(np.asarray(attn["in_proj"]["kernel"])).max() <= np.sqrt(6 / (8 + 24))
    assert np.asarray(cv["stage_0"]["z"]["kernel"]).std() > 0
    ev = jax.jit(lambda p: FluxExpander(**E_CFG).init(key, p, hw=(8, 8)))(jnp.zeros((1, 65, 8)))
    ev = ev["params"]
    for i, v in enumerate(vae.RGB_INIT):
        np.testing.assert_array_equal(np.asarray(ev["rgb_activation"][f"p{i}"]), np.full(3, v, np.float32))
    kt = np.asarray(ev["upscale_0"]["conv_t"]["kernel"])
    assert kt.shape == (16, 16, 40, 8)
    assert 0.9 / np.sqrt(40 * 256) < np.abs(kt).max() <= 1 / np.sqrt(40 * 256)
    assert not np.asarray(ev["context_mixer"]["cls"]).any()


# --- shapes and configuration --------------------------------------------------------------

def test_stage_channels_match_reference_rounding():
    assert vae.stage_channels(3, 128, 4) == [5, 36, 66, 97, 128]   # 66.5 rounds to 66
    assert vae.stage_channels(3, 16, 2) == [5, 10, 16]             # 10.5 rounds to 10


def test_phase1_parameter_counts():
    assert count_params(iv.compressor_template(dict(d_model=128, downscales=4, attn_layers=4))) \
        == 12_580_553
    assert count_params(iv.expander_template(dict(d_model=128, upscales=4))) == 94_073_551


def test_phase1_export_matches_reference_manifest():
    keys = json.loads(MANIFEST.read_text())["keys"]
    for prefix, shapes in (
            ("diffuser.compressor.", iv.torch_shapes(
                iv.compressor_template(dict(d_model=128, downscales=4, attn_layers=4)),
                iv.compressor_rule, "diffuser.compressor.")),
            ("diffuser.expander.", iv.torch_shapes(
                iv.expander_template(dict(d_model=128, upscales=4)), iv.expander_rule,
                "diffuser.expander."))):
        ref = {k: tuple(v) for k, v in keys.items() if k.startswith(prefix)}
        assert set(shapes) == set(ref), (sorted(set(ref) - set(shapes)), sorted(set(shapes) - set(ref)))
        bad = {k: (shapes[k], ref[k]) for k in ref if shapes[k] != ref[k]}
        assert not bad, bad


def test_rectangular_image_and_batch_one(vae_vars):
    cv, ev = vae_vars
    img = _img(1, 32, 48)
    packed, mu, logvar = jax.jit(lambda v, x: FluxCompressor(**C_CFG).apply(v, x, sample=False))(cv, img)
    assert packed.shape == (1, 8 * 12 + 1, 8) and mu.shape == logvar.shape == (1, 8, 12, 8)
    # HW token: latent h, w over max_hw in channels 0, 1, zeros elsewhere.
    np.testing.assert_array_equal(np.asarray(packed[0, -1]),
                                  np.array([8 / 1024, 12 / 1024] + [0] * 6, np.float32))
    exp = FluxExpander(**E_CFG)
    out = exp.apply(ev, packed)                       # grid read from the HW token
    assert out.shape == (1, 32, 48, 3)
    out_jit = jax.jit(lambda v, p: exp.apply(v, p, hw=(8, 12)))(ev, packed)
    np.testing.assert_allclose(np.asarray(out_jit), np.asarray(out), atol=1e-5)
    assert np.isfinite(np.asarray(out)).all()


def test_expander_needs_static_hw_under_jit(vae_vars):
    _, ev = vae_vars
    packed = jnp.zeros((1, 65, 8)).at[:, -1, :2].set(8 / 1024)
    with pytest.raises(ValueError, match=r"pass hw=\(h, w\)"):
        jax.jit(lambda v, p: FluxExpander(**E_CFG).apply(v, p))(ev, packed)
    with pytest.raises(ValueError, match="needs 100 tokens"):
        FluxExpander(**E_CFG).apply(ev, packed, hw=(10, 10))


def test_bad_image_size_and_channels_raise(vae_vars):
    cv, _ = vae_vars
    model = FluxCompressor(**C_CFG)
    with pytest.raises(ValueError, match="multiple of 2\\*\\*downscales = 4"):
        model.apply(cv, _img(1, 30, 32), sample=False)
    with pytest.raises(ValueError, match="in_channels is 3"):
        model.apply(cv, jnp.zeros((1, 32, 32, 4)), sample=False)


# --- sampling, remat, gradients ------------------------------------------------------------

def test_sampling_is_stochastic_only_through_the_rng(vae_vars):
    cv, _ = vae_vars
    model, img = FluxCompressor(**C_CFG), _img()
    det, mu, _ = jax.jit(lambda v, x: model.apply(v, x, sample=False))(cv, img)
    sampled = jax.jit(lambda v, x, k: model.apply(v, x, rngs={"sample": k}))
    s1, mu1, _ = sampled(cv, img, jax.random.key(7))
    s1b, _, _ = sampled(cv, img, jax.random.key(7))
    s2, _, _ = sampled(cv, img, jax.random.key(8))
    np.testing.assert_array_equal(np.asarray(s1), np.asarray(s1b))
    np.testing.assert_array_equal(np.asarray(mu1), np.asarray(mu))
    assert np.abs(np.asarray(s1 - det)).max() > 1e-3
    assert np.abs(np.asarray(s1 - s2)).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(s1[:, -1]), np.asarray(det[:, -1]))  # HW token
    with pytest.raises(Exception, match="sample"):
        jax.eval_shape(lambda v, x: model.apply(v, x), cv, img)  # needs the 'sample' rng stream


def _loss(cmodel, emodel, cv, ev, img, key):
    packed, mu, logvar = cmodel.apply(cv, img, rngs={"sample": key})
    rec = emodel.apply(ev, packed, hw=(img.shape[1] // 4, img.shape[2] // 4))
    kl = -0.5 * jnp.mean(1 + logvar - mu ** 2 - jnp.exp(logvar))
    return jnp.mean((rec - img) ** 2) + 1e-3 * kl, (packed, mu, logvar, rec)


@pytest.fixture(scope="module")
def plain_grads(vae_vars):
    return _grads(False, *vae_vars)


def _grads(remat, cv, ev):
    """((loss, forward outputs), grads) of a sampled encode-decode step, jitted."""
    cm = FluxCompressor(**C_CFG, remat=remat)
    em = FluxExpander(**E_CFG, remat=remat)
    f = jax.jit(jax.value_and_grad(lambda c, e: _loss(cm, em, c, e, _img(), jax.random.key(3)),
                                   argnums=(0, 1), has_aux=True))
    return f(cv, ev)


def test_gradients_flow_everywhere_except_dead_context_mixer(plain_grads):
    (loss, _), (gc, ge) = plain_grads
    assert np.isfinite(float(loss))
    for name, g in (("compressor", gc), ("expander", ge)):
        for path, leaf in _flat(g).items():
            assert np.isfinite(leaf).all(), (name, path)
            if "context_mixer" in path:   # present for checkpoint parity, never in the forward
                assert not leaf.any(), path
            else:
                assert np.abs(leaf).max() > 0, (name, path)


def test_remat_gives_identical_numbers(vae_vars, plain_grads):
    cv, ev = vae_vars
    img = _img()

    def run(remat):
        cm, em = FluxCompressor(**C_CFG, remat=remat), FluxExpander(**E_CFG, remat=remat)
        out = cm.apply(cv, img, sample=False)
        return out + (em.apply(ev, out[0], hw=(8, 8)),)
    for a, b in zip(jax.jit(lambda: run(False))(), jax.jit(lambda: run(True))()):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # forward: bit-identical
    # Differentiated under jit, XLA fuses the recomputed forward differently: last-ulp changes.
    ((l0, out0), g0), ((l1, out1), g1) = plain_grads, _grads(True, cv, ev)
    for a, b in zip(out0, out1):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(l0), float(l1), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                   atol=1e-6 * max(1.0, float(np.abs(np.asarray(a)).max())))


# --- activation ablation -------------------------------------------------------------------

@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
def test_activation_ablation(act, vae_vars):
    cv, ev = vae_vars
    cv_a = _init_c(dict(C_CFG, activation=act))
    ev_a = _init_e(dict(E_CFG, activation=act))
    for bez, abl in ((cv, cv_a), (ev, ev_a)):
        fb, fa = _flat(bez), _flat(abl)
        assert count_params(abl) < count_params(bez)
        # TrainableBezier sites own no parameters in the ablation.
        assert not [p for p in fa if p[-1] in ("p0", "p1", "p2", "p3")]
        narrowed = 0
        for path, leaf in fa.items():
            if path[-1] != "kernel":
                continue
            ob, oa = fb[path].shape[-1], leaf.shape[-1]
            if "conv_t" in path:  # ConvTranspose kernel is [k, k, out, in]
                ob, oa = fb[path].shape[-2], leaf.shape[-2]
            assert oa in (ob, ob // 5) and (oa == ob or ob == 5 * oa), path
            narrowed += oa != ob
        assert narrowed > 0
    packed, _, _ = FluxCompressor(**C_CFG, activation=act).apply(cv_a, _img(), sample=False)
    img = FluxExpander(**E_CFG, activation=act).apply(ev_a, packed)
    assert img.shape == (2, 32, 32, 3) and np.isfinite(np.asarray(img)).all()
    # An ablation checkpoint round-trips given its config, and is refused without it.
    sd = iv.compressor_to_torch(cv_a)
    with pytest.raises(InteropError, match="pass config"):
        iv.compressor_from_torch(sd)
    back, _ = iv.compressor_from_torch(sd, dict(C_CFG, activation=act))
    for path, leaf in _flat(back).items():
        np.testing.assert_array_equal(leaf, _flat(cv_a)[path])


# --- operators -----------------------------------------------------------------------------

@pytest.mark.parametrize("k,cin,cout", [(16, 3, 5), (4, 2, 3)])
def test_decomposed_conv_transpose_equals_lax_conv_transpose(k, cin, cout):
    x = jax.random.normal(jax.random.key(0), (2, 5, 7, cin))
    w = jax.random.normal(jax.random.key(1), (k, k, cout, cin))
    ours = vae.conv_transpose_2x(x, w)
    oracle = vae.conv_transpose_2x_oracle(x, w)
    assert ours.shape == oracle.shape == (2, 10, 14, cout)
    scale = float(jnp.abs(oracle).max())
    np.testing.assert_allclose(np.asarray(ours), np.asarray(oracle), atol=2e-6 * scale)


def _torch_bilinear_1d(n_in: int, n_out: int) -> np.ndarray:
    """Interpolation matrix of torch's bilinear ``align_corners=False``, written from its formula:
    src = (dst + 0.5) * in/out - 0.5 clamped at 0, neighbours i0 = floor(src), i1 = min(i0+1, n-1)."""
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = int(np.floor(src))
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        m[o, i0] += 1 - lam
        m[o, i1] += lam
    return m


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_bilinear_resize_matches_torch_align_corners_false(factor):
    x = np.asarray(jax.random.normal(jax.random.key(factor), (1, 3, 5, 2)))
    ours = np.asarray(vae.resize_bilinear(jnp.asarray(x), 3 * factor, 5 * factor))
    mh, mw = _torch_bilinear_1d(3, 3 * factor), _torch_bilinear_1d(5, 5 * factor)
    ref = np.einsum("ph,qw,bhwc->bpqc", mh, mw, x)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


# --- interop -------------------------------------------------------------------------------

def test_export_import_roundtrip_is_bit_identical(vae_vars):
    cv, ev = vae_vars
    for to_torch, from_torch, var, cfg in (
            (iv.compressor_to_torch, iv.compressor_from_torch, cv, C_CFG),
            (iv.expander_to_torch, iv.expander_from_torch, ev, E_CFG)):
        sd = to_torch(var, cfg, prefix="diffuser.x.")
        assert all(k.startswith("diffuser.x.") and v.dtype == np.float32 for k, v in sd.items())
        if "attn_heads" in cfg:  # not in the weights: refused unless given
            with pytest.raises(InteropError, match="attention heads"):
                from_torch(sd, prefix="diffuser.x.")
            inferred = iv.infer_compressor_config(sd, "diffuser.x.",
                                                  {"attn_heads": cfg["attn_heads"]})
            back, _ = from_torch(sd, inferred, prefix="diffuser.x.")
        else:
            back, inferred = from_torch(sd, prefix="diffuser.x.")
        assert {k: inferred[k] for k in cfg} == cfg
        fb, fv = _flat(back), _flat(var)
        assert fb.keys() == fv.keys()
        for path in fv:
            np.testing.assert_array_equal(fb[path], fv[path])
    # Reference layouts of the peculiar tensors.
    sd = iv.compressor_to_torch(cv)
    assert sd["token_attn.0.attn.in_proj_weight"].shape == (24, 8)
    k_rows = np.asarray(cv["params"]["token_attn_0"]["attn"]["in_proj"]["kernel"])[:, 8:16].T
    np.testing.assert_array_equal(sd["token_attn.0.attn.in_proj_weight"][8:16], k_rows)
    sd = iv.expander_to_torch(ev)
    assert sd["upscale.layers.0.conv1.0.weight"].shape == (8, 40, 16, 16)  # [in, out, k, k]
    assert sd["context_mixer.cls"].shape == (1, 1, 8)


def test_import_reports_every_bad_key(vae_vars):
    cv, ev = vae_vars
    sd = iv.compressor_to_torch(cv)
    sd["encoder_z.1.0.weight"] = sd["encoder_z.1.0.weight"][:, :, :4]
    del sd["token_attn.1.norm2.bias"]
    sd["token_attn.1.extra"] = np.zeros(3, np.float32)
    with pytest.raises(InteropError) as e:
        iv.compressor_from_torch(sd, C_CFG)
    msg = str(e.value)
    for part in ("encoder_z.1.0.weight: checkpoint [40, 8, 4, 8] vs model [40, 8, 8, 8]",
                 "token_attn.1.norm2.bias", "token_attn.1.extra"):
        assert part in msg, msg
    sd = iv.expander_to_torch(ev)
    del sd["upscale.layers.1.spade.mlp_gamma.weight"]
    with pytest.raises(InteropError, match=r"missing keys \(1\):\s+upscale\.layers\.1\.spade\.mlp_gamma\.weight"):
        iv.expander_from_torch(sd)
    with pytest.raises(InteropError, match="latent_proj.0.0.weight' is missing"):
        iv.compressor_from_torch({})
    with pytest.raises(InteropError, match="do not match the config"):
        iv.compressor_to_torch(cv, dict(C_CFG, d_model=16))
