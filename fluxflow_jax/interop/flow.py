"""FluxFlowProcessor <-> PyTorch reference state dict (``flow_processor.*`` keys, section 1.3/1.8).

Keys are given *without* the ``flow_processor.`` prefix; pass ``prefix`` (e.g.
``"diffuser.flow_processor."``) to work on a full ``flxflow_final.safetensors`` dict. The
reference's ``transformer_blocks.{k}.rotary_pe.inv_freq`` buffers are not parameters here (RoPE
tables are recomputed from the head size): export writes them with the reference's values, import
checks them against the config (a different length means a different head count) and drops them.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fluxflow_jax.interop.common import InteropError, export_state_dict, import_state_dict
from fluxflow_jax.models.conditioning import mixer_rule
from fluxflow_jax.models.flow import FluxFlowProcessor, rope_inv_freq

INV_FREQ = "rotary_pe.inv_freq"
CONFIG_KEYS = ("d_model", "vae_dim", "embedding_size", "n_head", "n_layers", "max_hw", "ctx_tokens")

_PLAIN_LINEARS = ("vae_to_dmodel", "dmodel_to_vae", "text_proj")
_SEQ = {"time_embed_1": "time_embed.1", "time_embed_3": "time_embed.3",
        "flow_predictor_0": "flow_predictor.0", "flow_predictor_2": "flow_predictor.2",
        "context_final_0": "context_final.0"}
_BEZIER = {"time_embed_2": ("time_embed.2", "plain"),
           "flow_predictor_1": ("flow_predictor.1", "c11"),
           "context_final_1": ("context_final.1", "c11")}


def _wb(leaf: str) -> str:
    return "weight" if leaf in ("kernel", "scale", "embedding") else "bias"


def _dense_kind(leaf: str) -> str:
    return "linear" if leaf == "kernel" else "plain"


def _block_rule(k: str, rest: tuple) -> tuple[str, str] | None:
    mod, leaf = rest[0], rest[-1]
    base = f"transformer_blocks.{k}"
    if mod in ("self_attn", "cross_attn") and len(rest) == 3:
        return f"{base}.{mod}.{rest[1]}.{_wb(leaf)}", _dense_kind(leaf)
    if mod in ("norm1", "norm2", "norm3") and len(rest) == 2:
        return f"{base}.{mod}.{_wb(leaf)}", "plain"
    if re.fullmatch(r"p[0-3]", mod) and len(rest) == 3 and re.fullmatch(r"l\d+", rest[1]):
        return f"{base}.{mod}.{rest[1][1:]}.0.{_wb(leaf)}", _dense_kind(leaf)
    if mod == "ffn" and len(rest) == 2:
        return f"{base}.ffn.0.{_wb(leaf)}", _dense_kind(leaf)
    return None


def flow_rule(path: tuple) -> tuple[str, str] | None:
    """Flax path ``(collection, *names)`` -> (torch key without ``flow_processor.``, kind).

    Raises for a path it does not know, so a new parameter cannot be silently left out of the
    checkpoint.
    """
    col, names = path[0], tuple(path[1:])
    m = None
    if col == "params" and names:
        mod, leaf = names[0], names[-1]
        if mod in _PLAIN_LINEARS and len(names) == 2:
            m = f"{mod}.{_wb(leaf)}", _dense_kind(leaf)
        elif mod == "ctx_mixer":
            key, kind = mixer_rule(names[1:])
            m = f"ctx_mixer.{key}", kind
        elif mod == "time_embed_0" and names[1:] == ("embedding",):
            m = "time_embed.0.weight", "plain"
        elif mod in _SEQ and len(names) == 2:
            conv = mod.startswith(("flow_predictor", "context_final"))
            kind = ("conv" if conv else "linear") if leaf == "kernel" else "plain"
            m = f"{_SEQ[mod]}.{_wb(leaf)}", kind
        elif mod in _BEZIER and len(names) == 2 and re.fullmatch(r"p[0-3]", leaf):
            m = f"{_BEZIER[mod][0]}.{leaf}", _BEZIER[mod][1]
        elif mod == "context_injection" and len(names) == 3:
            m = (f"context_injection.gate.0.{_wb(leaf)}" if names[1] == "gate"
                 else f"context_injection.bias.{_wb(leaf)}"), _dense_kind(leaf)
        elif mod.startswith("transformer_blocks_"):
            m = _block_rule(mod.rsplit("_", 1)[1], names[1:])
    if m is None:
        raise InteropError("flow_rule: no reference key for Flax variable "
                           f"{'/'.join(map(str, path))}")
    return m


def _config(config: Mapping[str, Any]) -> dict:
    unknown = sorted(set(config) - set(CONFIG_KEYS) - {"activation", "remat", "dtype"})
    if unknown:
        raise ValueError(f"flow config: unknown keys {unknown}; expected {list(CONFIG_KEYS)}")
    act = config.get("activation", "bezier")
    if act != "bezier":
        raise ValueError(f"flow config: activation={act!r} has no reference checkpoint layout "
                         "(only 'bezier' models can be exported/imported)")
    return {k: config[k] for k in CONFIG_KEYS if k in config}


def infer_flow_config(sd: Mapping[str, Any], prefix: str = "",
                      overrides: Mapping[str, Any] | None = None) -> dict:
    """FluxFlowProcessor kwargs from a reference state dict (REFERENCE.md section 1.6), then
    ``overrides``.

    ``d_model``/``vae_dim`` from ``vae_to_dmodel.weight [D, d]``, ``embedding_size`` from
    ``text_proj.weight [D, E]``, ``n_layers`` from the number of ``self_attn.q_proj.weight`` keys,
    ``n_head = D // (2 * len(inv_freq))``; without that buffer the head count must be in
    ``overrides`` (the reference would assume 8: a guess that silently changes the model).
    ``max_hw`` is not stored (1024, the reference's). ``ctx_tokens`` is not stored either: a bare
    processor has the reference's default 4, but inside a pipeline it equals the compressor's
    ``downscales`` (``interop.load_reference`` passes that in ``overrides``).
    """
    overrides = dict(overrides or {})
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    for key in ("vae_to_dmodel.weight", "text_proj.weight"):
        if key not in sd:
            raise InteropError(f"cannot infer the flow config: key {prefix}{key} not in checkpoint")
    d_model, vae_dim = (int(s) for s in np.shape(sd["vae_to_dmodel.weight"]))
    embedding_size = int(np.shape(sd["text_proj.weight"])[1])
    q_key = re.compile(r"transformer_blocks\.\d+\.self_attn\.q_proj\.weight")
    n_layers = sum(1 for k in sd if q_key.fullmatch(k))
    inv = f"transformer_blocks.0.{INV_FREQ}"
    cfg = {"d_model": d_model, "vae_dim": vae_dim, "embedding_size": embedding_size,
           "n_layers": n_layers, "max_hw": 1024, "ctx_tokens": 4}
    if inv in sd:
        cfg["n_head"] = d_model // (2 * int(np.shape(sd[inv])[0]))
    elif "n_head" not in overrides and n_layers:
        raise InteropError(f"{prefix}transformer_blocks: no rotary_pe.inv_freq buffer, so the "
                           "flow model's head count cannot be read from the file; give it: "
                           "`convert to-flax --config <config file>` (model.flow_heads) or "
                           "config={'n_head': N}")
    cfg.update(overrides)
    return _config(cfg)


def flow_template(config: Mapping[str, Any]) -> dict:
    """Shapes/dtypes of the variables of ``FluxFlowProcessor(**config)`` (no compute)."""
    model = FluxFlowProcessor(**_config(config))
    packed = jnp.zeros((1, 5, model.vae_dim), jnp.float32)
    emb = jnp.zeros((1, model.embedding_size), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), packed, emb,
                                             jnp.zeros((1,), jnp.float32), hw=(2, 2)))


def _inv_freq_buffers(config: Mapping[str, Any]) -> dict[str, np.ndarray]:
    cfg = {"d_model": 512, "n_head": 8, "n_layers": 10, **dict(config)}
    inv = rope_inv_freq(cfg["d_model"] // cfg["n_head"])
    return {f"transformer_blocks.{k}.{INV_FREQ}": inv.copy() for k in range(cfg["n_layers"])}


def flow_to_torch(variables: Mapping, config: Mapping[str, Any],
                  prefix: str = "") -> dict[str, np.ndarray]:
    """Flax variables -> reference state dict (float32, torch layouts), ``inv_freq`` included."""
    cfg = _config(config)
    return export_state_dict(variables, flow_rule, prefix=prefix, extra=_inv_freq_buffers(cfg))


def flow_from_torch(sd: Mapping[str, Any], config: Mapping[str, Any] | None = None,
                    prefix: str = "") -> tuple[dict, dict]:
    """Reference state dict -> ``(variables, config)``; every problem is reported at once.

    ``config`` defaults to :func:`infer_flow_config`. ``inv_freq`` buffers may be absent (they
    are derived); when present they must have the config's length and values.
    """
    cfg = _config(config) if config is not None else infer_flow_config(sd, prefix)
    problems = []
    expected = _inv_freq_buffers(cfg)
    for k, v in sd.items():
        if not (k.startswith(prefix) and k.endswith(INV_FREQ)):
            continue
        want = expected.get(k[len(prefix):])
        if want is None:
            continue  # a buffer of a block the model does not have: reported as unexpected below
        v = np.asarray(v)
        if v.shape != want.shape or not np.allclose(v, want, rtol=1e-6, atol=0):
            problems.append(f"{k}: checkpoint {list(v.shape)} {np.round(v[:4], 6).tolist()}... vs "
                            f"model {list(want.shape)} (n_head={cfg.get('n_head')}, "
                            f"d_model={cfg.get('d_model')})")
    inv_msg = (f"inv_freq mismatches ({len(problems)}):\n    " + "\n    ".join(problems)
               if problems else "")
    present = {k[len(prefix):] for k in sd if k.startswith(prefix)}
    ignore = [k for k in expected if k in present]
    try:
        variables = import_state_dict(sd, flow_template(cfg), flow_rule, prefix=prefix,
                                      ignore=ignore, what="flow checkpoint")
    except InteropError as e:  # one report with every problem, inv_freq ones included
        raise InteropError(f"{e}\n  {inv_msg}" if inv_msg else str(e)) from None
    if inv_msg:
        raise InteropError(f"flow checkpoint does not fit the model:\n  {inv_msg}")
    return variables, cfg
