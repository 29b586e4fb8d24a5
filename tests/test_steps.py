"""Train steps on one device with tiny models: learning, frozen groups, EMA, the NaN policy,
gradient accumulation, the GAN/SPADE modes, cached latents, bf16 + remat, config errors.

Each distinct step configuration costs one XLA compilation (tens of seconds on 2 busy cores), so
the tests share compiled steps through module fixtures and give each test a fresh state (states
are donated). Params are initialised with an 'rbg' key: ~3x faster to compile than threefry.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fluxflow_jax import optim, sharding, steps
from fluxflow_jax.models import registry
from fluxflow_jax.state import create_train_state, step_params

# EMA copies of every model but the discriminator (what a stage with ema_decay > 0 keeps).
EMA_MODELS = ("compressor", "expander", "flow", "text_encoder")

MODEL_CFG = {"vae_dim": 8, "downscales": 2, "upscales": 2, "vae_attn_layers": 1,
             "vae_attn_heads": 2, "flow_dim": 16, "flow_layers": 1, "flow_heads": 2,
             "text_embedding_dim": 16, "max_hw": 1024, "activation": "bezier", "remat": False,
             "dtype": "float32", "disc": {"base_ch": 4, "depth": 2},
             "text": {"vocab_size": 64, "dim": 16, "n_layers": 1, "n_heads": 2, "hidden_dim": 32,
                      "max_position_embeddings": 16, "dropout": 0.0, "pooling": "mean",
                      "freeze_backbone": False}}
B, HW, L = 4, 16, 8
RNG = jax.random.key(7)


def loss_cfg(**kw):
    """The lead's loss config keys (config_defaults.loss_config + stage flags)."""
    d = {"kl_beta": 1e-2, "kl_warmup_steps": 0, "kl_free_bits": 0.0, "mse_weight": 0.1,
         "lambda_adv": 0.5, "lambda_lpips": 0.1, "lpips_weights": "", "r1_gamma": 5.0,
         "r1_interval": 16, "adaptive_weights": False, "color_stats_weight": 0.05,
         "hist_weight": 0.02, "contrast_weight": 0.1, "objective": "flow_matching",
         "timestep_sampling": "uniform", "loss_weighting": "uniform", "cfg_dropout_prob": 0.0,
         "cfg_null": "zeros", "train_reconstruction": True, "use_gan": False, "use_spade": True,
         "use_lpips": False, "ema_decay": 0.0, "train_text_encoder": False}
    d.update(kw)
    return d


def adam(lr, group):
    return optim.make_optimizer({"type": "Adam", "lr": lr}, None, 10_000,
                                name=f"optimizers.{group}")


def partitioned(kind, params, groups, txs):
    """The lead's pattern: one partition per step kind, label per model ('frozen' -> None)."""
    sub = step_params(kind, params)
    labels = optim.param_labels(sub, {m: groups.get(m, "frozen") for m in sub})
    return optim.make_partitioned({"frozen": None, **txs}, labels)


def host(tree):
    """A host (numpy) copy: survives the donation of the device arrays."""
    return jax.tree.map(lambda x: np.array(x), jax.device_get(tree))


def assert_tree_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_tree_differs(a, b):
    assert any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def images(b=B, hw=HW, seed=0):
    """Smooth, learnable images in [-1, 1]."""
    yy, xx = np.meshgrid(np.linspace(0, 1, hw), np.linspace(0, 1, hw), indexing="ij")
    out = []
    r = np.random.default_rng(seed)
    for _ in range(b):
        f, ph = r.uniform(0.5, 2.0, 3), r.uniform(0, 2 * np.pi, 3)
        out.append(np.stack([np.sin(2 * np.pi * f[c] * (xx + yy * c / 2) + ph[c]) * 0.8
                             for c in range(3)], -1))
    return np.stack(out).astype(np.float32)


@dataclasses.dataclass
class World:
    models: registry.ModelSet
    params: dict
    spectral: dict
    mesh: object
    txs: dict
    sh: object
    batch: dict

    def state(self, txs=None, ema=True):
        txs = self.txs if txs is None else txs
        st = create_train_state(jax.tree.map(jnp.array, self.params), txs,
                                spectral=jax.tree.map(jnp.array, self.spectral),
                                ema_models=EMA_MODELS if ema else ())
        sh = self.sh if txs is self.txs and ema else sharding.tree_shardings(st, self.mesh)
        return jax.device_put(st, sh), sh


