"""The discriminator step: hinge loss + lazy R1 on the VAE's outputs (REFERENCE.md 2.1 (a)).

Fakes come from the *sampled* compressor (``loss.sample_posterior``, default True as the
reference; False uses the posterior mean) and the expander (SPADE per ``use_spade``), under
``stop_gradient``; the projection context is the token mean of the packed latent. D runs in train
mode: D(real) then D(fake), each one spectral-norm power iteration, stored in ``state.spectral``;
without R1 both go through one call (``passes=2``, see ``models.discriminator``): one
convolution per layer over both halves.
R1 (``r1_gamma * 0.5 * E||grad_x D(x)||^2`` on reals, not scaled by the interval, as the
reference) is added when ``state.step % r1_interval == 0``; it shares the real forward pass. The
reference's instance noise never took effect (section 10 item 10) and is not reproduced.
D gradients are clipped only if its optimizer config sets ``clip_norm``.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from fluxflow_jax import losses
from fluxflow_jax.models.registry import ModelSet
from fluxflow_jax.state import TrainState
from fluxflow_jax.steps import common

F32 = jnp.float32


# What this step may log (the loop checks stop/plateau metric names against it).
METRICS = ("train/loss_d", "train/loss_d_hinge", "train/d_real", "train/d_fake", "train/r1",
           "train/grad_norm_disc") + common.COMMON_METRICS


def make_disc_step(models: ModelSet, tx: optax.GradientTransformation,
                   loss_cfg: Mapping[str, Any] | None, mesh: Mesh, state_sharding: Any, *,
                   image_hw: tuple[int, int] | None = None, frozen: Collection[str] = (),
                   advance_step: bool | None = None):
    """Jitted ``step(state, batch, rng) -> (state, metrics)`` training the discriminator.

    ``batch['image']`` [B, H, W, 3] in [-1, 1]. ``advance_step`` defaults to False: the D step is
    the first half of the reference's VAE step, and the VAE step that follows advances the
    counter (both see the same ``state.step``, as the reference's D and G see one global step).
    """
    cfg = common.loss_settings(loss_cfg)
    comp = models.require("compressor", "the discriminator step")
    expd = models.require("expander", "the discriminator step")
    disc = models.require("discriminator", "the discriminator step")
    use_spade = bool(cfg["use_spade"])
    gamma, interval = float(cfg["r1_gamma"]), int(cfg["r1_interval"])
    use_r1 = gamma > 0 and interval > 0
    advance = False if advance_step is None else bool(advance_step)

    def d_apply(pd, spectral, x, ctx, passes=1):
        return disc.apply({"params": pd, "spectral": spectral}, x, ctx, train=True,
                          mutable=["spectral"], passes=passes)

    def loss_fn(trainable: dict, state: TrainState, real: jax.Array, fake: jax.Array,
                ctx: jax.Array):
        pd = trainable.get("discriminator", state.params["discriminator"])
        spectral0 = state.spectral

        def one_pass():
            # D(real) then D(fake) as one call over both (``passes=2``: same logits and u/v).
            logits, upd = d_apply(pd, spectral0, jnp.concatenate([real, fake]),
                                  jnp.concatenate([ctx, ctx]), passes=2)
            b = real.shape[0]
            return jnp.zeros((), F32), logits[:b], logits[b:], upd

        def with_r1():
            # R1 differentiates the real pass with respect to its input: kept separate so the
            # double backward does not also run over the fakes.
            pen, (logits, upd) = losses.r1_penalty_and_logits(
                lambda x: d_apply(pd, spectral0, x, ctx), real, gamma, has_aux=True)
            fake_logits, upd = d_apply(pd, upd["spectral"], fake, ctx)
            return pen.astype(F32), logits, fake_logits, upd

        if use_r1:
            r1, real_logits, fake_logits, upd = jax.lax.cond(
                losses.r1_due(state.step, interval), with_r1, one_pass)
        else:
            r1, real_logits, fake_logits, upd = one_pass()
        hinge = losses.d_hinge_loss(real_logits.astype(F32), fake_logits.astype(F32))
        total = hinge + r1
        m = {"train/loss_d": total, "train/loss_d_hinge": hinge,
             "train/d_real": jnp.mean(real_logits.astype(F32)),
             "train/d_fake": jnp.mean(fake_logits.astype(F32))}
        if use_r1:
            m["train/r1"] = r1
        return total, (m, upd["spectral"])

    def step_fn(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array):
        common.require(batch, ("image",), "discriminator step")
        common.check_opt_state(state, "disc")
        real = batch["image"].astype(F32)
        if image_hw is not None and tuple(real.shape[1:3]) != tuple(image_hw):
            raise ValueError(f"discriminator step built for image_hw={tuple(image_hw)}, got a "
                             f"batch of {tuple(real.shape[1:3])}")
        hw = common.latent_grid(comp.downscales, real.shape[1:3])
        key = common.step_key(rng, state.step, "disc")
        packed, _, _ = comp.apply({"params": state.params["compressor"]}, real,
                                  sample=bool(cfg["sample_posterior"]), rngs={"sample": key})
        fake = expd.apply({"params": state.params["expander"]}, packed, use_context=use_spade,
                          hw=hw).astype(F32)
        ctx = jnp.mean(packed[:, :-1], axis=1).astype(F32)
        fake, ctx = jax.lax.stop_gradient(fake), jax.lax.stop_gradient(ctx)

        trained = common.trained_names("disc", state.params, frozen)
        trainable = {n: state.params[n] for n in trained}
        (loss, (m, spectral)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, state, real, fake, ctx)
        ok = jnp.isfinite(loss) & common.tree_finite(grads)
        new_params, new_opt = common.apply_grads(tx, "disc", state, grads, trained, ok)
        m.update(common.grad_norms(grads, {"disc": trained}))
        return common.finish(
            state, "disc", ok, advance, m, params=new_params,
            opt_state={**state.opt_state, "disc": new_opt},
            ema=common.update_ema(state, new_params, trained, cfg, ok),
            spectral=common.select(ok, spectral, state.spectral))

    return common.make_jitted(step_fn, mesh, state_sharding)
