"""Build the run's linen modules from the model config and initialise their parameters.

One place maps config keys to constructor arguments, so the train loop, the sampler and the
benchmarks build identical models. Keys (``configs/``, ``config_defaults.model_config``):
``vae_dim, downscales, upscales, vae_attn_layers, vae_attn_heads, flow_dim, flow_layers,
flow_heads, text_embedding_dim, max_hw, activation, remat, dtype ('float32' | 'bfloat16': the
compute dtype; parameters stay float32), disc: {base_ch, depth}, text: {vocab_size, dim, n_layers,
n_heads, hidden_dim, max_position_embeddings, dropout, pooling, freeze_backbone}`` plus the
optional ``text.attention_dropout`` (default: the ``dropout`` value), ``text.pad_token_id`` and
``text.pretrained_dir`` (read by ``interop.text.load_pretrained_text_encoder``).

The flow model's and the expander's ``ctx_tokens`` are not a free setting: the reference's
``FluxPipeline`` overwrites both with the compressor's ``downscales`` (fixture ``parity/pipeline``),
so a checkpoint only means the same model here if we do the same. An explicit ``ctx_tokens`` key
is accepted only when it equals ``downscales``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fluxflow_jax import xla
from fluxflow_jax.models.discriminator import PatchDiscriminator
from fluxflow_jax.models.flow import FluxFlowProcessor
from fluxflow_jax.models.text import BertTextEncoder
from fluxflow_jax.models.vae import FluxCompressor, FluxExpander
from fluxflow_jax.state import MODEL_NAMES

# The models built from modules here (``flow_lora`` is a param tree over ``flow``, lora.py). The
# init keys split over this fixed tuple so a fresh init stays the same when MODELS grows.
MODULE_NAMES = ("compressor", "expander", "flow", "text_encoder", "discriminator")

DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
_TOP_KEYS = {"vae_dim", "downscales", "upscales", "vae_attn_layers", "vae_attn_heads",
             "flow_dim", "flow_layers", "flow_heads", "text_embedding_dim", "max_hw",
             "activation", "vae_head_activation", "remat", "dtype", "disc", "text",
             "ctx_tokens"}
_DISC_KEYS = {"base_ch", "depth"}
_TEXT_KEYS = {"vocab_size", "dim", "n_layers", "n_heads", "hidden_dim",
              "max_position_embeddings", "dropout", "attention_dropout", "pooling",
              "freeze_backbone", "pad_token_id", "pretrained_dir"}


@dataclasses.dataclass(frozen=True)
class ModelSet:
    """The run's modules; a model the run does not need is None."""

    compressor: FluxCompressor | None = None
    expander: FluxExpander | None = None
    flow: FluxFlowProcessor | None = None
    text_encoder: BertTextEncoder | None = None
    discriminator: PatchDiscriminator | None = None

    def names(self) -> tuple[str, ...]:
        return tuple(n for n in MODULE_NAMES if getattr(self, n) is not None)

    def require(self, name: str, why: str) -> nn.Module:
        m = getattr(self, name)
        if m is None:
            raise ValueError(f"{why} needs the {name!r} model, which this run did not build "
                             f"(built: {self.names()})")
        return m


def _get(cfg: Mapping[str, Any], key: str, prefix: str = "model") -> Any:
    if key not in cfg:
        raise KeyError(f"config.{prefix}.{key} is missing")
    return cfg[key]


def _check_keys(cfg: Mapping[str, Any], known: set, prefix: str) -> None:
    unknown = sorted(set(cfg.keys()) - known)
    if unknown:
        raise KeyError(f"config.{prefix}: unknown key(s) {unknown}; known: {sorted(known)}")


def model_key_errors(model_cfg: Mapping[str, Any]) -> list[str]:
    """Unknown keys of ``config.model`` (and its ``disc`` / ``text`` sections), one line each -
    what ``build_models`` would refuse, found before training (``--validate``)."""
    errs = []
    for prefix, cfg, known in (("model", model_cfg, _TOP_KEYS),
                               ("model.disc", model_cfg.get("disc", {}), _DISC_KEYS),
                               ("model.text", model_cfg.get("text", {}), _TEXT_KEYS)):
        errs += [f"{prefix}.{k}: unknown key (known: {sorted(known)})"
                 for k in sorted(set(cfg.keys()) - known)]
    return errs


