"""Cases of ``benchmarks/vs_reference.py``: the models both sides train, and our side's losses.

A case is ``{kind, config, batch, image | tokens | text_len}``. Kinds:

* ``vae``: compressor (always samples, as the reference) + expander with SPADE, L1 loss;
  ``config.remat`` recomputes activations in the backward on both sides (our ``model.remat``,
  the reference's gradient checkpointing);
* ``flow``: flow processor on packed latents, MSE against a fixed target;
* ``disc``: patch discriminator (spectral norm, projection context), hinge loss on a real and a
  fake batch (two forward passes, one power iteration each, as torch in train mode);
* ``text``: the reference's text encoder (DistilBERT 768/6/12 + Bezier head), MSE against a
  fixed target, dropout off on both sides;
* ``vae_gan``: one VAE + GAN iteration as the reference's trainer runs it: a discriminator step
  (hinge on real vs the detached reconstruction, context = token mean of the packed latent) then
  a generator step (L1 + 0.1 * the generator hinge through D in train mode), each with its own
  Adam; D's parameters are not trained in the generator step;
* ``flow_iter``: one flow iteration with the frozen text encoder in the step: text embedding
  under no-grad, then the flow step (flow-matching target on the packed latents).

``build_case`` returns our parameters, the extra (non-trained) state, a list of *parts* - one
``(trained model names, loss_fn)`` per optimizer step of the iteration - the NHWC inputs shared
with the torch worker, and the weights in the reference's state-dict layout.
"""
from __future__ import annotations

import numpy as np

TEXT_CFG = {"vocab_size": 30522, "dim": 768, "n_layers": 6, "n_heads": 12, "hidden_dim": 3072,
            "max_position_embeddings": 512, "dropout": 0.1, "pooling": "mean",
            "freeze_backbone": False}


def _vae(d, ds, attn, heads, image, batch, remat=False):
    cfg = {"vae_dim": d, "downscales": ds, "attn_layers": attn, "attn_heads": heads}
    return {"kind": "vae", "image": image, "batch": batch,
            "config": {**cfg, "remat": True} if remat else cfg}


def _flow(dim, layers, side, batch, vae_dim=128, emb=1024, heads=8):
    return {"kind": "flow", "tokens": (side, side), "batch": batch,
            "config": {"flow_dim": dim, "vae_dim": vae_dim, "embedding": emb, "heads": heads,
                       "layers": layers}}


def _disc(base, depth, image, batch, ctx=16):
    return {"kind": "disc", "image": image, "batch": batch,
            "config": {"base_ch": base, "depth": depth, "ctx_dim": ctx}}


