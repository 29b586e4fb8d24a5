"""Properties of the pure loss functions (fluxflow_jax.losses) and LPIPS (fluxflow_jax.lpips)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from fluxflow_jax import losses as L
from fluxflow_jax import lpips


def _img(seed, shape=(2, 8, 8, 3)):
    return jax.random.uniform(jax.random.key(seed), shape, jnp.float32, -1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# KL


def test_kl_zero_for_standard_normal_and_free_bits_floor():
    z = jnp.zeros((2, 4, 4, 3))
    assert float(L.kl_standard_normal(z, z)) == 0.0
    assert float(L.kl_standard_normal(z, z, free_bits=0.25)) == pytest.approx(0.25)
    mu = jnp.full((2, 4, 4, 3), 0.1)
    # 0.5 * mu^2 = 0.005 per element < floor -> floor, and no gradient below it
    assert float(L.kl_standard_normal(mu, z, free_bits=0.25)) == pytest.approx(0.25)
    g = jax.grad(lambda m: L.kl_standard_normal(m, z, free_bits=0.25))(mu)
    assert float(jnp.max(jnp.abs(g))) == 0.0
    g = jax.grad(lambda m: L.kl_standard_normal(m, z))(mu)
    assert float(jnp.min(g)) > 0.0


def test_kl_reductions():
    mu, lv = _img(0, (3, 2, 2, 5)), _img(1, (3, 2, 2, 5))
    per = L.kl_standard_normal(mu, lv, reduce="none")
    assert per.shape == (3,) and float(jnp.min(per)) > 0
    ref = np.mean(-0.5 * (1 + np.asarray(lv) - np.asarray(mu) ** 2 - np.exp(np.asarray(lv))), axis=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(per), ref, rtol=1e-5)
    summed = L.kl_standard_normal(mu, lv, normalize_by_dims=False, reduce="sum")
    np.testing.assert_allclose(float(summed), ref.sum() * 20, rtol=1e-5)
    with pytest.raises(ValueError, match="reduce must be"):
        L.kl_standard_normal(mu, lv, reduce="max")


def test_kl_beta_cosine_warmup():
    assert float(L.kl_beta(0, 100, 1e-3)) == 0.0
    assert float(L.kl_beta(50, 100, 1e-3)) == pytest.approx(5e-4, rel=1e-6)
    assert float(L.kl_beta(100, 100, 1e-3)) == pytest.approx(1e-3, rel=1e-6)
    assert float(L.kl_beta(10**6, 100, 1e-3)) == pytest.approx(1e-3, rel=1e-6)
    assert float(L.kl_beta(5, 0, 1e-3)) == pytest.approx(1e-3)
    traced = jax.jit(lambda s: L.kl_beta(s, 100, 1e-3))(jnp.asarray(25))
    assert float(traced) == pytest.approx(1e-3 * (1 - np.cos(np.pi / 4)) / 2, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# reconstruction and colour regularisers


def _avg_pool3_np(x):
    _, h, w, _ = x.shape
    pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros_like(x)
    for i in range(h):
        for j in range(w):
            out[:, i, j] = pad[:, i:i + 3, j:j + 3].sum(axis=(1, 2)) / 9.0
    return out


def test_frequency_l1_and_reconstruction_loss():
    p, t = _img(0), _img(1)
    pn, tn = np.asarray(p, np.float64), np.asarray(t, np.float64)
    pl, tl = _avg_pool3_np(pn), _avg_pool3_np(tn)
    ref = np.abs(pl - tl).mean() + 0.5 * np.abs((pn - pl) - (tn - tl)).mean()
    np.testing.assert_allclose(float(L.frequency_l1(p, t)), ref, rtol=1e-5)
    mse = ((pn - tn) ** 2).mean()
    np.testing.assert_allclose(float(L.reconstruction_loss(p, t)), ref + 0.1 * mse, rtol=1e-5)
    assert float(L.reconstruction_loss(p, p)) == 0.0


def test_color_stats_and_contrast():
    t = _img(2)
    assert float(L.color_stats_loss(t, t)) == 0.0 and float(L.contrast_loss(t, t)) == 0.0
    # a constant shift changes only the means
    np.testing.assert_allclose(float(L.color_stats_loss(t + 0.3, t)), 0.09, rtol=1e-4)
    tn = np.asarray(t, np.float64)
    p = np.asarray(2.0 * t, np.float64)
    ch = lambda x: x[..., :3].reshape(-1, 3).std(axis=0, ddof=1)
    ref_cs = np.mean((p[..., :3].reshape(-1, 3).mean(0) - tn[..., :3].reshape(-1, 3).mean(0)) ** 2
                     + (ch(p) - ch(tn)) ** 2)
    np.testing.assert_allclose(float(L.color_stats_loss(2.0 * t, t)), ref_cs, rtol=1e-5)
    ps, ts = p.reshape(2, -1).std(1, ddof=1), tn.reshape(2, -1).std(1, ddof=1)
    ref_ct = (np.sum((ch(p) / (ch(tn) + 1e-8) - 1) ** 2) + np.mean((ps - ts) ** 2)) / 4
    np.testing.assert_allclose(float(L.contrast_loss(2.0 * t, t)), ref_ct, rtol=1e-5)


def test_soft_histogram_matches_hard_bins_at_centres_and_ignores_outside():
    centres = -1.0 + (np.arange(64) + 0.5) * (2.0 / 64)
    vals = np.concatenate([centres[[0, 3, 3, 40, 63]], [1.5, -2.0]]).astype(np.float32)
    h = np.asarray(L.soft_histogram(jnp.asarray(vals)))
    hard = np.histogram(vals, bins=64, range=(-1, 1))[0].astype(np.float64)
    np.testing.assert_allclose(h, hard / hard.sum(), atol=1e-6)
    # a value between two centres splits its mass linearly
    h = np.asarray(L.soft_histogram(jnp.asarray([0.25 * centres[10] + 0.75 * centres[11]])))
    np.testing.assert_allclose(h[10:12], [0.25, 0.75], atol=1e-5)


def test_histogram_loss_is_differentiable():
    t = _img(3, (2, 16, 16, 3))
    p = jnp.clip(t * 0.7 + 0.1, -1, 1)
    assert float(L.histogram_loss(t, t)) == 0.0
    assert float(L.histogram_loss(p, t)) > 0.01
    g = jax.grad(L.histogram_loss)(p, t)
    assert float(jnp.sum(jnp.abs(g))) > 0.0  # torch.histc would give exactly 0
    # a small step against the gradient lowers the loss
    assert float(L.histogram_loss(p - 0.5 * g / jnp.max(jnp.abs(g)) * 1e-2, t)) < float(L.histogram_loss(p, t))


# ---------------------------------------------------------------------------------------------
# GAN


def test_hinge_losses():
    b = 3
    perfect_real = jnp.full((b, 4, 4, 1), 1.5)
    perfect_fake = jnp.full((b, 4, 4, 1), -2.0)
    assert float(L.d_hinge_loss(perfect_real, perfect_fake)) == 0.0
    # hinge on the per-sample mean, not per patch: +3/-1 patches average to 1 -> no loss
    mixed = jnp.concatenate([jnp.full((b, 2, 4, 1), 3.0), jnp.full((b, 2, 4, 1), -1.0)], axis=1)
    assert float(L.d_hinge_loss(mixed, perfect_fake)) == 0.0
    assert float(L.d_hinge_loss(jnp.zeros((b, 4, 4, 1)), jnp.zeros((b, 4, 4, 1)))) == 2.0
    assert float(L.g_hinge_loss(perfect_fake)) == 2.0


def test_r1_penalty():
    x = _img(4, (2, 4, 4, 3))
    const = lambda _x: jnp.ones((2, 2, 2, 1))
    assert float(L.r1_penalty(const, x, 5.0)) == 0.0
    w = jnp.array([0.5, -1.0, 2.0])

    def linear_d(w, x):  # per-pixel linear logits [B, H, W, 1]
        return jnp.sum(x * w, axis=-1, keepdims=True)

    hw = 16
    expect = 5.0 * 0.5 * float(jnp.sum(w ** 2)) / hw  # grad per pixel w / HW
    np.testing.assert_allclose(float(L.r1_penalty(lambda x: linear_d(w, x), x, 5.0)), expect, rtol=1e-6)
    pen, logits = L.r1_penalty_and_logits(lambda x: linear_d(w, x), x, 5.0)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(linear_d(w, x)))
    # differentiable w.r.t. D's parameters (double backprop)
    gw = jax.grad(lambda w: L.r1_penalty(lambda x: linear_d(w, x), x, 5.0))(w)
    np.testing.assert_allclose(np.asarray(gw), 5.0 * np.asarray(w) / hw, rtol=1e-6)
    pen2, (_, aux) = L.r1_penalty_and_logits(lambda x: (linear_d(w, x), 7), x, 5.0, has_aux=True)
    assert aux == 7 and float(pen2) == pytest.approx(float(pen))
    assert [bool(L.r1_due(s, 16)) for s in (0, 1, 16, 17, 32)] == [True, False, True, False, True]
    with pytest.raises(ValueError, match="r1_interval"):
        L.r1_due(3, 0)


# ---------------------------------------------------------------------------------------------
# adaptive weights


def test_adaptive_weights_nonnegative_and_reference_rule_when_positive():
    w = L.adaptive_weights({"recon": 2.0, "kl": 1.0, "gan": -0.5})
    assert all(float(v) >= 0 for v in w.values())
    target = (2.0 + 1.0 + 0.5) / 3
    np.testing.assert_allclose([float(w[k]) for k in ("recon", "kl", "gan")],
                               [target / 2.0, target / 1.0, target / 0.5], rtol=1e-5)
    # all-positive averages: identical to the reference's rule
    avg = {"recon": 0.3, "kl": 0.02}
    ref_t = (0.3 + 0.02) / 2
    w = L.adaptive_weights(avg)
    np.testing.assert_allclose([float(w["recon"]), float(w["kl"])],
                               [ref_t / (0.3 + 1e-8), ref_t / (0.02 + 1e-8)], rtol=1e-6)
    w = L.adaptive_weights({"recon": 0.0, "kl": 0.5})
    assert float(w["recon"]) == 1.0 and float(w["kl"]) == pytest.approx(1.0, rel=1e-6)
    jw = jax.jit(L.adaptive_weights)({"recon": jnp.asarray(2.0), "gan": jnp.asarray(-1.0)})
    assert float(jw["gan"]) == pytest.approx(1.5, rel=1e-6)


def test_loss_history_rolls_over_100():
    h = L.loss_history_init(["recon", "kl"], size=100)
    assert float(L.loss_history_averages(h)["recon"]) == 0.0
    for i in range(105):
        h = L.loss_history_push(h, {"recon": float(i), "kl": 1.0})
    avg = L.loss_history_averages(h)
    assert float(avg["recon"]) == pytest.approx(np.mean(np.arange(5, 105)))
    assert float(avg["kl"]) == pytest.approx(1.0)
    h = L.loss_history_push(L.loss_history_init(["gan"]), {"gan": -2.0})
    assert float(L.loss_history_averages(h)["gan"]) == -2.0


# ---------------------------------------------------------------------------------------------
# flow matching


def test_flow_matching_target_and_interpolation():
    x0, x1 = _img(5, (4, 6, 8)), _img(6, (4, 6, 8))
    t = jnp.array([0.0, 1.0, 0.25, 0.5])
    xt = L.flow_interpolate(x0, x1, t)
    np.testing.assert_allclose(np.asarray(xt[0]), np.asarray(x0[0]))
    np.testing.assert_allclose(np.asarray(xt[1]), np.asarray(x1[1]))
    np.testing.assert_allclose(np.asarray(xt[2]), np.asarray(0.25 * x1[2] + 0.75 * x0[2]), rtol=1e-6)
    # the velocity dx_t/dt is the regression target
    v = jax.jvp(lambda s: L.flow_interpolate(x0, x1, s), (t,), (jnp.ones(4),))[1]
    assert float(L.flow_matching_loss(v, x0, x1, t)) == pytest.approx(0.0, abs=1e-10)
    np.testing.assert_allclose(float(L.flow_matching_loss(jnp.zeros_like(x0), x0, x1, t)),
                               float(jnp.mean(jnp.square(x1 - x0))), rtol=1e-6)
    grid = jnp.linspace(0.0005, 0.9995, 1000)
    wb = L.flow_loss_weights(grid, "bell_shaped")
    assert float(jnp.mean(wb)) == pytest.approx(1.0, abs=0.01)
    assert int(jnp.argmax(wb)) in (499, 500) and float(wb[0]) < 1e-3
    with pytest.raises(ValueError, match="weighting"):
        L.flow_loss_weights(grid, "cosine")


@pytest.mark.parametrize("mode,lo,hi", [("uniform", 0.49, 0.51), ("logit_normal", 0.49, 0.51),
                                        ("content", 0.66, 0.74), ("style", 0.26, 0.34),
                                        ("balanced", 0.48, 0.52)])
def test_timestep_sampler_ranges_and_means(mode, lo, hi):
    t = np.asarray(L.sample_timesteps(jax.random.key(0), 20000, mode))
    assert t.dtype == np.float32 and t.shape == (20000,)
    assert t.min() >= 0.0 and t.max() <= 1.0
    assert lo < t.mean() < hi, t.mean()
    if mode == "uniform":
        assert abs(t.std() - np.sqrt(1 / 12)) < 0.01
    if mode == "balanced":  # both ends: more spread than the centred logit-normal
        ln = np.asarray(L.sample_timesteps(jax.random.key(0), 20000, "logit_normal"))
        assert t.std() > ln.std() + 0.03


def test_timestep_sampler_args_and_errors():
    t = np.asarray(L.sample_timesteps(jax.random.key(1), 20000, "logit_normal", mean=1.0, std=0.5))
    assert t.mean() > 0.7
    c = np.asarray(L.sample_timesteps(jax.random.key(2), 20000, "content", shift=2.0))
    assert c.mean() > 0.8
    with pytest.raises(ValueError, match="timestep mode"):
        L.sample_timesteps(jax.random.key(0), 4, "cosine")


# ---------------------------------------------------------------------------------------------
# DDPM (the reference's objective)


def test_ddpm_schedule_and_v_target_identity():
    ab = L.ddpm_schedule()["alphas_cumprod"]
    assert ab.shape == (1000,) and bool(jnp.all(jnp.diff(ab) < 0))
    np.testing.assert_allclose([float(ab[0]), float(ab[499]), float(ab[999])],
                               [0.9999, 0.0786, 4.0e-5], rtol=2e-2)
    x0, eps = _img(7, (3, 5, 4)), jax.random.normal(jax.random.key(8), (3, 5, 4))
    t = jnp.array([0, 400, 999])
    xt = L.ddpm_add_noise(x0, eps, t)
    v = L.v_prediction_target(x0, eps, t)
    a = jnp.sqrt(ab[t])[:, None, None]
    s = jnp.sqrt(1 - ab[t])[:, None, None]
    np.testing.assert_allclose(np.asarray(a * xt - s * v), np.asarray(x0), atol=1e-5)
    np.testing.assert_allclose(np.asarray(s * xt + a * v), np.asarray(eps), atol=1e-5)


def test_ddpm_timestep_sampling_and_model_time():
    idx = np.asarray(L.sample_ddpm_timesteps(jax.random.key(0), 20000))
    assert idx.dtype == np.int32 and idx.min() >= 0 and idx.max() <= 999
    assert 280 < idx.mean() < 312  # REFERENCE.md: mean ~296 (low-noise bias)
    t = jax.jit(L.ddpm_model_time)(jnp.arange(1000))
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    back = jax.jit(lambda t: jnp.floor(t * 999).astype(jnp.int32))(t)  # the model's mapping
    np.testing.assert_array_equal(np.asarray(back), np.arange(1000))


# ---------------------------------------------------------------------------------------------
# CFG dropout


def test_cfg_dropout_rate_and_null_embedding():
    e = jax.random.normal(jax.random.key(0), (4000, 6)) + 5.0  # no row is near zero
    out = np.asarray(L.cfg_dropout(jax.random.key(1), e, 0.1))
    dropped = np.all(out == 0.0, axis=1)
    assert 0.08 < dropped.mean() < 0.12
    np.testing.assert_array_equal(out[~dropped], np.asarray(e)[~dropped])
    null = jnp.arange(6.0)
    out2 = np.asarray(L.cfg_dropout(jax.random.key(1), e, 0.1, null_emb=null))
    np.testing.assert_array_equal(np.all(out2 == np.arange(6.0), axis=1), dropped)  # same rng -> rows
    assert L.cfg_dropout(jax.random.key(1), e, 0.0) is e
    assert np.all(np.asarray(L.cfg_dropout(jax.random.key(1), e, 1.0)) == 0.0)
    seq = jnp.ones((50, 3, 4))
    null_seq = jnp.full((1, 3, 4), -1.0)
    o = np.asarray(L.cfg_dropout(jax.random.key(2), seq, 0.5, null_emb=null_seq))
    rows = np.all(o == -1.0, axis=(1, 2))
    assert rows.any() and (~rows).any() and np.all(o[~rows] == 1.0)
    with pytest.raises(ValueError, match=r"cfg_dropout_prob must be in \[0, 1\]"):
        L.cfg_dropout(jax.random.key(0), e, 1.5)
    with pytest.raises(ValueError, match="does not broadcast"):
        L.cfg_dropout(jax.random.key(0), e, 0.5, null_emb=jnp.ones(5))


# ---------------------------------------------------------------------------------------------
# LPIPS


@pytest.fixture(scope="module")
def lp_params():
    return lpips.init_lpips(jax.random.key(0))


def test_lpips_distance_properties(lp_params):
    # the hand-built params have exactly the structure the module declares
    shapes = jax.eval_shape(lpips.LPIPS().init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)),
                            jnp.zeros((1, 16, 16, 3)))["params"]
    assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: a.shape, lp_params)
    x, y = _img(10, (2, 16, 16, 3)), _img(11, (2, 16, 16, 3))  # 16 px: 1x1 at relu5_3
    dist = jax.jit(lpips.lpips_distance)
    d_xy = np.asarray(dist(lp_params, x, y))
    assert d_xy.shape == (2,) and np.all(d_xy > 0)
    np.testing.assert_allclose(np.asarray(dist(lp_params, y, x)), d_xy, rtol=1e-5)
    assert float(jnp.max(jnp.abs(dist(lp_params, x, x)))) < 1e-12  # 0 up to XLA fusion rounding
    # the composition: scaling layer -> VGG taps -> unit-normalise -> weighted squared diff
    feats = jax.jit(lambda im: lpips.VGG16Features().apply(
        {"params": lp_params["vgg"]}, (im - lpips._SHIFT) / lpips._SCALE))
    ref = 0.0
    for k, (a, b) in enumerate(zip(feats(x), feats(y))):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        a = a / (np.sqrt((a ** 2).sum(-1, keepdims=True)) + 1e-10)
        b = b / (np.sqrt((b ** 2).sum(-1, keepdims=True)) + 1e-10)
        ref = ref + (((a - b) ** 2) * np.asarray(lp_params[f"lin{k}"])).sum(-1).mean((1, 2))
    np.testing.assert_allclose(d_xy, ref, rtol=1e-4)
    assert [t.shape[-1] for t in feats(x)] == list(lpips.CHANNELS)


def test_load_lpips_weights_torch_layout(tmp_path, lp_params):
    tensors = {}
    for name, conv in lp_params["vgg"].items():
        idx = name.split("_")[1]
        tensors[f"features.{idx}.weight"] = np.asarray(conv["kernel"]).transpose(3, 2, 0, 1).copy()
        tensors[f"features.{idx}.bias"] = np.asarray(conv["bias"])
    tensors["classifier.0.weight"] = np.zeros((2, 2), np.float32)  # ignored
    heads = {f"lin{k}.model.1.weight": np.asarray(lp_params[f"lin{k}"]).reshape(1, -1, 1, 1)
             for k in range(5)}
    save_file(tensors, str(tmp_path / "vgg16.safetensors"))
    save_file(heads, str(tmp_path / "lpips_vgg.safetensors"))
    loaded = lpips.load_lpips_weights([tmp_path / "vgg16.safetensors", tmp_path / "lpips_vgg.safetensors"])
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(lp_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(loaded) == jax.tree.structure(lp_params)
    # lpips' own naming (net.slice{k}.{N}.*) is accepted too
    sliced = {k.replace("features.", "net.slice1."): v for k, v in tensors.items()}
    save_file(dict(sliced, **heads), str(tmp_path / "lpips_full.safetensors"))
    again = lpips.load_lpips_weights(str(tmp_path / "lpips_full.safetensors"))
    np.testing.assert_array_equal(np.asarray(again["vgg"]["features_28"]["kernel"]),
                                  np.asarray(lp_params["vgg"]["features_28"]["kernel"]))
    del heads["lin3.model.1.weight"]
    save_file(dict(tensors, **heads), str(tmp_path / "partial.safetensors"))
    with pytest.raises(KeyError, match=r"'lin3\.model\.1\.weight' not found"):
        lpips.load_lpips_weights(str(tmp_path / "partial.safetensors"))