def compute_dtype(model_cfg: Mapping[str, Any]) -> Any:
    name = model_cfg.get("dtype", "float32")
    if name not in DTYPES:
        raise ValueError(f"config.model.dtype must be one of {tuple(DTYPES)}, got {name!r}")
    return DTYPES[name]


def pipeline_ctx_tokens(model_cfg: Mapping[str, Any]) -> int:
    """``ctx_tokens`` of the flow model and expander: ``downscales``, as the reference ties it."""
    downscales = int(_get(model_cfg, "downscales"))
    if "ctx_tokens" in model_cfg and int(model_cfg["ctx_tokens"]) != downscales:
        raise ValueError(f"config.model.ctx_tokens={model_cfg['ctx_tokens']} but downscales="
                         f"{downscales}: the reference's pipeline ties ctx_tokens to downscales; "
                         "remove config.model.ctx_tokens")
    return downscales


def build_models(model_cfg: Mapping[str, Any], needed: set[str]) -> ModelSet:
    """Construct the modules in ``needed`` (a subset of ``MODEL_NAMES``) from ``model_cfg``."""
    bad = sorted(set(needed) - set(MODEL_NAMES))
    if bad:  # a 'flow_lora' entry builds nothing: adapters are params over the flow module
        raise ValueError(f"build_models: unknown model name(s) {bad}; expected {MODEL_NAMES}")
    _check_keys(model_cfg, _TOP_KEYS, "model")
    dt = compute_dtype(model_cfg)
    act = model_cfg.get("activation", "bezier")
    head_act = model_cfg.get("vae_head_activation", "")
    remat = bool(model_cfg.get("remat", False))
    max_hw = int(model_cfg.get("max_hw", 1024))
    ctx_tokens = pipeline_ctx_tokens(model_cfg)
    vae_dim = int(_get(model_cfg, "vae_dim"))
    out: dict[str, nn.Module] = {}
    if "compressor" in needed:
        out["compressor"] = FluxCompressor(
            in_channels=3, d_model=vae_dim, downscales=int(_get(model_cfg, "downscales")),
            max_hw=max_hw, attn_layers=int(_get(model_cfg, "vae_attn_layers")),
            attn_heads=int(_get(model_cfg, "vae_attn_heads")), activation=act,
            head_activation=head_act, remat=remat, dtype=dt)
    if "expander" in needed:
        out["expander"] = FluxExpander(
            d_model=vae_dim, upscales=int(_get(model_cfg, "upscales")), max_hw=max_hw,
            ctx_tokens=ctx_tokens, activation=act, head_activation=head_act, remat=remat,
            dtype=dt)
    if "flow" in needed:
        out["flow"] = FluxFlowProcessor(
            d_model=int(_get(model_cfg, "flow_dim")), vae_dim=vae_dim,
            embedding_size=int(_get(model_cfg, "text_embedding_dim")),
            n_head=int(_get(model_cfg, "flow_heads")), n_layers=int(_get(model_cfg, "flow_layers")),
            max_hw=max_hw, ctx_tokens=ctx_tokens, activation=act, remat=remat, dtype=dt)
    if "text_encoder" in needed:
        t = _get(model_cfg, "text")
        _check_keys(t, _TEXT_KEYS, "model.text")
        vocab = int(_get(t, "vocab_size", "model.text"))
        if vocab <= 0:
            raise ValueError(f"config.model.text.vocab_size is {vocab}; set it to the tokenizer's "
                             "vocabulary size before building the text encoder")
        dropout = float(t.get("dropout", 0.1))
        out["text_encoder"] = BertTextEncoder(
            embed_dim=int(_get(model_cfg, "text_embedding_dim")), vocab_size=vocab,
            dim=int(_get(t, "dim", "model.text")), n_layers=int(_get(t, "n_layers", "model.text")),
            n_heads=int(_get(t, "n_heads", "model.text")),
            hidden_dim=int(_get(t, "hidden_dim", "model.text")),
            max_position_embeddings=int(_get(t, "max_position_embeddings", "model.text")),
            dropout=dropout, attention_dropout=float(t.get("attention_dropout", dropout)),
            pad_token_id=int(t.get("pad_token_id", 0)), pooling=t.get("pooling", "mean"),
            freeze_backbone=bool(t.get("freeze_backbone", False)), activation=act, dtype=dt)
    if "discriminator" in needed:
        d = _get(model_cfg, "disc")
        _check_keys(d, _DISC_KEYS, "model.disc")
        out["discriminator"] = PatchDiscriminator(
            in_channels=3, base_ch=int(_get(d, "base_ch", "model.disc")),
            depth=int(_get(d, "depth", "model.disc")), ctx_dim=vae_dim, dtype=dt)
    return ModelSet(**out)


