"""The VAE (generator) step: reconstruction and/or GAN-generator terms (REFERENCE.md 2.1 (b)).

``total = w_kl * beta * KL + w_recon * recon + w_gan * lambda_adv * G
          + color_stats_weight * color + hist_weight * hist + contrast_weight * contrast``

* recon = frequency-L1 + mse_weight * MSE (+ lambda_lpips * LPIPS); the regularisers are on only
  with reconstruction, as in the reference.
* G: a *second* decoder pass on the packed latent, detached when reconstruction is trained (so the
  adversarial gradient reaches the expander only), not detached in GAN-only mode (where the first
  pass is reused: the expander is deterministic, so the numbers are the reference's). The
  discriminator runs in train mode (its spectral u/v advance and are stored), its params frozen.
* Adaptive weights balance loss magnitudes over 100-step windows (``losses.adaptive_weights``,
  with the reference's sign bug fixed); off = all weights 1. The reference's instance noise never
  took effect (section 10 item 10) and is not reproduced.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from fluxflow_jax import losses
from fluxflow_jax.lpips import load_lpips_weights, lpips_distance
from fluxflow_jax.models.registry import ModelSet
from fluxflow_jax.state import TrainState
from fluxflow_jax.steps import common

F32 = jnp.float32


def load_lpips_params(cfg: Mapping[str, Any], lpips_params: dict | None) -> dict | None:
    """LPIPS weights when the step uses LPIPS: the given tree, else ``loss.lpips_weights`` files."""
    if not cfg["use_lpips"] or not cfg["train_reconstruction"]:
        return None
    if lpips_params is not None:
        return lpips_params
    paths = cfg["lpips_weights"]
    if not paths:
        raise ValueError("config.loss.lpips_weights is empty but the stage uses LPIPS: name the "
                         "local safetensors file(s) with the VGG16 and LPIPS head weights "
                         "(make it with: python -m fluxflow_jax.convert lpips --vgg vgg16-397923af.pth "
                         "--lin vgg.pth --out lpips.safetensors)")
    return load_lpips_weights(paths)


# What this step may log (the loop checks stop/plateau metric names against it; the GAN, LPIPS and
# adaptive-weight entries appear only when those are on).
METRICS = ("train/loss_recon", "train/kl", "train/kl_beta", "train/loss_vae", "train/color_stats",
           "train/hist", "train/contrast", "train/loss_g", "train/lpips", "train/weight_recon",
           "train/weight_kl", "train/weight_gan", "train/grad_norm_vae") + common.COMMON_METRICS


def make_vae_step(models: ModelSet, tx: optax.GradientTransformation,
                  loss_cfg: Mapping[str, Any] | None, mesh: Mesh, state_sharding: Any, *,
                  image_hw: tuple[int, int] | None = None, frozen: Collection[str] = (),
                  advance_step: bool | None = None, lpips_params: dict | None = None):
    """Jitted ``step(state, batch, rng) -> (state, metrics)`` training compressor + expander.

    ``batch['image']`` [B, H, W, 3] in [-1, 1] (``image_hw``, if given, is checked against it).
    ``frozen`` models are neither differentiated nor updated. ``advance_step`` (default: True
    unless the run also has a flow model, whose step then runs last and advances) says whether
    this step increments ``state.step``. ``lpips_params`` overrides ``loss.lpips_weights``.
    """
    cfg = common.loss_settings(loss_cfg)
    comp = models.require("compressor", "the VAE step")
    expd = models.require("expander", "the VAE step")
    disc = models.require("discriminator", "the VAE step with use_gan") if cfg["use_gan"] else None
    train_recon, use_gan = bool(cfg["train_reconstruction"]), bool(cfg["use_gan"])
    use_spade, adaptive = bool(cfg["use_spade"]), bool(cfg["adaptive_weights"])
    lp = load_lpips_params(cfg, lpips_params)
    advance = (models.flow is None) if advance_step is None else bool(advance_step)

    def loss_fn(trainable: dict, state: TrainState, img: jax.Array, key: jax.Array, hw,
                lp_params: dict | None):
        pc = trainable.get("compressor", state.params["compressor"])
        pe = trainable.get("expander", state.params["expander"])
        packed, mu, logvar = comp.apply({"params": pc}, img, sample=bool(cfg["sample_posterior"]),
                                        rngs={"sample": key})
        rec = expd.apply({"params": pe}, packed, use_context=use_spade, hw=hw).astype(F32)
        kl = losses.kl_standard_normal(mu.astype(F32), logvar.astype(F32),
                                       float(cfg["kl_free_bits"]))
        beta = losses.kl_beta(state.step, int(cfg["kl_warmup_steps"]), float(cfg["kl_beta"]))
        m = {"train/kl": kl, "train/kl_beta": beta}
        terms = {"kl": kl}
        reg = jnp.zeros((), F32)
        if train_recon:
            recon = losses.reconstruction_loss(rec, img, float(cfg["mse_weight"]))
            if lp_params is not None:
                dist = jnp.mean(lpips_distance(jax.lax.stop_gradient(lp_params), rec, img))
                recon = recon + float(cfg["lambda_lpips"]) * dist
                m["train/lpips"] = dist
            color = losses.color_stats_loss(rec, img)
            hist = losses.histogram_loss(rec, img)
            contrast = losses.contrast_loss(rec, img)
            reg = (float(cfg["color_stats_weight"]) * color + float(cfg["hist_weight"]) * hist
                   + float(cfg["contrast_weight"]) * contrast)
            terms["recon"] = recon
            m.update({"train/loss_recon": recon, "train/color_stats": color, "train/hist": hist,
                      "train/contrast": contrast})
        spectral = state.spectral
        if use_gan:
            z_g = jax.lax.stop_gradient(packed) if train_recon else packed
            gen = (expd.apply({"params": pe}, z_g, use_context=use_spade, hw=hw).astype(F32)
                   if train_recon else rec)
            ctx_g = jnp.mean(z_g[:, :-1], axis=1).astype(F32)
            pd = jax.lax.stop_gradient(state.params["discriminator"])
            logits, upd = disc.apply({"params": pd, "spectral": state.spectral}, gen, ctx_g,
                                     train=True, mutable=["spectral"])
            g = float(cfg["lambda_adv"]) * losses.g_hinge_loss(logits.astype(F32))
            spectral = upd["spectral"]
            terms["gan"] = g
            m["train/loss_g"] = g

        hist_state = state.loss_stats.get("vae") if state.loss_stats else None
        if adaptive:
            if hist_state is None:
                raise ValueError("loss.adaptive_weights=True needs state.loss_stats['vae'] "
                                 "(create the state with adaptive_window > 0)")
            pushed = jax.tree.map(jax.lax.stop_gradient, terms)
            hist_state = losses.loss_history_push(hist_state, pushed)
            avgs = losses.loss_history_averages(hist_state)
            w = losses.adaptive_weights({k: avgs[k] for k in terms})
            w = {k: jax.lax.stop_gradient(v) for k, v in w.items()}
        else:
            w = {k: jnp.ones((), F32) for k in terms}
        total = w["kl"] * beta * kl + reg
        if train_recon:
            total = total + w["recon"] * terms["recon"]
        if use_gan:
            total = total + w["gan"] * terms["gan"]
        m.update({f"train/weight_{k}": v for k, v in w.items()})
        m["train/loss_vae"] = total
        return total, (m, spectral, hist_state)

    def step_fn(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array,
                lp_params: dict | None = None):
        common.require(batch, ("image",), "VAE step")
        common.check_opt_state(state, "vae")
        img = batch["image"].astype(F32)
        if image_hw is not None and tuple(img.shape[1:3]) != tuple(image_hw):
            raise ValueError(f"VAE step built for image_hw={tuple(image_hw)}, got a batch of "
                             f"{tuple(img.shape[1:3])}")
        hw = common.latent_grid(comp.downscales, img.shape[1:3])
        key = common.step_key(rng, state.step, "vae")
        trained = common.trained_names("vae", state.params, frozen)
        trainable = {n: state.params[n] for n in trained}
        (loss, (m, spectral, hist_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, state, img, key, hw, lp_params)
        ok = jnp.isfinite(loss) & common.tree_finite(grads)
        new_params, new_opt = common.apply_grads(tx, "vae", state, grads, trained, ok)
        changes = {"params": new_params, "opt_state": {**state.opt_state, "vae": new_opt},
                   "ema": common.update_ema(state, new_params, trained, cfg, ok),
                   "spectral": common.select(ok, spectral, state.spectral)}
        if adaptive:
            changes["loss_stats"] = {**state.loss_stats,
                                     "vae": common.select(ok, hist_state, state.loss_stats["vae"])}
        m.update(common.grad_norms(grads, {"vae": trained}))
        return common.finish(state, "vae", ok, advance, m, **changes)

    # LPIPS weights travel as a (replicated) jit argument, not as constants baked into the HLO.
    return common.make_jitted(step_fn, mesh, state_sharding, extra=lp)