@pytest.fixture(scope="module")
def world():
    models = registry.build_models(MODEL_CFG, set(registry.MODEL_NAMES))
    params, spectral = host(registry.init_params(models, jax.random.key(0, impl="rbg"),
                                                 (HW, HW), L))
    txs = {"vae": partitioned("vae", params, {"compressor": "vae", "expander": "vae"},
                              {"vae": adam(3e-3, "vae")}),
           "disc": partitioned("disc", params, {"discriminator": "discriminator"},
                               {"discriminator": adam(2e-3, "discriminator")}),
           # text encoder frozen through its optimizer label, although the step differentiates it
           "flow": partitioned("flow", params, {"flow": "flow"}, {"flow": adam(3e-3, "flow")})}
    mesh = sharding.make_mesh()
    st = create_train_state(params, txs, spectral=spectral, ema_models=EMA_MODELS)
    sh = sharding.tree_shardings(st, mesh)
    r = np.random.default_rng(1)
    batch = {"image": images(), "input_ids": r.integers(1, 64, (B, L)).astype(np.int32),
             "attention_mask": np.ones((B, L), np.int32)}
    return World(models, params, spectral, mesh, txs, sh, sharding.put_batch(batch, mesh))


@pytest.fixture(scope="module")
def vae_step(world):
    cfg = loss_cfg(use_gan=True, adaptive_weights=True, ema_decay=0.9)
    # A GAN stage has no flow step after it, so the VAE step advances the counter.
    return steps.make_vae_step(world.models, world.txs["vae"], cfg, world.mesh, world.sh,
                               advance_step=True)


def run(step, state, batch, n):
    hist = []
    for _ in range(n):
        state, m = step(state, batch, RNG)
        hist.append({k: float(v) for k, v in m.items()})
    return state, hist


def mean_of(hist, key, sl):
    return float(np.mean([h[key] for h in hist[sl]]))


# ----------------------------------------------------------------------------------------------


def test_vae_step_learns_tracks_ema_and_keeps_other_models(world, vae_step):
    state, _ = world.state()
    p0 = host(state.params)
    state, m = vae_step(state, world.batch, RNG)
    p1, e1 = host(state.params), host(state.ema)
    # EMA after one step from ema = params0: s = d * p0 + (1 - d) * p1.
    for n in ("compressor", "expander"):
        want = jax.tree.map(lambda a, b: 0.9 * a + 0.1 * b, p0[n], p1[n])
        for x, y in zip(jax.tree.leaves(e1[n]), jax.tree.leaves(want)):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
        assert_tree_differs(p1[n], p0[n])
    for n in ("flow", "text_encoder", "discriminator"):
        assert_tree_equal(p1[n], p0[n])
    assert_tree_equal(e1["flow"], p0["flow"])
    assert int(state.step) == 1
    for k in ("train/loss_recon", "train/kl", "train/kl_beta", "train/loss_g",
              "train/weight_gan", "train/grad_norm_vae", "learning/lr_vae", "train/nonfinite"):
        assert k in m, k
    assert float(m["train/weight_gan"]) > 0  # magnitudes, not signed averages (ref bug fixed)
    assert float(m["learning/lr_vae"]) == pytest.approx(3e-3)
    spectral_before = host(state.spectral)

    state, hist = run(vae_step, state, world.batch, 119)
    first, last = mean_of(hist, "train/loss_recon", slice(0, 5)), mean_of(
        hist, "train/loss_recon", slice(-10, None))
    assert last < 0.6 * first, (first, last)
    # The GAN term runs D in train mode: its power-iteration state advances, its params do not.
    assert_tree_differs(host(state.spectral), spectral_before)
    assert_tree_equal(host(state.params["discriminator"]), p0["discriminator"])
    assert int(state.loss_stats["vae"]["count"]["recon"]) == 120
    # EMA relation on the last step too.
    ema_prev = host(state.ema)
    state, _ = vae_step(state, world.batch, RNG)
    p_new, ema_new = host(state.params), host(state.ema)
    for n in ("compressor", "expander"):
        for e, ep, p in zip(jax.tree.leaves(ema_new[n]), jax.tree.leaves(ema_prev[n]),
                            jax.tree.leaves(p_new[n])):
            np.testing.assert_allclose(e, 0.9 * ep + 0.1 * p, rtol=1e-6, atol=1e-7)


