"""The flow step: frozen VAE encode, text encode, flow-matching (or v-prediction) loss.

Latents: the sampled compressor output (as the reference; ``loss.sample_posterior=False`` takes the
posterior mean) or ``batch['latent']`` (a latent cache: packed ``[B, T+1, d]``, or the grid
``[B, h, w, d]``, which carries non-square sizes statically);
only image tokens are noised, the HW token rides along clean. Text: the text encoder (dropout
active when it is trained, as the reference's train mode) or ``batch['text_emb']``. CFG dropout
replaces rows with zeros or with the encoding of the empty prompt (``cfg_null``), which the
reference configured but never applied (section 10 item 5).

Objectives (``loss.objective``):
* ``flow_matching``: ``t ~ timestep_sampling``, ``x_t = t x1 + (1-t) x0`` (x1 data, x0 noise),
  target ``x1 - x0``, weighted by ``loss_weighting``; the model gets float t.
* ``v_prediction``: the reference's DDPM objective (linear betas, its cosine-shaped index
  sampling, ``v = sqrt(ab) eps - sqrt(1-ab) x``), with the model time ``(i + 0.5) / 999`` so the
  embedding index is ``i`` (the reference's integer t collapsed it, section 10 item 2).

LoRA (``lora_cfg``, a stage's ``lora`` block): the flow model runs with ``params['flow_lora']``
merged into its frozen kernels (``lora.merge``); only the adapters are differentiated. DOP
(``dop_multiplier > 0``): on ``batch['dop_input_ids']`` (the captions with the trigger replaced by
the class word) the adapted prediction is pulled toward the base model's (adapters off, no
gradient) at the same ``x_t`` and ``t`` with the objective's loss weighting, on steps where
``step % dop_every_n_steps == 0`` (a ``lax.cond``: the two extra forward passes cost nothing on
the other steps); ``train/loss_dop`` and ``train/dop_ran`` show when it ran.
"""
from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from fluxflow_jax import lora, losses
from fluxflow_jax.models.registry import ModelSet
from fluxflow_jax.models.vae import hw_token
from fluxflow_jax.state import TrainState
from fluxflow_jax.steps import common

F32 = jnp.float32


def _null_prompt(cfg: Mapping[str, Any], null_prompt: Mapping[str, Any] | None,
                 has_text_encoder: bool) -> dict | None:
    if cfg["cfg_null"] != "empty_prompt" or float(cfg["cfg_dropout_prob"]) <= 0:
        return None
    if null_prompt is None:
        raise ValueError("loss.cfg_null='empty_prompt' needs the empty prompt: pass null_prompt="
                         "{'input_ids': [1, L], 'attention_mask': [1, L]} (the tokenizer's "
                         "encoding of '') or {'text_emb': [1, E]} to make_flow_step")
    keys = set(null_prompt)
    if keys not in ({"input_ids", "attention_mask"}, {"text_emb"}):
        raise ValueError(f"null_prompt must hold input_ids+attention_mask or text_emb, got "
                         f"{sorted(keys)}")
    if "input_ids" in keys and not has_text_encoder:
        raise ValueError("null_prompt as token ids needs the text encoder, which this run lacks")
    return {k: jnp.asarray(v) for k, v in null_prompt.items()}


def flow_latent_grid(models: ModelSet, n_tokens: int,
                     image_hw: tuple[int, int] | None) -> tuple[int, int]:
    """Latent grid of a cached latent with ``n_tokens`` image tokens (static)."""
    if image_hw is not None:
        comp = models.require("compressor", "a latent grid from image_hw")
        h, w = common.latent_grid(comp.downscales, image_hw)
    else:
        s = math.isqrt(n_tokens)
        if s * s != n_tokens:
            raise ValueError(f"cached latents with {n_tokens} tokens are not a square grid; "
                             "pass image_hw=(H, W) to make_flow_step")
        h = w = s
    if h * w != n_tokens:
        raise ValueError(f"latent has {n_tokens} image tokens, image_hw={tuple(image_hw)} gives "
                         f"a {h}x{w} grid")
    return h, w


# What this step may log (the loop checks stop/plateau metric names against it).
METRICS = ("train/loss_flow", "train/pred_mean", "train/pred_std", "train/t_mean",
           "train/grad_norm_flow", "train/grad_norm_text", "train/grad_norm_lora",
           "train/loss_dop", "train/dop_ran") + common.COMMON_METRICS


