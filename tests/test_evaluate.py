"""to_uint8 mapping, grids, captioned PNGs, PSNR and SSIM (against a brute-force SSIM)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fluxflow_jax import evaluate, grids
from fluxflow_jax.evaluate import make_grid, psnr, save_grid, ssim, to_uint8


def test_to_uint8_exact_values_and_clipping():
    x = jnp.asarray([-1.0, 1.0, 0.0, -2.0, 3.0, 0.5, -0.5, 1.0 / 127.5 - 1.0, float("nan")])
    np.testing.assert_array_equal(
        to_uint8(x), np.asarray([0, 255, 128, 0, 255, 191, 64, 1, 0], np.uint8)
    )
    assert to_uint8(x).dtype == np.uint8
    # every uint8 level survives the round trip u -> u/127.5 - 1 -> u
    levels = np.arange(256, dtype=np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(to_uint8(levels), np.arange(256, dtype=np.uint8))


def test_make_grid_shape_and_placement():
    imgs = np.stack([np.full((4, 5, 3), v, np.float32) for v in (-1.0, 0.0, 1.0)])  # N=3, H=4, W=5
    g = make_grid(imgs, nrow=2, padding=1)
    assert g.shape == (2 * (4 + 1) + 1, 2 * (5 + 1) + 1, 3) and g.dtype == np.uint8
    assert (g[1:5, 1:6] == 0).all() and (g[1:5, 7:12] == 128).all() and (g[6:10, 1:6] == 255).all()
    assert (g[6:10, 7:12] == 0).all()  # the empty 4th cell is padding
    # default: ceil(sqrt(N)) per row, greyscale to RGB
    g = make_grid(np.zeros((5, 8, 8, 1), np.float32), padding=0)
    assert g.shape == (16, 24, 3) and (g[:, :16] == 128).all() and (g[8:, 16:] == 0).all()
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        make_grid(np.zeros((2, 8, 8, 2), np.float32))


def test_save_grid_png_with_and_without_captions(tmp_path):
    imgs = jax.random.uniform(jax.random.key(0), (3, 16, 16, 3), minval=-1.0, maxval=1.0)
    p = save_grid(imgs, tmp_path / "sub" / "grid.png", nrow=3)
    with Image.open(p) as im:
        assert im.format == "PNG"
        np.testing.assert_array_equal(np.asarray(im), make_grid(imgs, nrow=3))
    p = save_grid(
        imgs, tmp_path / "cap.png", nrow=3, captions=["a red cat", "", "a very long caption " * 5]
    )
    with Image.open(p) as im:
        arr = np.asarray(im)
    assert arr.shape[1] == 3 * 18 + 2 and arr.shape[0] > 18 + 2  # caption strip below the row
    np.testing.assert_array_equal(arr[2:18, 2:18], to_uint8(imgs[0]))  # the tile is unchanged
    assert (arr[20:, :] < 128).any()  # some dark caption text was drawn in the strip
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        save_grid(imgs, tmp_path / "bad.png", captions=["a", "b"])


def test_psnr_identical_inf_and_decreasing_with_noise():
    key = jax.random.key(1)
    a = jax.random.uniform(key, (2, 16, 16, 3), minval=-1.0, maxval=1.0)
    assert np.isinf(np.asarray(psnr(a, a))).all()
    noise = jax.random.normal(jax.random.key(2), a.shape)
    values = [np.asarray(psnr(a, a + s * noise)) for s in (0.01, 0.05, 0.2)]
    assert all(v.shape == (2,) for v in values)
    assert (values[0] > values[1]).all() and (values[1] > values[2]).all()
    # known value: a constant offset of 0.2 in [-1, 1] is 0.1 in [0, 1] -> 20 dB
    np.testing.assert_allclose(psnr(a, a + 0.2), [20.0, 20.0], rtol=1e-5)


def ssim_bruteforce(a: np.ndarray, b: np.ndarray, win: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Wang et al. SSIM evaluated window by window on [-1, 1] images mapped to [0, 1] (range 1)."""
    a, b = (a + 1.0) / 2.0, (b + 1.0) / 2.0
    x = np.arange(win) - (win - 1) / 2
    g1 = np.exp(-(x**2) / (2 * sigma**2))
    w2 = np.outer(g1, g1)
    w2 /= w2.sum()
    c1, c2 = 0.01**2, 0.03**2
    n, h, wd, c = a.shape
    out = np.zeros(n)
    for i in range(n):
        vals = []
        for ch in range(c):
            for y in range(h - win + 1):
                for xx in range(wd - win + 1):
                    pa = a[i, y : y + win, xx : xx + win, ch].astype(np.float64)
                    pb = b[i, y : y + win, xx : xx + win, ch].astype(np.float64)
                    ma, mb = (w2 * pa).sum(), (w2 * pb).sum()
                    va, vb = (w2 * (pa - ma) ** 2).sum(), (w2 * (pb - mb) ** 2).sum()
                    cov = (w2 * (pa - ma) * (pb - mb)).sum()
                    vals.append(
                        (2 * ma * mb + c1)
                        * (2 * cov + c2)
                        / ((ma**2 + mb**2 + c1) * (va + vb + c2))
                    )
        out[i] = np.mean(vals)
    return out