def test_nonfinite_loss_skips_the_update(world, vae_step):
    state, _ = world.state()
    state, _ = vae_step(state, world.batch, RNG)  # some optimizer/EMA/spectral history
    before = host(state)
    bad = dict(world.batch)
    bad["image"] = world.batch["image"].at[0, 0, 0, 0].set(jnp.nan)
    state, m = vae_step(state, bad, RNG)
    assert float(m["train/nonfinite"]) == 1.0 and float(m["train/skipped_vae"]) == 1.0
    after = host(state)
    assert int(after.step) == int(before.step) + 1
    assert int(after.nonfinite) == 1
    for field in ("params", "opt_state", "ema", "spectral", "loss_stats"):
        assert_tree_equal(getattr(after, field), getattr(before, field))
    # A finite batch afterwards updates again and the count stays.
    state, m = vae_step(state, world.batch, RNG)
    assert float(m["train/skipped_vae"]) == 0.0 and int(state.nonfinite) == 1
    assert_tree_differs(host(state.params["expander"]), before.params["expander"])


def test_disc_step_learns_with_r1_and_gan_iteration_counts_steps(world, vae_step):
    disc_step = steps.make_disc_step(world.models, world.txs["disc"],
                                     loss_cfg(use_gan=True, ema_decay=0.9), world.mesh, world.sh)
    state, _ = world.state()
    p0, s0 = host(state.params), host(state.spectral)
    state, hist = run(disc_step, state, world.batch, 100)
    # The D step alone does not advance the step (the VAE step after it does): R1 due each time.
    assert int(state.step) == 0
    assert all(h["train/r1"] > 0 for h in hist)
    first, last = mean_of(hist, "train/loss_d", slice(0, 5)), mean_of(hist, "train/loss_d",
                                                                      slice(-10, None))
    assert last < 0.7 * first, (first, last)
    assert hist[-1]["train/d_real"] > hist[-1]["train/d_fake"]
    p1 = host(state.params)
    for n in ("compressor", "expander", "flow", "text_encoder"):
        assert_tree_equal(p1[n], p0[n])
    assert_tree_differs(p1["discriminator"], p0["discriminator"])
    assert_tree_differs(host(state.spectral), s0)
    # One iteration = D then G; the counter moves once; lazy R1 only every r1_interval steps.
    r1 = []
    for _ in range(3):
        state, md = disc_step(state, world.batch, RNG)
        state, _ = vae_step(state, world.batch, RNG)
        r1.append(float(md["train/r1"]))
    assert int(state.step) == 3
    assert r1[0] > 0 and r1[1] == 0.0 and r1[2] == 0.0


def test_disc_step_without_r1_runs_real_and_fake_as_one_call(world):
    """Steps without R1 push real and fake through D in one call (``passes=2``); steps with R1 in
    two. With a vanishing R1 weight both give the same logits, u/v and update."""
    one = steps.make_disc_step(world.models, world.txs["disc"],
                               loss_cfg(use_gan=True, r1_gamma=0.0), world.mesh, world.sh)
    two = steps.make_disc_step(world.models, world.txs["disc"],
                               loss_cfg(use_gan=True, r1_gamma=1e-30, r1_interval=1),
                               world.mesh, world.sh)
    out = []
    for step in (one, two):
        state, _ = world.state()
        state, m = run(step, state, world.batch, 2)
        out.append((host(state.params["discriminator"]), host(state.spectral), m))
    (pa, sa, ma), (pb, sb, mb) = out
    assert "train/r1" not in ma[-1] and mb[-1]["train/r1"] < 1e-20
    for k in ("train/d_real", "train/d_fake", "train/loss_d_hinge"):
        for a, b in zip(ma, mb):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves((pa, sa)), jax.tree.leaves((pb, sb))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_flow_step_learns_and_label_frozen_text_encoder_is_bit_identical(world):
    # Posterior mean latents: with sampled ones the target's own noise dominates the loss.
    cfg = loss_cfg(train_text_encoder=True, cfg_dropout_prob=0.25, ema_decay=0.5,
                   sample_posterior=False)
    flow_step = steps.make_flow_step(world.models, world.txs["flow"], cfg, world.mesh, world.sh)
    state, _ = world.state()
    p0 = host(state.params)
    state, hist = run(flow_step, state, world.batch, 150)
    assert int(state.step) == 150
    first, last = mean_of(hist, "train/loss_flow", slice(0, 10)), mean_of(
        hist, "train/loss_flow", slice(-20, None))
    assert last < 0.75 * first, (first, last)
    p1 = host(state.params)
    # 'frozen' label -> optax.set_to_zero: bit-identical although it receives gradients.
    assert hist[0]["train/grad_norm_text"] > 0
    for n in ("text_encoder", "compressor", "expander", "discriminator"):
        assert_tree_equal(p1[n], p0[n])
    assert_tree_differs(p1["flow"], p0["flow"])
    assert "learning/lr_flow" in hist[0] and "learning/lr_text_encoder" not in hist[0]