def make_flow_step(models: ModelSet, tx: optax.GradientTransformation,
                   loss_cfg: Mapping[str, Any] | None, mesh: Mesh, state_sharding: Any, *,
                   image_hw: tuple[int, int] | None = None, frozen: Collection[str] = (),
                   advance_step: bool | None = None,
                   null_prompt: Mapping[str, Any] | None = None,
                   lora_cfg: Mapping[str, Any] | None = None):
    """Jitted ``step(state, batch, rng) -> (state, metrics)`` training the flow model
    (and the text encoder when ``loss.train_text_encoder``).

    Batch: ``image`` [B,H,W,3] or ``latent`` [B,T+1,d]; and ``input_ids`` + ``attention_mask``
    [B,L] int32 or ``text_emb`` [B,E]. ``advance_step`` defaults to True (the flow step is the
    last of an iteration). ``null_prompt``: see ``_null_prompt``. ``lora_cfg``: see the module
    docstring (DOP also needs ``dop_input_ids`` + ``dop_attention_mask`` in the batch).
    """
    cfg = common.loss_settings(loss_cfg)
    flow = models.require("flow", "the flow step")
    te = models.text_encoder
    train_te = bool(cfg["train_text_encoder"])
    if train_te and te is None:
        raise ValueError("loss.train_text_encoder=True but the run has no text encoder")
    frozen = set(frozen) | (set() if train_te else {"text_encoder"})
    objective, p_drop = cfg["objective"], float(cfg["cfg_dropout_prob"])
    if objective == "v_prediction" and cfg["loss_weighting"] != "uniform":
        raise ValueError("loss.loss_weighting applies to the flow_matching objective; "
                         "v_prediction uses the reference's plain MSE (set it to 'uniform')")
    null = _null_prompt(cfg, null_prompt, te is not None)
    advance = True if advance_step is None else bool(advance_step)
    lcfg = lora.settings(lora_cfg)
    l_scale = lora.scale(lcfg["rank"], lcfg["alpha"]) if lcfg else 0.0
    dop_mult = float(lcfg["dop_multiplier"]) if lcfg else 0.0
    dop_every = int(lcfg["dop_every_n_steps"]) if lcfg else 1

    def encode_text(pt, ids, mask, key, deterministic):
        return te.apply({"params": pt}, ids, mask, deterministic=deterministic,
                        rngs={"dropout": key}).astype(F32)

    def loss_fn(trainable: dict, state: TrainState, packed: jax.Array, batch: Mapping,
                key: jax.Array, hw, null_in: dict | None):
        pf = pf_base = trainable.get("flow", state.params["flow"])
        if lcfg is not None:
            pf = lora.merge(pf, trainable.get("flow_lora", state.params["flow_lora"]), l_scale)
        k_te, k_cfg, k_t, k_n = jax.random.split(key, 4)
        if "text_emb" in batch:
            emb = batch["text_emb"].astype(F32)
        else:
            pt = trainable.get("text_encoder", state.params.get("text_encoder"))
            emb = encode_text(pt, batch["input_ids"], batch["attention_mask"], k_te, not train_te)
        if p_drop > 0:
            null_emb = None
            if null_in is not None:
                null_emb = null_in["text_emb"] if "text_emb" in null_in else encode_text(
                    trainable.get("text_encoder", state.params.get("text_encoder")),
                    null_in["input_ids"], null_in["attention_mask"], k_te, True)
            emb = losses.cfg_dropout(k_cfg, emb, p_drop, null_emb)
        x1, hw_tok = packed[:, :-1].astype(F32), packed[:, -1:].astype(F32)
        b = x1.shape[0]
        noise = jax.random.normal(k_n, x1.shape, F32)
        predict = lambda p, xin, e, t: flow.apply({"params": p}, xin, e, t,
                                                  hw=hw)[:, :-1].astype(F32)
        if objective == "flow_matching":
            t = losses.sample_timesteps(k_t, b, cfg["timestep_sampling"])
            xin = jnp.concatenate([losses.flow_interpolate(noise, x1, t), hw_tok], 1)
            pred = predict(pf, xin, emb, t)
            loss = losses.flow_matching_loss(pred, noise, x1, t, cfg["loss_weighting"])
            weights = losses.flow_loss_weights(t, cfg["loss_weighting"])
        else:
            idx = losses.sample_ddpm_timesteps(k_t, b)
            t = losses.ddpm_model_time(idx)
            xin = jnp.concatenate([losses.ddpm_add_noise(x1, noise, idx), hw_tok], 1)
            pred = predict(pf, xin, emb, t)
            loss = jnp.mean(jnp.square(pred - losses.v_prediction_target(x1, noise, idx)))
            weights = jnp.ones((b,), F32)
        m = {"train/loss_flow": loss, "train/pred_mean": jnp.mean(pred),
             "train/pred_std": jnp.std(pred), "train/t_mean": jnp.mean(t)}
        total = loss
        if dop_mult > 0:
            def dop_term(_):
                pt = trainable.get("text_encoder", state.params.get("text_encoder"))
                emb_c = encode_text(pt, batch["dop_input_ids"], batch["dop_attention_mask"],
                                    k_te, True)
                base = jax.lax.stop_gradient(predict(pf_base, xin, emb_c, t))
                per = jnp.mean(jnp.square(predict(pf, xin, emb_c, t) - base).reshape(b, -1), 1)
                return jnp.mean(weights * per)
            ran = (state.step % dop_every) == 0
            loss_dop = jax.lax.cond(ran, dop_term, lambda _: jnp.zeros((), F32), None)
            total = loss + dop_mult * loss_dop
            m.update({"train/loss_dop": loss_dop, "train/dop_ran": ran.astype(F32)})
        return total, m

    def step_fn(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array,
                null_in: dict | None = None):
        common.check_opt_state(state, "flow")
        if "latent" not in batch:
            common.require(batch, ("image",), "flow step (no 'latent' in the batch)")
        if "text_emb" not in batch:
            common.require(batch, ("input_ids", "attention_mask"),
                           "flow step (no 'text_emb' in the batch)")
            if te is None:
                raise ValueError("flow step: the batch has token ids but the run has no text "
                                 "encoder; give cached 'text_emb' instead")
        elif train_te:
            raise ValueError("flow step: loss.train_text_encoder=True but the batch carries "
                             "cached 'text_emb'; the encoder must see token ids to train")
        if lcfg is not None and "flow_lora" not in state.params:
            raise ValueError("flow step: lora_cfg given but the state has no 'flow_lora' params "
                             "(train.create_state adds them for a stage with 'lora' in train)")
        if dop_mult > 0:
            common.require(batch, ("dop_input_ids", "dop_attention_mask"),
                           "flow step with DOP (lora.dop_multiplier > 0)")
        key = common.step_key(rng, state.step, "flow")
        k_enc, k_loss = jax.random.split(key)
        if "latent" in batch and batch["latent"].ndim == 4:  # cached grid [B, h, w, d]
            grid = batch["latent"].astype(F32)
            b, h, w, d = grid.shape
            comp = models.require("compressor", "cached latent grids (its max_hw)")
            packed = jnp.concatenate([grid.reshape(b, h * w, d),
                                      hw_token(b, (h, w), d, comp.max_hw)], axis=1)
            hw = (h, w)
        elif "latent" in batch:  # packed [B, T+1, d]
            packed = batch["latent"]
            hw = flow_latent_grid(models, packed.shape[1] - 1, image_hw)
        else:
            comp = models.require("compressor", "the flow step on images")
            img = batch["image"].astype(F32)
            packed, _, _ = comp.apply({"params": state.params["compressor"]}, img,
                                      sample=bool(cfg["sample_posterior"]), rngs={"sample": k_enc})
            hw = common.latent_grid(comp.downscales, img.shape[1:3])
        packed = jax.lax.stop_gradient(packed)

        trained = common.trained_names("flow", state.params, frozen)
        trainable = {n: state.params[n] for n in trained}
        (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, state, packed, batch, k_loss, hw, null_in)
        ok = jnp.isfinite(loss) & common.tree_finite(grads)
        new_params, new_opt = common.apply_grads(tx, "flow", state, grads, trained, ok)
        if "text_encoder" in trained and te.freeze_backbone:
            # Zero gradients do not stop weight decay: keep the frozen DistilBERT as it was.
            new_params["text_encoder"] = {**new_params["text_encoder"], "language_model":
                                          state.params["text_encoder"]["language_model"]}
        m.update(common.grad_norms(grads, {"flow": ("flow",), "text": ("text_encoder",),
                                           "lora": ("flow_lora",)}))
        return common.finish(
            state, "flow", ok, advance, m, params=new_params,
            opt_state={**state.opt_state, "flow": new_opt},
            ema=common.update_ema(state, new_params, trained, cfg, ok))

    return common.make_jitted(step_fn, mesh, state_sharding, extra=null)
