"""FluxCompressor / FluxExpander <-> the reference's ``compressor.*`` / ``expander.*`` state dicts.

One rule per model maps a Flax variable path to a reference key (without the ``compressor.`` /
``expander.`` prefix, which callers pass as ``prefix``, e.g. ``'diffuser.compressor.'`` for a
``flxflow_final.safetensors``) and a layout kind; ``interop.common`` does the rest.

Config inference follows the reference's ``_detect_config`` (REFERENCE.md 1.6): the latent width
from ``latent_proj``, ``downscales`` from the ``encoder_z`` count, ``attn_layers`` from the
``in_proj_weight`` count, ``upscales`` from the ``conv1.0`` count. Attention heads leave no trace
in the weights: with attention layers they must be given (a config, our export's metadata),
never guessed as the reference does (8).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fluxflow_jax.interop.common import (
    InteropError,
    export_state_dict,
    import_state_dict,
    torch_shape,
)
from fluxflow_jax.models.conditioning import mixer_rule
from fluxflow_jax.models.vae import FluxCompressor, FluxExpander

Config = dict[str, Any]

# Reference constructor arguments that have no counterpart here (and why).
_REFERENCE_ONLY = {
    "use_attention",  # ignored by the reference itself (section 10 item 20)
    "attn_dropout",   # always 0 in the reference's training; dropout-free port
}


def _param(leaf: str) -> str:
    return {"kernel": "weight", "scale": "weight", "bias": "bias"}.get(leaf, leaf)


def _kind(leaf: str, conv: bool) -> str:
    if leaf == "kernel":
        return "conv" if conv else "linear"
    return "plain"


# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------

_STAGE = {"first_step": "encoder_first_step", "z": "encoder_z"}


def compressor_rule(path: tuple) -> tuple[str, str] | None:
    """Flax ``(collection, *names)`` of a FluxCompressor -> (reference key, layout kind)."""
    if path[0] != "params":
        return None
    names, leaf = path[1:-1], path[-1]
    top = names[0]
    if m := re.fullmatch(r"stage_(\d+)", top):
        return f"{_STAGE[names[1]]}.{m[1]}.0.{_param(leaf)}", _kind(leaf, conv=True)
    if m := re.fullmatch(r"(latent_proj|mu_proj|logvar_proj)_(\d+)", top):
        return f"{m[1]}.{m[2]}.0.{_param(leaf)}", _kind(leaf, conv=True)
    if top in ("mu_activation", "logvar_activation"):
        return f"{top}.{leaf}", "plain"
    if m := re.fullmatch(r"token_attn_(\d+)", top):
        pre, sub = f"token_attn.{m[1]}", names[1]
        if sub in ("norm1", "norm2"):
            return f"{pre}.{sub}.{_param(leaf)}", "plain"
        if sub in ("ff_0", "ff_2"):
            return f"{pre}.ff.{sub[-1]}.{_param(leaf)}", _kind(leaf, conv=False)
        if sub == "attn" and names[2] == "in_proj":
            return f"{pre}.attn.in_proj_{_param(leaf)}", _kind(leaf, conv=False)
        if sub == "attn" and names[2] == "out_proj":
            return f"{pre}.attn.out_proj.{_param(leaf)}", _kind(leaf, conv=False)
    raise InteropError(f"compressor_rule: no reference key for Flax path {'/'.join(path)}")


_UPSAMPLE = {"conv_t": "conv1.0", "conv_d": "conv1.2", "mlp_shared": "spade.mlp_shared.0",
             "mlp_gamma": "spade.mlp_gamma", "mlp_beta": "spade.mlp_beta"}


def expander_rule(path: tuple) -> tuple[str, str] | None:
    """Flax ``(collection, *names)`` of a FluxExpander -> (reference key, layout kind)."""
    if path[0] != "params":
        return None
    names, leaf = path[1:-1], path[-1]
    top = names[0]
    if m := re.fullmatch(r"upscale_(\d+)", top):
        sub = names[-1]  # conv_t / conv_d, or spade/<mlp_*>
        return f"upscale.layers.{m[1]}.{_UPSAMPLE[sub]}.{_param(leaf)}", _kind(leaf, conv=True)
    if top == "context_mixer":
        key, kind = mixer_rule(path[2:])
        return f"context_mixer.{key}", kind
    if m := re.fullmatch(r"to_rgb_(\d+)", top):
        return f"to_rgb_conv.{m[1]}.{_param(leaf)}", _kind(leaf, conv=True)
    if top == "rgb_activation":
        return f"rgb_activation.{leaf}", "plain"
    raise InteropError(f"expander_rule: no reference key for Flax path {'/'.join(path)}")


# ---------------------------------------------------------------------------------------------
# Config inference
# ---------------------------------------------------------------------------------------------

def _strip(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _need(sd: Mapping[str, Any], key: str, prefix: str, what: str) -> np.ndarray:
    if key not in sd:
        raise InteropError(f"cannot infer the {what} config: key {prefix}{key!r} is missing")
    return np.asarray(sd[key])


def _count(sd: Mapping[str, Any], pattern: str) -> int:
    return len({m[1] for k in sd if (m := re.fullmatch(pattern, k))})


def _activation_from(wide: int, d: int, key: str, what: str) -> str:
    if wide == 5 * d:
        return "bezier"
    raise InteropError(f"cannot infer the {what} activation: {key} has {wide} outputs for width "
                       f"{d} (not 5x, so an activation ablation); pass config=... with activation")


HEADS_HINT = ("give them: `convert to-flax --config <config file>` (model.vae_attn_heads), a file "
              "exported by fluxflow_jax (its metadata carries them) or config={'attn_heads': N}")


def count_downscales(sd: Mapping[str, Any], prefix: str = "") -> int:
    """The compressor's ``downscales`` (number of ``encoder_z`` stages); 0 when it has none."""
    return _count(_strip(sd, prefix), r"encoder_z\.(\d+)\.0\.weight")