def test_flow_step_cached_latents_v_prediction_bf16_remat(world):
    cfg16 = dict(MODEL_CFG, dtype="bfloat16", remat=True)
    models = registry.build_models(cfg16, set(registry.MODEL_NAMES))
    assert models.flow.dtype == jnp.bfloat16 and models.flow.remat
    txs = dict(world.txs, flow=partitioned("flow", world.params, {"flow": "flow"},
                                           {"flow": adam(1e-2, "flow")}))
    state, sh = world.state(txs)
    r = np.random.default_rng(3)
    hw_tok = np.zeros((B, 1, 8), np.float32)
    hw_tok[:, 0, :2] = 4 / 1024  # a 4x4 grid
    grid = np.linspace(-1, 1, 16)[None, :, None]
    smooth = np.sin(3 * grid * np.arange(1, 9)[None, None, :] + np.arange(B)[:, None, None])
    latent = np.concatenate([smooth.astype(np.float32), hw_tok], 1)
    batch = sharding.put_batch({"latent": latent,
                                "text_emb": r.normal(size=(B, 16)).astype(np.float32)},
                               world.mesh)
    step = steps.make_flow_step(models, txs["flow"], loss_cfg(objective="v_prediction"),
                                world.mesh, sh, image_hw=(HW, HW))
    p0 = host(state.params)
    state, hist = run(step, state, batch, 150)
    first, last = mean_of(hist, "train/loss_flow", slice(0, 10)), mean_of(
        hist, "train/loss_flow", slice(-20, None))
    # v-prediction mostly samples low-noise indices, where v ~ eps is learnt slowly: a smaller
    # but clear drop (measured ~0.80 -> ~0.69).
    assert last < 0.93 * first, (first, last)
    # Master weights stay float32 (bf16 is the compute dtype only).
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params["flow"]))
    assert_tree_equal(host(state.params["text_encoder"]), p0["text_encoder"])
    # The encoder must see token ids to be trained.
    bad = steps.make_flow_step(models, txs["flow"], loss_cfg(train_text_encoder=True),
                               world.mesh, sh)
    with pytest.raises(ValueError, match="carries cached 'text_emb'"):
        bad(state, batch, RNG)


def test_gan_only_without_spade(world):
    """GAN-only: no recon terms, G's gradient reaches the compressor through the undetached
    latent; SPADE off: SPADE weights get no gradient and stay bit-identical under Adam."""
    cfg = loss_cfg(train_reconstruction=False, use_gan=True, use_spade=False)
    step = steps.make_vae_step(world.models, world.txs["vae"], cfg, world.mesh, world.sh)
    state, _ = world.state()
    p0 = host(state.params)
    state, m = step(state, world.batch, RNG)
    assert "train/loss_recon" not in m and "train/color_stats" not in m
    assert "train/loss_g" in m and float(m["train/skipped_vae"]) == 0.0
    p1 = host(state.params)
    assert_tree_differs(p1["compressor"], p0["compressor"])
    assert "spade" in p0["expander"]["upscale_0"], sorted(p0["expander"]["upscale_0"])
    for i in range(2):
        assert_tree_equal(p1["expander"][f"upscale_{i}"]["spade"],
                          p0["expander"][f"upscale_{i}"]["spade"])
        assert_tree_differs(p1["expander"][f"upscale_{i}"]["conv_t"],
                            p0["expander"][f"upscale_{i}"]["conv_t"])