CASES: dict[str, dict] = {
    "vae16": _vae(16, 4, 2, 2, 64, 2),
    "vae32": _vae(32, 4, 2, 4, 64, 2),
    "vae32_128": _vae(32, 4, 4, 8, 128, 2),
    "vae64_128": _vae(64, 4, 4, 8, 128, 2),
    "vae128_256": _vae(128, 4, 4, 8, 256, 1),          # Phase 1 width
    # Both sides recompute activations in the backward: our model.remat, the reference's
    # gradient checkpointing (its own default).
    "vae64_128_remat": _vae(64, 4, 4, 8, 128, 2, remat=True),
    "flow_s": _flow(128, 4, 8, 2),
    "flow": _flow(128, 10, 16, 2),                      # Phase 1 flow at 256 px
    "flow512": _flow(512, 10, 16, 2),
    "flow1024": _flow(128, 10, 32, 2),                  # Phase 1 flow at 512 px: T=1024
    "disc": _disc(16, 3, 64, 2),
    "disc64": _disc(64, 4, 128, 2),
    "text_s": {"kind": "text", "text_len": 32, "batch": 2, "config": {"embedding": 1024}},
    "text": {"kind": "text", "text_len": 128, "batch": 2, "config": {"embedding": 1024}},
    "vae_gan16": {"kind": "vae_gan", "image": 64, "batch": 2,
                  "config": {**_vae(16, 4, 2, 2, 64, 2)["config"], "base_ch": 16, "depth": 3}},
    "vae_gan32_128": {"kind": "vae_gan", "image": 128, "batch": 2,
                      "config": {**_vae(32, 4, 4, 8, 128, 2)["config"], "base_ch": 64,
                                 "depth": 4}},
    "flow_iter_s": {"kind": "flow_iter", "tokens": (8, 8), "batch": 2, "text_len": 32,
                    "config": {**_flow(128, 4, 8, 2)["config"]}},
    "flow_iter": {"kind": "flow_iter", "tokens": (16, 16), "batch": 2, "text_len": 128,
                  "config": {**_flow(128, 10, 16, 2)["config"]}},
    # Phase 1 sizes on a GPU (issue 11, item 4): its VAE at its 512 px and at 1024 px (with
    # activation checkpointing on both sides), its flow and the D=512 one at 512 px (T=1024) with
    # batch 8, and its discriminator at 512 px.
    "vae128_512": _vae(128, 4, 4, 8, 512, 2),
    "vae128_1024_remat": _vae(128, 4, 4, 8, 1024, 2, remat=True),
    "flow_b8": _flow(128, 10, 32, 8),
    "flow512_b8": _flow(512, 10, 32, 8),
    "disc64_512": _disc(64, 4, 512, 2),
}
SUITES = {
    "small": ["vae16", "vae32", "flow_s", "flow", "disc", "text_s", "vae_gan16", "flow_iter_s"],
    "full": ["vae16", "vae32", "vae32_128", "vae64_128", "vae128_256", "flow_s", "flow",
             "flow512", "flow1024", "disc", "disc64", "text", "vae_gan16", "vae_gan32_128",
             "flow_iter"],
    # fastest first: a run cut short by the device's time limit still has the flow rows
    "gpu": ["flow_b8", "flow512_b8", "disc64_512", "vae128_512", "vae128_1024_remat"],
}
# Kinds whose reference graph has a ConvTranspose2d (the expander): only these differ between
# the reference as shipped and with the layout fix.
HAS_CONV_T = ("vae", "vae_gan")


def size_label(case: dict) -> str:
    c, k, b = case["config"], case["kind"], case["batch"]
    if k in ("vae", "vae_gan"):
        s = (f"VAE d={c['vae_dim']} attn {c['attn_layers']}x{c['attn_heads']}h "
             f"{case['image']}px B{b}" + (" remat" if c.get("remat") else ""))
        return s if k == "vae" else f"VAE+GAN {s[4:]} D{c['base_ch']}x{c['depth']}"
    if k in ("flow", "flow_iter"):
        h, w = case["tokens"]
        s = f"flow D={c['flow_dim']} L={c['layers']} T={h * w} B{b}"
        return s if k == "flow" else f"flow+text(L{case['text_len']}) {s[5:]}"
    if k == "text":
        return f"text DistilBERT L={case['text_len']} B{b}"
    return f"disc base={c['base_ch']} depth={c['depth']} {case['image']}px B{b}"


def _models(case: dict, dtype: str, names: set):
    from fluxflow_jax.models import registry
    c = case["config"]
    cfg = {"dtype": dtype, "vae_dim": c.get("vae_dim", c.get("ctx_dim", 16)),
           "text_embedding_dim": c.get("embedding", 1024), "text": dict(TEXT_CFG),
           "downscales": 4, "upscales": 4}  # ctx_tokens = downscales = 4, as the worker builds
    if "downscales" in c:
        cfg.update(downscales=c["downscales"], upscales=c["downscales"],
                   vae_attn_layers=c["attn_layers"], vae_attn_heads=c["attn_heads"])
    if "flow_dim" in c:
        cfg.update(flow_dim=c["flow_dim"], flow_layers=c["layers"], flow_heads=c["heads"])
    if c.get("remat"):
        cfg["remat"] = True
    if "base_ch" in c:
        cfg["disc"] = {"base_ch": c["base_ch"], "depth": c["depth"]}
    return registry.build_models(cfg, names)