def infer_compressor_config(sd: Mapping[str, Any], prefix: str = "",
                            overrides: Mapping[str, Any] | None = None) -> Config:
    """FluxCompressor kwargs from a reference state dict's shapes, then ``overrides``.

    Attention heads leave no trace in the weights (any divisor of ``d_model`` fits), so with
    attention layers they must come from ``overrides``: guessing (the reference assumes 8) would
    import a different model without a word.
    """
    overrides = dict(overrides or {})
    sd = _strip(sd, prefix)
    lat0 = _need(sd, "latent_proj.0.0.weight", prefix, "FluxCompressor")
    lat1 = _need(sd, "latent_proj.1.0.weight", prefix, "FluxCompressor")
    first = _need(sd, "encoder_first_step.0.0.weight", prefix, "FluxCompressor")
    d = int(lat1.shape[1])
    activation = overrides.get("activation") or _activation_from(
        int(lat0.shape[0]), d, f"{prefix}latent_proj.0.0.weight", "FluxCompressor")
    cfg: Config = dict(in_channels=int(first.shape[1]) - 2, d_model=d,
                       downscales=_count(sd, r"encoder_z\.(\d+)\.0\.weight"),
                       attn_layers=_count(sd, r"token_attn\.(\d+)\.attn\.in_proj_weight"),
                       activation=activation)
    if cfg["attn_layers"]:
        ff2 = _need(sd, "token_attn.0.ff.2.weight", prefix, "FluxCompressor")
        cfg["attn_ff_mult"] = int(ff2.shape[1]) // d
        if "attn_heads" not in overrides:
            raise InteropError(f"{prefix or 'compressor '}token_attn: the number of attention "
                               f"heads of a {d}-wide compressor cannot be read from the weights; "
                               + HEADS_HINT)
    cfg.update(overrides)
    return cfg


def infer_expander_config(sd: Mapping[str, Any], prefix: str = "",
                          overrides: Mapping[str, Any] | None = None) -> Config:
    """FluxExpander kwargs from a reference state dict, then ``overrides`` (e.g. ``ctx_tokens``,
    which the reference's pipeline sets to the compressor's ``downscales``)."""
    overrides = dict(overrides or {})
    sd = _strip(sd, prefix)
    up = _need(sd, "upscale.layers.0.conv1.0.weight", prefix, "FluxExpander")  # [d, 5d, 16, 16]
    d = int(up.shape[0])
    activation = overrides.get("activation") or _activation_from(
        int(up.shape[1]), d, f"{prefix}upscale.layers.0.conv1.0.weight", "FluxExpander")
    cfg = dict(d_model=d, upscales=_count(sd, r"upscale\.layers\.(\d+)\.conv1\.0\.weight"),
               activation=activation)
    cfg.update(overrides)
    return cfg


def config_from_reference_kwargs(kwargs: Mapping[str, Any]) -> Config:
    """Reference constructor kwargs (as in a parity case's config.json) -> ours."""
    out: Config = {}
    for k, v in kwargs.items():
        if k == "use_gradient_checkpointing":
            out["remat"] = bool(v)
        elif k == "attn_dropout" and v:
            raise ValueError(f"attn_dropout={v} is not supported (the port has no attention dropout)")
        elif k not in _REFERENCE_ONLY:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# Templates, export, import