def test_ssim_identical_is_one_and_matches_bruteforce():
    a = jax.random.uniform(jax.random.key(3), (2, 16, 16, 3), minval=-1.0, maxval=1.0)
    np.testing.assert_allclose(ssim(a, a), [1.0, 1.0], atol=1e-6)
    b = jnp.clip(a + 0.3 * jax.random.normal(jax.random.key(4), a.shape), -1, 1)
    got = np.asarray(ssim(a, b))
    want = ssim_bruteforce(np.asarray(a), np.asarray(b))
    assert got.shape == (2,) and (got < 0.95).all()
    np.testing.assert_allclose(got, want, atol=1e-5)
    # more noise, lower SSIM
    c = jnp.clip(a + 0.6 * jax.random.normal(jax.random.key(4), a.shape), -1, 1)
    assert (np.asarray(ssim(a, c)) < got).all()
    # images smaller than the window still work (window shrinks to 7)
    small = a[:, :7, :8]
    np.testing.assert_allclose(ssim(small, small), [1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(
        ssim(small, b[:, :7, :8]),
        ssim_bruteforce(np.asarray(small), np.asarray(b[:, :7, :8]), win=7),
        atol=1e-5,
    )


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="psnr: expected two NHWC batches"):
        psnr(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 5, 3)))
    with pytest.raises(ValueError, match="ssim: expected two NHWC batches"):
        ssim(jnp.zeros((4, 4, 3)), jnp.zeros((4, 4, 3)))


# ----------------------------------------------------------------------------------------------
# dm-pix conventions, baselines, shapes conditioning scores, the Evaluator library entry


