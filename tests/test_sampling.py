"""Samplers and CFG: closed-form velocity fields, the reference's v-prediction loop, real tiny
models through the public Generator / SampleMaker API."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from run_utils import load_config, xla_flags
from safetensors.numpy import load_file

from fluxflow_jax import data as data_lib
from fluxflow_jax import grids, sampling, stages
from fluxflow_jax.interop.flow import flow_from_torch
from fluxflow_jax.models import registry
from fluxflow_jax.models.flow import FluxFlowProcessor
from fluxflow_jax.sampling import SampleSettings

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
B, T, D, E = 2, 3, 4, 4


# ----------------------------------------------------------------------------------------------
# A linear velocity field v = A x + W e + c t: the ODE has a closed-form solution and v is
# linear in the text embedding, so guided velocities have exact expected values.

A = -0.7
C = 0.3


def linear_apply(params, packed, emb, t):
    x = packed[:, :-1]
    v = A * x + (emb @ params["W"])[:, None, :] + C * t[:, None, None]
    return jnp.concatenate([v, packed[:, -1:]], 1)


def analytic_endpoint(x0, b):
    """x(1) of dx/dt = A x + b + C t from x(0) = x0 (b constant over t)."""
    # particular solution x_p = p + q t: 0 = A q + C and q = A p + b
    q = -C / A
    p = (q - b) / A
    return p + q + (x0 - p) * np.exp(A)


@pytest.fixture(scope="module")
def lin():
    k = jax.random.key(0)
    params = {"W": jax.random.normal(k, (E, D))}
    noise = jax.random.normal(jax.random.fold_in(k, 1), (B, T, D))
    tok = sampling.hw_token(B, (1, T), D, 1024)
    cond = jax.random.normal(jax.random.fold_in(k, 2), (B, E))
    null = jax.random.normal(jax.random.fold_in(k, 3), (B, E))
    return params, noise, tok, cond, null


def _solve(lin, sampler, steps, guidance=1.0, null="given", cond=None):
    params, noise, tok, c, n = lin
    return sampling.solve(linear_apply, params, noise, tok, c if cond is None else cond,
                          n if null == "given" else null, SampleSettings(sampler, steps, guidance))


def test_euler_reaches_the_analytic_endpoint_and_heun_is_more_accurate(lin):
    params, noise, tok, cond, _ = lin
    b = np.asarray(cond @ params["W"])[:, None, :]
    want = analytic_endpoint(np.asarray(noise), b)
    err = {}
    for sampler in ("euler", "heun"):
        for n in (8, 16):
            out = np.asarray(_solve(lin, sampler, n))
            np.testing.assert_array_equal(out[:, -1:], np.asarray(tok))  # size token fixed
            err[sampler, n] = np.abs(out[:, :-1] - want).max()
    fine = np.asarray(_solve(lin, "euler", 2000))[:, :-1]
    np.testing.assert_allclose(fine, want, atol=2e-3)
    assert err["heun", 8] < err["euler", 8] / 10
    # first order: halving the step halves the error; second order: quarters it
    assert 1.7 < err["euler", 8] / err["euler", 16] < 2.3
    assert 3.4 < err["heun", 8] / err["heun", 16] < 4.6


@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
def test_guidance_one_is_conditional_zero_is_unconditional_else_extrapolates(lin, sampler):
    _, _, _, cond, null = lin
    only_cond = _solve(lin, sampler, 4, 1.0, null=None)
    np.testing.assert_array_equal(_solve(lin, sampler, 4, 1.0), only_cond)
    np.testing.assert_array_equal(_solve(lin, sampler, 4, 0.0), _solve(lin, sampler, 4, 1.0,
                                                                        null=None, cond=null))
    # v is linear in e: v_u + g (v_c - v_u) is the velocity of e = null + g (cond - null)
    g = 2.5
    np.testing.assert_allclose(_solve(lin, sampler, 4, g),
                               _solve(lin, sampler, 4, 1.0, null=None,
                                      cond=null + g * (cond - null)), atol=1e-5)


def test_guidance_one_runs_only_the_conditional_branch(lin):
    params, noise, tok, cond, null = lin
    seen = []

    def apply(p, packed, emb, t):
        seen.append(packed.shape[0])
        return linear_apply(p, packed, emb, t)

    sampling.solve(apply, params, noise, tok, cond, null, SampleSettings("euler", 2, 1.0))
    sampling.solve(apply, params, noise, tok, cond, null, SampleSettings("euler", 2, 3.0))
    assert seen == [B, 2 * B]  # traced once each (fori_loop): B rows, then [cond; null]


def test_vpred_trailing_timesteps_and_bad_settings():
    s = sampling.vpred_schedule(20)
    np.testing.assert_array_equal(s["timesteps"], np.arange(999, 0, -50))
    np.testing.assert_array_equal(sampling.vpred_schedule(50)["timesteps"][[0, 1, -1]],
                                  [999, 979, 19])
    assert s["c"][0] == 0 and s["c"][-1] == 0 and (s["c"][1:-1] != 0).all()
    assert s["a"][-1] == 0 and s["b"][-1] == 1  # the last step returns x0
    with pytest.raises(ValueError, match="sampler must be one of"):
        SampleSettings("ddim")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        SampleSettings("euler", 0)


def test_vpred_matches_the_reference_loop_on_its_fixture():
    cfg = json.loads((FIXTURES / "vpred" / "config.json").read_text())
    io = load_file(str(FIXTURES / "vpred" / "io.safetensors"))
    weights = load_file(str(ROOT / cfg["weights"]))
    variables, mcfg = flow_from_torch(weights, cfg["kwargs"])
    model = FluxFlowProcessor(**mcfg)
    hw = tuple(cfg["grid"])
    apply = lambda p, x, e, t: model.apply({"params": p}, x, e, t, hw=hw)
    for case in cfg["cases"]:
        n = case["name"]
        emb = jnp.asarray(io[f"{n}.text_embeddings"])
        settings = SampleSettings("vpred", case["steps"], case["guidance"])
        out = jax.jit(lambda p, x, tok, e, s=settings: sampling.solve(
            apply, p, x, tok, e, jnp.zeros_like(e), s))(
            variables["params"], io[f"{n}.noise"], io[f"{n}.hw_token"], emb)
        ref = io[f"{n}.out"]
        assert np.abs(np.asarray(out) - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max()), n


# ----------------------------------------------------------------------------------------------
# Real tiny models through the public API


@pytest.fixture(scope="module")
def tiny():
    config = load_config()
    tok = data_lib.load_tokenizer("demo")
    mcfg = config.model.to_dict()
    mcfg["text"]["vocab_size"] = len(tok)
    models = registry.build_models(mcfg, {"compressor", "expander", "flow", "text_encoder"})
    params, _ = registry.init_params(models, jax.random.key(3), image_hw=(16, 16), text_len=16)
    return config, tok, models, params


GEN_SETTINGS = SampleSettings("euler", 3, 3.0)


def _gen(tiny, settings=GEN_SETTINGS, **kw):
    _, tok, models, _ = tiny
    return sampling.Generator(models, tok, max_length=16, image_hw=(16, 16), settings=settings,
                              **kw)


PROMPTS = ["a red circle above a blue square", "a green triangle"]


def test_same_seed_same_images_other_seed_differs_batch_independent(tiny):
    params = tiny[3]
    gen = _gen(tiny)
    a = gen(params, PROMPTS, seed=5)
    assert a.shape == (2, 16, 16, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, gen(params, PROMPTS, seed=5))
    assert np.abs(a - gen(params, PROMPTS, seed=6)).max() > 1e-3
    # image i depends on (seed, index) only: the second prompt alone, at index 1, is the same
    np.testing.assert_allclose(gen(params, PROMPTS[1:], seed=5, first_index=1)[0], a[1],
                               atol=1e-5)


def test_negative_prompt_replaces_the_unconditional_branch(tiny):
    params = tiny[3]
    zeros = _gen(tiny)(params, PROMPTS, seed=1)  # euler, 3 steps, guidance 3, zero null
    neg = _gen(tiny, negative="a blue square")(params, PROMPTS, seed=1)
    assert np.abs(neg - zeros).max() > 1e-4
    # guidance 0 is the unconditional branch alone: with a negative prompt that is exactly the
    # conditional sample of the negative prompt
    only_uncond = _gen(tiny, SampleSettings("euler", 3, 0.0), negative="a blue square")
    as_prompt = _gen(tiny, SampleSettings("euler", 3, 1.0))
    np.testing.assert_allclose(only_uncond(params, PROMPTS, seed=1),
                               as_prompt(params, ["a blue square"] * 2, seed=1), atol=1e-5)


def test_sampling_params_prefer_ema():
    p = {"flow": {"w": np.zeros(2)}, "expander": {"w": np.zeros(1)}}
    out = sampling.sampling_params(p, {"flow": {"w": np.ones(2)}})
    np.testing.assert_array_equal(out["flow"]["w"], np.ones(2))
    np.testing.assert_array_equal(out["expander"]["w"], np.zeros(1))
    assert sampling.sampling_params(p, None)["flow"]["w"].sum() == 0


def test_stage_sample_maker_writes_readable_grids(tiny, tmp_path):
    config, tok, models, params = tiny
    written = []
    for stage in ("vae_warmup", "vae_gan", "flow"):
        sm = sampling.stage_sample_maker(config, stage, models, tok, tmp_path)
        written += sm.make(params, 7)
    names = sorted(p.name for p in written)
    assert names == ["flow_gen_step000007.png", "vae_gan_recon_step000007.png",
                     "vae_warmup_recon_step000007.png"]
    # SPADE context only once a stage trained it (the reference decodes with it always, §10.14):
    # vae_warmup shows input / reconstruction; vae_gan (train has 'spade') adds the no-SPADE row.
    with Image.open(tmp_path / "samples" / "vae_gan_recon_step000007.png") as im:
        assert im.size[1] == 3 * (64 + 2) + 2
    with Image.open(tmp_path / "samples" / "vae_warmup_recon_step000007.png") as im:
        w, h = im.size
        arr = np.asarray(im.convert("RGB"))
    n = int(config.samples.num_images)
    # 16 px tiles upscaled x4 to 64 px; a label column on the left; 2 labelled rows
    assert h == 2 * (64 + 2) + 2 and w > n * (64 + 2) + 2
    label_w = w - (n * (64 + 2) + 2)
    assert (arr[:, :label_w] < 128).any()  # row labels drawn
    first = arr[2:66, label_w + 2:label_w + 66]
    assert (first[::4, ::4] == first[1::4, 1::4]).all()  # nearest-neighbour 4x blocks
    with Image.open(tmp_path / "samples" / "flow_gen_step000007.png") as im:
        k = len(config.stages.flow.sample_prompts)  # one captioned column per prompt
        assert im.size[0] == k * (64 + 2) + 2 and im.size[1] > 64 + 2  # caption strip below


def test_samples_decode_with_spade_context_only_after_a_spade_stage(tiny):
    config, tok, models, params = tiny
    assert [stages.spade_trained(config, s) for s in config.stage_order] == [False, True, True]
    images = jnp.asarray(sampling.fixed_images(
        config.datasets.shapes, 2, 0, tokenizer=tok, max_length=16, name="datasets.shapes"))
    plain = sampling.reconstruct(models, params, images, use_context=False)
    warm = sampling.stage_sample_maker(config, "vae_warmup", models, tok, "/tmp/unused")
    ctx, noctx = warm._recon(params, images)
    np.testing.assert_allclose(np.asarray(noctx), np.asarray(plain), atol=1e-6)
    assert not warm.use_context and warm.gen is None
    flow = sampling.stage_sample_maker(config, "flow", models, tok, "/tmp/unused")
    assert flow.gen is not None and flow.use_context  # the demo's vae_gan trained SPADE


def test_wrap_caption_breaks_at_word_boundaries():
    assert grids.wrap_caption("a red circle above a blue square", 12) == [
        "a red circle", "above a blue", "square"]
    assert grids.wrap_caption("supercalifragilistic word", 8) == ["superca~", "word"]
    lines = grids.wrap_caption("one two three four five six", 5, max_lines=2)
    assert lines == ["one", "tw..."]  # the ellipsis fits in the width


_MESH_SCRIPT = r"""
import jax, numpy as np
from fluxflow_jax import data as data_lib, sampling, sharding
from fluxflow_jax.models import registry
assert len(jax.devices()) == 8
tok = data_lib.load_tokenizer("demo")
mcfg = dict(vae_dim=5, downscales=1, upscales=1, vae_attn_layers=1, vae_attn_heads=1,
            flow_dim=8, flow_layers=1, flow_heads=2, text_embedding_dim=8,
            text=dict(vocab_size=len(tok), dim=8, n_layers=1, n_heads=2, hidden_dim=16,
                      max_position_embeddings=16, dropout=0.0, pooling="masked_mean"))
