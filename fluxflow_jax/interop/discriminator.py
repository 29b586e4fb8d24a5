"""PatchDiscriminator <-> reference state dict (``D_img.safetensors`` minus its ``D_img.`` prefix).

Every spectral-norm layer has four reference keys: ``weight_orig`` (our ``params/.../kernel``),
``bias``, and the buffers ``weight_u``/``weight_v`` (our ``spectral/.../u`` and ``v``). Both
collections go through the same rule, so a round trip preserves the power-iteration state bit
for bit and a resumed GAN run continues exactly.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fluxflow_jax.interop.common import InteropError, export_state_dict, import_state_dict
from fluxflow_jax.models.discriminator import PatchDiscriminator

CONFIG_KEYS = ("in_channels", "base_ch", "depth", "ctx_dim")
_PAIR = {"sn0": "0", "sn1": "2"}


def _sn_leaf(collection: str, leaf: str, linear: bool) -> Optional[tuple[str, str]]:
    if collection == "params":
        if leaf == "kernel":
            return "weight_orig", "linear" if linear else "conv"
        if leaf == "bias":
            return "bias", "plain"
    elif collection == "spectral" and leaf in ("u", "v"):
        return f"weight_{leaf}", "plain"
    return None


def disc_rule(path: tuple) -> Optional[tuple[str, str]]:
    """``(collection, *names)`` -> (reference key, layout kind); ``None`` for foreign leaves."""
    col, names = path[0], path[1:]
    if col not in ("params", "spectral") or not names:
        return None
    top, leaf = names[0], names[-1]
    if top == "head" and len(names) == 2:
        mod = "head"
    elif top == "stem" and len(names) == 3 and names[1] in _PAIR:
        mod = f"backbone.0.{_PAIR[names[1]]}"
    elif top == "ctx_proj" and len(names) == 3 and names[1] in _PAIR:
        mod = f"ctx_proj.{_PAIR[names[1]]}"
    elif (m := re.fullmatch(r"block_(\d+)", top)) and len(names) == 4 and names[2] in _PAIR:
        mod = f"backbone.{int(m.group(1)) + 2}.{names[1]}.{_PAIR[names[2]]}"
    else:
        return None
    sub = _sn_leaf(col, leaf, linear=(top == "ctx_proj"))
    return None if sub is None else (f"{mod}.{sub[0]}", sub[1])


def infer_disc_config(sd: Mapping[str, Any], prefix: str = "") -> dict:
    """Constructor kwargs from a reference state dict's shapes (keys with ``prefix`` stripped)."""
    key = f"{prefix}backbone.0.0.weight_orig"
    if key not in sd:
        raise InteropError(f"discriminator checkpoint has no {key!r}; is it a PatchDiscriminator "
                           f"state dict with prefix {prefix!r}?")
    w = np.shape(sd[key])
    pattern = re.escape(prefix) + r"backbone\.(\d+)\.conv1\.0\.weight_orig"
    blocks = {int(m.group(1)) for k in sd if (m := re.fullmatch(pattern, k))}
    ctx_key = f"{prefix}ctx_proj.0.weight_orig"
    return {"in_channels": int(w[1]), "base_ch": int(w[0]), "depth": len(blocks),
            "ctx_dim": int(np.shape(sd[ctx_key])[1]) if ctx_key in sd else 0}


def _check_config(config: Mapping[str, Any]) -> dict:
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise InteropError(f"unknown PatchDiscriminator config keys {unknown}; "
                           f"expected a subset of {list(CONFIG_KEYS)}")
    return dict(config)


def disc_template(config: Mapping[str, Any]) -> dict:
    """Abstract ``{'params', 'spectral'}`` tree of a PatchDiscriminator built from ``config``."""
    model = PatchDiscriminator(**_check_config(config))
    side = 2 ** model.depth
    x = jax.ShapeDtypeStruct((1, side, side, model.in_channels), jnp.float32)
    return jax.eval_shape(lambda k: model.init(k, jnp.zeros(x.shape, x.dtype)), jax.random.key(0))


def disc_to_torch(variables: Mapping, config: Optional[Mapping[str, Any]] = None,
                  prefix: str = "") -> dict[str, np.ndarray]:
    """Export ``{'params', 'spectral'}`` to reference keys (``prefix='D_img.'``: trainer file).

    With ``config`` the variables are first checked against that model's structure, so an
    export can never silently miss a layer.
    """
    for col in ("params", "spectral"):
        if col not in variables:
            raise InteropError(f"disc_to_torch needs variables[{col!r}] (got {sorted(variables)})")
    if config is not None:
        want = {disc_rule(p)[0] for p in _flat_paths(disc_template(config))}
        have = {disc_rule(p)[0] for p in _flat_paths(variables) if disc_rule(p)}
        if want != have:
            raise InteropError(f"variables do not match PatchDiscriminator{dict(config)}: missing "
                               f"{sorted(want - have)}, unexpected {sorted(have - want)}")
    return export_state_dict({"params": variables["params"], "spectral": variables["spectral"]},
                             disc_rule, prefix=prefix)


def disc_from_torch(sd: Mapping[str, Any], config: Optional[Mapping[str, Any]] = None,
                    prefix: str = "") -> tuple[dict, dict]:
    """Import a reference state dict -> (``{'params', 'spectral'}`` of jnp arrays, config).

    ``config`` defaults to :func:`infer_disc_config`. Every missing, unexpected or mis-shaped
    key is reported in one :class:`InteropError`.
    """
    config = _check_config(config) if config is not None else infer_disc_config(sd, prefix)
    variables = import_state_dict(sd, disc_template(config), disc_rule, prefix=prefix,
                                  what=f"PatchDiscriminator{config} checkpoint")
    return jax.tree.map(jnp.asarray, variables), config


def _flat_paths(tree: Mapping) -> list[tuple]:
    return list(traverse_util.flatten_dict(tree).keys())