def _hinge_parts(x):
    return x.reshape(x.shape[0], -1).astype("float32").mean(1)


def build_case(case: dict, dtype: str = "float32", seed: int = 0):
    """``(params, extra, parts, inputs, torch_weights)``; see the module docstring."""
    import jax
    import jax.numpy as jnp

    from fluxflow_jax.interop import discriminator as idisc
    from fluxflow_jax.interop import flow as iflow
    from fluxflow_jax.interop import text as itext
    from fluxflow_jax.interop import vae as ivae
    from fluxflow_jax.models import registry

    kind, c, b = case["kind"], case["config"], case["batch"]
    r = np.random.default_rng(seed)
    key = jax.random.key(seed)
    f32 = jnp.float32
    names = {"vae": {"compressor", "expander"}, "vae_gan": {"compressor", "expander",
                                                              "discriminator"},
             "flow": {"flow"}, "flow_iter": {"flow", "text_encoder"},
             "disc": {"discriminator"}, "text": {"text_encoder"}}[kind]
    models = _models(case, dtype, names)
    inputs: dict = {}
    if "image" in case:
        hw = (case["image"], case["image"])
        inputs["image"] = r.uniform(-1, 1, (b, *hw, 3)).astype(np.float32)
    else:
        hw = tuple(16 * t for t in case.get("tokens", (2, 2)))
    tl = case.get("text_len", 8)
    params, spectral = registry.init_params(models, key, hw, tl)
    if kind in ("text", "flow_iter"):
        inputs["input_ids"] = r.integers(1, 30522, (b, tl)).astype(np.int32)
        inputs["attention_mask"] = np.ones((b, tl), np.int32)
    if kind in ("flow", "flow_iter"):
        h, w = case["tokens"]
        packed = r.standard_normal((b, h * w + 1, c["vae_dim"])).astype(np.float32)
        packed[:, -1, :] = 0.0
        packed[:, -1, 0], packed[:, -1, 1] = h / 1024.0, w / 1024.0  # the HW token
        inputs.update(packed=packed, t=r.uniform(0.05, 0.95, (b,)).astype(np.float32),
                      noise=r.standard_normal((b, h * w, c["vae_dim"])).astype(np.float32))
        if kind == "flow":
            inputs["text_emb"] = r.standard_normal((b, c["embedding"])).astype(np.float32)
    if kind == "disc":
        inputs.update(real=inputs.pop("image"),
                      fake=r.uniform(-1, 1, (b, *hw, 3)).astype(np.float32),
                      ctx=r.standard_normal((b, c["ctx_dim"])).astype(np.float32))
    if kind == "text":
        inputs["target"] = r.standard_normal((b, c["embedding"])).astype(np.float32)
    extra = {k: jnp.asarray(v) for k, v in inputs.items()}
    if spectral:
        extra["spectral"] = spectral
    comp, expd, disc = models.compressor, models.expander, models.discriminator
    flow, text = models.flow, models.text_encoder
    lat = registry.latent_hw(models, hw) if comp is not None else None

    def vae_out(p, img, k):
        packed, _, _ = comp.apply({"params": p["compressor"]}, img, sample=True,
                                  rngs={"sample": k})
        return packed, expd.apply({"params": p["expander"]}, packed, use_context=True,
                                  hw=lat).astype(f32)

    def d_logits(p, ex, x, ctx, passes=1):
        out, upd = disc.apply({"params": p["discriminator"], "spectral": ex["spectral"]}, x, ctx,
                              train=True, mutable=["spectral"], passes=passes)
        return _hinge_parts(out), {**ex, "spectral": upd["spectral"]}

    def d_real_fake(p, ex, real, fake, ctx):
        # As steps.make_disc_step on a step without R1: D(real), D(fake) in one call.
        out, ex = d_logits(p, ex, jnp.concatenate([real, fake]), jnp.concatenate([ctx, ctx]),
                           passes=2)
        lr_, lf = out[:real.shape[0]], out[real.shape[0]:]
        return jnp.mean(jax.nn.relu(1.0 - lr_)) + jnp.mean(jax.nn.relu(1.0 + lf)), ex

    def flow_loss(p, ex, emb):
        h, w = case["tokens"]
        x1, t = ex["packed"][:, :-1], ex["t"][:, None, None]
        xt = jnp.concatenate([t * x1 + (1 - t) * ex["noise"], ex["packed"][:, -1:]], axis=1)
        out = flow.apply({"params": p["flow"]}, xt, emb, ex["t"], hw=(h, w))
        return jnp.mean(jnp.square(out[:, :-1].astype(f32) - (x1 - ex["noise"])))

    parts: list = []
    if kind == "vae":
        def vae_loss(p, ex, k):
            _, rec = vae_out(p, ex["image"], k)
            return jnp.mean(jnp.abs(rec - ex["image"])), ex
        parts = [(("compressor", "expander"), vae_loss)]
    elif kind == "flow":
        parts = [(("flow",), lambda p, ex, k: (flow_loss(p, ex, ex["text_emb"]), ex))]
    elif kind == "text":
        def text_loss(p, ex, k):
            e = text.apply({"params": p["text_encoder"]}, ex["input_ids"], ex["attention_mask"])
            return jnp.mean(jnp.square(e.astype(f32) - ex["target"])), ex
        parts = [(("text_encoder",), text_loss)]
    elif kind == "flow_iter":
        def flow_iter_loss(p, ex, k):
            emb = jax.lax.stop_gradient(text.apply({"params": p["text_encoder"]},
                                                   ex["input_ids"], ex["attention_mask"]))
            return flow_loss(p, ex, emb), ex
        parts = [(("flow",), flow_iter_loss)]
    elif kind == "disc":
        def disc_loss(p, ex, k):
            return d_real_fake(p, ex, ex["real"], ex["fake"], ex["ctx"])
        parts = [(("discriminator",), disc_loss)]
    elif kind == "vae_gan":
        def d_step(p, ex, k):
            packed, fake = jax.lax.stop_gradient(vae_out(p, ex["image"], k))
            ctx = jnp.mean(packed[:, :-1], axis=1).astype(f32)
            return d_real_fake(p, ex, ex["image"], fake, ctx)

        def g_step(p, ex, k):
            packed, rec = vae_out(p, ex["image"], jax.random.fold_in(k, 1))
            ctx = jax.lax.stop_gradient(jnp.mean(packed[:, :-1], axis=1).astype(f32))
            lg, ex = d_logits(p, ex, rec, ctx)
            return jnp.mean(jnp.abs(rec - ex["image"])) - 0.1 * jnp.mean(lg), ex
        parts = [(("discriminator",), d_step), (("compressor", "expander"), g_step)]

    tw: dict = {}
    if comp is not None:
        tw.update(ivae.compressor_to_torch({"params": params["compressor"]},
                                           prefix="compressor."))
        tw.update(ivae.expander_to_torch({"params": params["expander"]}, prefix="expander."))
    if disc is not None:
        tw.update(idisc.disc_to_torch({"params": params["discriminator"], "spectral": spectral},
                                      prefix="discriminator."))
    if flow is not None:
        fc = {"d_model": c["flow_dim"], "vae_dim": c["vae_dim"],
              "embedding_size": c["embedding"], "n_head": c["heads"], "n_layers": c["layers"],
              "max_hw": 1024, "ctx_tokens": 4}
        tw.update(iflow.flow_to_torch({"params": params["flow"]}, fc, prefix="flow."))
    if text is not None:
        tw.update(itext.text_to_torch({"params": params["text_encoder"]}, prefix="text."))
    return params, extra, parts, inputs, tw