def test_multisteps_accumulation_equals_one_big_batch_step(world):
    """MultiSteps(k) over k micro-batches == one step on the concatenated batch (deterministic
    posterior, batch-separable losses); the expander, frozen by label, stays bit-identical."""
    p = world.params
    groups = {"compressor": "vae"}
    # SGD: the update is linear in the gradient, so the comparison is sharp (Adam's first step
    # g / (|g| + eps) amplifies float rounding of near-zero gradients).
    sgd = lambda: optim.make_optimizer({"type": "SGD", "lr": 0.5}, None, 100,
                                       name="optimizers.vae")
    base = lambda: partitioned("vae", p, groups, {"vae": sgd()})
    cfg = loss_cfg(sample_posterior=False, adaptive_weights=False, color_stats_weight=0.0,
                   hist_weight=0.0, contrast_weight=0.0)
    full = world.batch["image"]

    tx_acc = optim.with_accumulation(base(), 2)
    st_a, sh_a = world.state({"vae": tx_acc}, ema=False)
    step_a = steps.make_vae_step(world.models, tx_acc, cfg, world.mesh, sh_a)
    st_a, m1 = step_a(st_a, {"image": full[:2]}, RNG)
    assert_tree_equal(host(st_a.params["compressor"]), p["compressor"])  # no update yet
    st_a, m2 = step_a(st_a, {"image": full[2:]}, RNG)

    tx_one = base()
    st_b, sh_b = world.state({"vae": tx_one}, ema=False)
    step_b = steps.make_vae_step(world.models, tx_one, cfg, world.mesh, sh_b)
    st_b, mb = step_b(st_b, {"image": full}, RNG)

    np.testing.assert_allclose((float(m1["train/loss_vae"]) + float(m2["train/loss_vae"])) / 2,
                               float(mb["train/loss_vae"]), rtol=1e-5)
    pa, pb = host(st_a.params), host(st_b.params)
    assert_tree_differs(pb["compressor"], p["compressor"])
    deltas = [(np.asarray(a) - np.asarray(c), np.asarray(b) - np.asarray(c)) for a, b, c in zip(
        jax.tree.leaves(pa["compressor"]), jax.tree.leaves(pb["compressor"]),
        jax.tree.leaves(p["compressor"]))]
    scale = max(float(np.abs(db).max()) for _, db in deltas)
    assert scale > 1e-4
    for da, db in deltas:  # atol: the deltas carry the float32 rounding of the params (1 ulp)
        np.testing.assert_allclose(da, db, rtol=1e-3, atol=1e-3 * scale)
    assert_tree_equal(pa["expander"], p["expander"])
    assert_tree_equal(pb["expander"], p["expander"])


# ----------------------------------------------------------------------------------------------
# configuration errors (raised before or while tracing, no compilation)


def test_config_errors_name_the_key(world):
    m, mesh, sh = world.models, world.mesh, world.sh
    with pytest.raises(ValueError, match=r"config.loss.kl_weight: unknown key"):
        steps.make_vae_step(m, world.txs["vae"], {"kl_weight": 1.0}, mesh, sh)
    with pytest.raises(ValueError, match="config.loss.lpips_weights is empty"):
        steps.make_vae_step(m, world.txs["vae"], loss_cfg(use_lpips=True), mesh, sh)
    with pytest.raises(ValueError, match=r"config.loss.objective: 'ddim' not in"):
        steps.make_flow_step(m, world.txs["flow"], loss_cfg(objective="ddim"), mesh, sh)
    with pytest.raises(ValueError, match="cfg_null='empty_prompt' needs the empty prompt"):
        steps.make_flow_step(m, world.txs["flow"],
                             loss_cfg(cfg_null="empty_prompt", cfg_dropout_prob=0.1), mesh, sh)
    with pytest.raises(ValueError, match="v_prediction uses the reference's plain MSE"):
        steps.make_flow_step(m, world.txs["flow"],
                             loss_cfg(objective="v_prediction", loss_weighting="bell_shaped"),
                             mesh, sh)
    no_disc = dataclasses.replace(m, discriminator=None)
    with pytest.raises(ValueError, match="needs the 'discriminator' model"):
        steps.make_vae_step(no_disc, world.txs["vae"], loss_cfg(use_gan=True), mesh, sh)
    step = steps.make_vae_step(m, world.txs["vae"], loss_cfg(), mesh, sh)
    state, _ = world.state()
    with pytest.raises(KeyError, match=r"VAE step: batch lacks \['image'\]"):
        step(state, {"latent": world.batch["image"]}, RNG)
    st_noopt, sh_noopt = world.state({"flow": world.txs["flow"]})
    step2 = steps.make_vae_step(m, world.txs["vae"], loss_cfg(), mesh, sh_noopt)
    with pytest.raises(ValueError, match=r"state.opt_state has no 'vae' entry"):
        step2(st_noopt, world.batch, RNG)
    with pytest.raises(ValueError, match="unknown model name"):
        registry.build_models(MODEL_CFG, {"unet"})
    with pytest.raises(KeyError, match=r"config.model: unknown key\(s\) \['vae_dims'\]"):
        registry.build_models(dict(MODEL_CFG, vae_dims=3), {"compressor"})
    with pytest.raises(ValueError, match="config.model.text.vocab_size is 0"):
        registry.build_models(dict(MODEL_CFG, text=dict(MODEL_CFG["text"], vocab_size=0)),
                              {"text_encoder"})