# ---------------------------------------------------------------------------------------------

def _build(cls, config: Mapping[str, Any], what: str):
    try:
        return cls(**dict(config))
    except TypeError as e:
        raise ValueError(f"bad {what} config {dict(config)}: {e}") from e


def compressor_template(config: Mapping[str, Any]) -> Any:
    """Shapes of a FluxCompressor's variables (``jax.eval_shape``; nothing is allocated)."""
    model = _build(FluxCompressor, config, "FluxCompressor")
    s = 2 ** model.downscales
    img = jax.ShapeDtypeStruct((1, s, s, model.in_channels), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, sample=False), img)


def expander_template(config: Mapping[str, Any]) -> Any:
    """Shapes of a FluxExpander's variables (``jax.eval_shape``; nothing is allocated)."""
    model = _build(FluxExpander, config, "FluxExpander")
    packed = jax.ShapeDtypeStruct((1, 2, model.d_model), jnp.float32)
    return jax.eval_shape(lambda p: model.init(jax.random.key(0), p, hw=(1, 1)), packed)


def _plain(tree: Any) -> Any:
    if hasattr(tree, "unfreeze"):
        tree = tree.unfreeze()
    return {k: _plain(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def torch_shapes(template: Any, rule, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """``{reference key: shape}`` an export of ``template`` would write, without any arrays."""
    out = {}
    for path, leaf in traverse_util.flatten_dict(_plain(template)).items():
        m = rule(path)
        if m is not None:
            out[prefix + m[0]] = tuple(torch_shape(tuple(leaf.shape), m[1]))
    return out


def _to_torch(variables, template, rule, prefix: str, what: str) -> dict[str, np.ndarray]:
    if template is not None:  # a config was given: the variables must be that model's
        want = torch_shapes(template, rule)
        have = torch_shapes(variables, rule)
        bad = sorted(f"{k}: variables {list(have.get(k, ()))} vs config {list(want.get(k, ()))}"
                     for k in set(want) | set(have) if want.get(k) != have.get(k))
        if bad:
            raise InteropError(f"{what} do not match the config:\n    " + "\n    ".join(bad))
    return export_state_dict(variables, rule, prefix=prefix)


def compressor_to_torch(variables: Mapping, config: Mapping[str, Any] | None = None,
                        prefix: str = "") -> dict[str, np.ndarray]:
    """FluxCompressor variables -> reference-layout ``{prefix + key: float32 array}``.

    With ``config`` the variables are first checked against that model's shapes.
    """
    tpl = compressor_template(config) if config is not None else None
    return _to_torch(variables, tpl, compressor_rule, prefix, "FluxCompressor variables")


def expander_to_torch(variables: Mapping, config: Mapping[str, Any] | None = None,
                      prefix: str = "") -> dict[str, np.ndarray]:
    """FluxExpander variables -> reference-layout ``{prefix + key: float32 array}``."""
    tpl = expander_template(config) if config is not None else None
    return _to_torch(variables, tpl, expander_rule, prefix, "FluxExpander variables")


def _from_torch(sd, config, infer, template_fn, rule, prefix, what):
    config = dict(infer(sd, prefix) if config is None else config)
    variables = import_state_dict(sd, template_fn(config), rule, prefix=prefix,
                                  what=f"{what} checkpoint (config {config})")
    return jax.tree.map(jnp.asarray, variables), config


def compressor_from_torch(sd: Mapping[str, np.ndarray], config: Mapping[str, Any] | None = None,
                          prefix: str = "") -> tuple[dict, Config]:
    """Reference ``compressor.*`` state dict -> ``(variables, config)``.

    ``config=None`` infers it (refused when heads would have to be guessed). Every missing, unexpected or mis-shaped key
    is reported in one ``InteropError``.
    """
    return _from_torch(sd, config, infer_compressor_config, compressor_template, compressor_rule,
                       prefix, "FluxCompressor")


def expander_from_torch(sd: Mapping[str, np.ndarray], config: Mapping[str, Any] | None = None,
                        prefix: str = "") -> tuple[dict, Config]:
    """Reference ``expander.*`` state dict -> ``(variables, config)``."""
    return _from_torch(sd, config, infer_expander_config, expander_template, expander_rule,
                       prefix, "FluxExpander")