models = registry.build_models(mcfg, {"expander", "flow", "text_encoder"})
params, _ = registry.init_params(models, jax.random.key(0), image_hw=(16, 16), text_len=8)
s = sampling.SampleSettings("euler", 2, 2.0)
prompts = ["a red circle", "a blue square", "a green triangle"]
outs = []
for mesh in (sharding.make_mesh(), sharding.make_mesh(devices=jax.devices()[:1])):
    g = sampling.Generator(models, tok, max_length=8, image_hw=(16, 16), settings=s, mesh=mesh)
    outs.append(g(params, prompts, seed=2))
assert outs[0].shape == (3, 16, 16, 3), outs[0].shape
np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
print("MESH_OK", sharding.data_size(sharding.make_mesh()))
"""


def test_generator_splits_the_batch_over_the_data_mesh():
    import os
    import subprocess
    import sys
    env = {**os.environ, "XLA_FLAGS": xla_flags(8),
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0 and "MESH_OK 8" in p.stdout, p.stderr[-3000:]


def test_make_evaluator_from_the_run_config(tiny):
    """The training loop's entry: held-out metrics of a stage as one flat dict."""
    from fluxflow_jax import evaluate

    config, tok, models, params = tiny
    ev, facts = evaluate.make_evaluator(config, models, tok, config.stages.flow, num=4)
    assert facts == {"dataset": "shapes", "held_out": True, "num": 4}
    m = ev(params)
    assert set(m) == {f"eval/{k}" for k in (
        "psnr", "ssim", "psnr_mean_image", "psnr_background", "recon_color_score", "color_score",
        "relation_score", "color_score_data", "relation_score_data")}
    assert ev.gen.settings == SampleSettings("euler", int(config.stages.flow.sample_steps),
                                             float(config.stages.flow.guidance_scale))
    assert ev.last_images["generated"].shape == (4, 16, 16, 3)
    assert m["eval/color_score_data"] == 1.0 and 0.0 <= m["eval/color_score"] <= 1.0


def test_stage_config_chooses_the_sampler(tiny):
    config, tok, models, _ = tiny
    assert sampling.stage_settings(config.stages.flow).sampler == "euler"  # flow matching
    config = config.copy_and_resolve_references()
    config.stages.flow.sampler = "heun"
    config.stages.flow.sample_steps = 5
    sm = sampling.stage_sample_maker(config, "flow", models, tok, "/tmp/unused")
    assert sm.gen.settings == SampleSettings("heun", 5, float(config.stages.flow.guidance_scale))
    config.stages.flow.loss.objective = "v_prediction"
    config.stages.flow.sampler = ""
    assert sampling.stage_settings(config.stages.flow).sampler == "vpred"