def latent_hw(models: ModelSet, image_hw: tuple[int, int]) -> tuple[int, int]:
    """Latent grid ``(h, w)`` of an ``image_hw`` image: ``H / 2**downscales``."""
    comp = models.compressor
    if comp is None:
        raise ValueError("latent_hw needs the compressor (its downscales)")
    f = 2 ** comp.downscales
    if image_hw[0] % f or image_hw[1] % f:
        raise ValueError(f"image size {tuple(image_hw)} must be a multiple of 2**downscales = {f}")
    return image_hw[0] // f, image_hw[1] // f


def init_params(models: ModelSet, rng: jax.Array, image_hw: tuple[int, int] = (32, 32),
                text_len: int = 8, jit: Callable = xla.jit_once) -> tuple[dict, dict]:
    """Fresh parameters of every built model and the discriminator's initial 'spectral' state.

    Returns ``(params, spectral)``: ``params`` maps model name -> params tree; ``spectral`` is
    the discriminator's 'spectral' collection ({} without a discriminator). Shapes do not depend
    on ``image_hw``/``text_len`` (they only size the dummy inputs). The expander is initialised
    with SPADE on so its SPADE weights exist whatever the stage trains. ``jit`` compiles the
    one function that initialises every model (``xla.jit_once``: cheaper to compile on CPU;
    ``jax.jit`` is the plain baseline ``benchmarks/step_times.py --init_ab`` times it against).
    """
    keys = dict(zip(MODULE_NAMES, jax.random.split(rng, len(MODULE_NAMES))))
    h, w = image_hw
    dims = (models.compressor and models.compressor.d_model,
            models.expander and models.expander.d_model,
            models.flow and models.flow.vae_dim,
            models.discriminator and models.discriminator.ctx_dim)
    vae_dim = next((v for v in dims if v), 1)
    if models.compressor is not None:
        lh, lw = latent_hw(models, image_hw)
    else:
        f = 2 ** (models.expander.upscales if models.expander is not None else 4)
        lh, lw = max(1, h // f), max(1, w // f)
    img = jnp.zeros((1, h, w, 3), jnp.float32)
    packed = jnp.zeros((1, lh * lw + 1, vae_dim), jnp.float32)
    def init_all(keys: dict) -> tuple[dict, dict]:
        # One jit for all models: a single compilation instead of one per model.
        params: dict = {}
        spectral: dict = {}
        if models.compressor is not None:
            k = keys["compressor"]
            params["compressor"] = models.compressor.init(
                {"params": k, "sample": jax.random.fold_in(k, 1)}, img, sample=True)["params"]
        if models.expander is not None:
            params["expander"] = models.expander.init(
                keys["expander"], packed, use_context=True, hw=(lh, lw))["params"]
        if models.flow is not None:
            emb = jnp.zeros((1, models.flow.embedding_size), jnp.float32)
            params["flow"] = models.flow.init(keys["flow"], packed, emb,
                                              jnp.zeros((1,), jnp.float32), hw=(lh, lw))["params"]
        if models.text_encoder is not None:
            ids = jnp.zeros((1, text_len), jnp.int32)
            params["text_encoder"] = models.text_encoder.init(
                keys["text_encoder"], ids, jnp.ones((1, text_len), jnp.int32),
                deterministic=True)["params"]
        if models.discriminator is not None:
            disc = models.discriminator
            ctx = jnp.zeros((1, disc.ctx_dim), jnp.float32) if disc.ctx_dim else None
            variables = disc.init(keys["discriminator"], img, ctx, train=False)
            params["discriminator"] = variables["params"]
            spectral = dict(variables.get("spectral", {}))
        return params, spectral

    return jit(init_all)(keys)