def test_psnr_ssim_follow_the_unit_range_convention_of_dm_pix():
    import dm_pix

    a = jax.random.uniform(jax.random.key(5), (2, 16, 16, 3), minval=-1.0, maxval=1.0)
    b = jnp.clip(a + 0.2 * jax.random.normal(jax.random.key(6), a.shape), -1, 1)
    # [-1, 1] with range 2 == the same images in [0, 1] with range 1
    np.testing.assert_allclose(psnr(a, b), dm_pix.psnr((a + 1) / 2, (b + 1) / 2), rtol=1e-5)
    np.testing.assert_allclose(ssim(a, b), dm_pix.ssim((a + 1) / 2, (b + 1) / 2), atol=1e-5)
    mse = np.mean((np.asarray(a) - np.asarray(b)) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(psnr(a, b), 10 * np.log10(4.0 / mse), rtol=1e-4)


def _heldout(n=24, size=32):
    return evaluate.heldout_shapes({"img_size": size, "generator_seed": 0, "max_objects": 2}, n)


def test_heldout_shapes_are_not_training_scenes_and_baselines():
    from fluxflow_jax.data import shapes

    images, scenes = _heldout()
    train = [shapes.scene(i, 0).caption for i in range(len(scenes))]
    assert [s.caption for s in scenes] != train
    assert images.shape == (24, 32, 32, 3) and images.min() >= -1 and images.max() <= 1
    mean_b = evaluate.mean_image_baseline(images)
    bg_b = evaluate.background_baseline(images, scenes)
    # grey backgrounds dominate: predicting them alone already scores well above 15 dB
    assert 15.0 < mean_b < bg_b < 30.0
    x = np.asarray(images)
    np.testing.assert_allclose(mean_b, np.mean(psnr(x, np.broadcast_to(x.mean(0), x.shape))),
                               rtol=1e-6)


def test_conditioning_scores_from_pixels():
    images, scenes = _heldout()
    assert evaluate.conditioning_scores(images, scenes) == {"color_score": 1.0,
                                                            "relation_score": 1.0}
    flat = np.zeros_like(images)
    assert evaluate.conditioning_scores(flat, scenes) == {"color_score": 0.0,
                                                          "relation_score": 0.0}
    # mirrored images put every object on the other side: relations fail, colours stay
    vertical = [i for i, s in enumerate(scenes) if s.relation in ("above", "below")]
    horizontal = [i for i, s in enumerate(scenes) if s.relation in ("left of", "right of")]
    assert vertical and horizontal
    flipped = np.stack([x[::-1] if i in vertical else x[:, ::-1] for i, x in enumerate(images)])
    got = evaluate.conditioning_scores(flipped, scenes)
    assert got == {"color_score": 1.0, "relation_score": 0.0}
    # recolouring the first object of each scene fails exactly those objects
    n_obj = sum(len(s.objects) for s in scenes)
    from fluxflow_jax.data import shapes
    recoloured = []
    for s in scenes:
        other = next(c for c in shapes.COLORS if c not in {o.color for o in s.objects})
        objs = (dataclasses.replace(s.objects[0], color=other),) + s.objects[1:]
        recoloured.append(grids.from_uint8(shapes.render(dataclasses.replace(s, objects=objs), 32)))
    got = evaluate.conditioning_scores(np.stack(recoloured), scenes)
    assert got["color_score"] == pytest.approx((n_obj - len(scenes)) / n_obj)
    assert got["relation_score"] == 0.0
    with pytest.raises(ValueError, match="3 images for 24 scenes"):
        evaluate.conditioning_scores(images[:3], scenes)
    # the reconstruction colour score counts the single-object scenes only
    one = [i for i, s in enumerate(scenes) if len(s.objects) == 1]
    assert 0 < len(one) < len(scenes)
    assert evaluate.recon_color_score(images, scenes) == 1.0
    assert evaluate.recon_color_score(np.stack(recoloured), scenes) == 0.0
    mixed = np.stack([recoloured[i] if i == one[0] else images[i] for i in range(len(scenes))])
    assert evaluate.recon_color_score(mixed, scenes) == pytest.approx(1 - 1 / len(one))
    two = [s for s in scenes if len(s.objects) == 2]
    assert np.isnan(evaluate.recon_color_score(images[:len(two)] * 0, two))


def test_evaluator_returns_flat_metrics_for_the_models_present():
    from fluxflow_jax.models import registry

    mcfg = dict(vae_dim=5, downscales=1, upscales=1, vae_attn_layers=1, vae_attn_heads=1,
                flow_dim=8, flow_layers=1, flow_heads=2, text_embedding_dim=8)
    models = registry.build_models(mcfg, {"compressor", "expander"})
    params, _ = registry.init_params(models, jax.random.key(0), image_hw=(16, 16))
    images, scenes = _heldout(4, 16)
    ev = evaluate.Evaluator(models, images=images, scenes=scenes)
    m = ev(params)
    assert set(m) == {"eval/psnr", "eval/ssim", "eval/psnr_mean_image", "eval/psnr_background",
                      "eval/recon_color_score"}
    y = ev.last_images["reconstruction"]
    np.testing.assert_equal(m["eval/recon_color_score"], evaluate.recon_color_score(y, scenes))
    assert m["eval/psnr"] == pytest.approx(float(np.mean(psnr(images, y))), rel=1e-6)
    assert m["eval/psnr_background"] == pytest.approx(
        evaluate.background_baseline(images, scenes), rel=1e-6)
    table = evaluate.format_table(m)
    assert "psnr_mean_image" in table.splitlines()[1] and len(table.splitlines()) == 4
