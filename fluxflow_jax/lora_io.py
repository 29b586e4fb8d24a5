"""LoRA adapter files: one safetensors file per adapter, keyed after the reference's module paths.

Keys: ``diffuser.flow_processor.<reference module path>.lora_A`` / ``.lora_B`` in PyTorch's (PEFT's)
layout - ``lora_A [rank, in]``, ``lora_B [out, rank]``, ``delta W = alpha/rank * lora_B @ lora_A``
on the reference's ``weight [out, in]`` - e.g. ``diffuser.flow_processor.transformer_blocks.0.
self_attn.q_proj.lora_A``. Metadata ``fluxflow_jax.lora`` (JSON): rank, alpha, target_layers,
trigger, class_word, so a reader needs nothing else. Our Flax tree keeps ``A [in, rank]``,
``B [rank, out]`` (kernels are ``[in, out]``): the file holds their transposes.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from fluxflow_jax import lora
from fluxflow_jax.interop.flow import flow_rule

PREFIX = "diffuser.flow_processor."
META = "fluxflow_jax.lora"
ADAPTER_FILE = "lora.safetensors"
META_KEYS = ("rank", "alpha", "target_layers", "trigger", "class_word")


class AdapterFileError(ValueError):
    """An adapter file that does not fit the model (the message names the file and key)."""


def reference_module(flax_path: str) -> str:
    """``'transformer_blocks_0/self_attn/q_proj'`` -> ``'transformer_blocks.0.self_attn.q_proj'``
    (the reference's module path, from the interop key map)."""
    key, _ = flow_rule(("params", *flax_path.split("/"), "kernel"))
    return key[: -len(".weight")]


def save_adapter(path: str | Path, adapters: Mapping, meta: Mapping[str, Any]) -> Path:
    """Write ``adapters`` (our tree) with ``meta`` (rank, alpha, target_layers, ...)."""
    missing = [k for k in ("rank", "alpha", "target_layers") if k not in meta]
    if missing:
        raise ValueError(f"adapter metadata lacks {missing}")
    flat = lora.flatten(jax.device_get(adapters))
    arrays = {}
    for m in lora.adapter_paths(adapters):
        ref = PREFIX + reference_module(m)
        arrays[f"{ref}.lora_A"] = np.ascontiguousarray(np.asarray(flat[f"{m}/lora_A"]).T)
        arrays[f"{ref}.lora_B"] = np.ascontiguousarray(np.asarray(flat[f"{m}/lora_B"]).T)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    info = {k: meta[k] for k in META_KEYS if k in meta}
    save_file(arrays, str(tmp), metadata={META: json.dumps(info)})
    tmp.replace(path)
    return path


def load_adapter(path: str | Path, flow_params: Mapping) -> tuple[dict, dict]:
    """``(adapters, meta)`` from an adapter file, checked against ``flow_params`` (our tree)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    with safe_open(str(path), "np") as f:
        raw = (f.metadata() or {}).get(META)
        if raw is None:
            raise AdapterFileError(f"{path}: no {META!r} metadata (not a fluxflow_jax LoRA file)")
        meta = json.loads(raw)
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle)
    kernels = {k[: -len("/kernel")]: v for k, v in lora.flatten(flow_params).items()
               if k.endswith("/kernel") and np.ndim(v) == 2}
    by_ref = {}
    for m in lora.target_paths(flow_params, "all"):
        by_ref[PREFIX + reference_module(m)] = m
    flat = {}
    for key, value in tensors.items():
        mod, _, leaf = key.rpartition(".")
        if leaf not in ("lora_A", "lora_B") or mod not in by_ref:
            raise AdapterFileError(f"{path}: key {key!r} names no adaptable layer of this flow "
                                   "model (a file for a different model size?)")
        m = by_ref[mod]
        flat[f"{m}/{leaf}"] = jnp.asarray(np.asarray(value).T)
    for m in sorted({k.rsplit("/", 1)[0] for k in flat}):
        a, b = flat.get(f"{m}/lora_A"), flat.get(f"{m}/lora_B")
        if a is None or b is None:
            raise AdapterFileError(f"{path}: {PREFIX}{reference_module(m)} lacks lora_A or lora_B")
        d_in, d_out = np.shape(kernels[m])
        if a.shape != (d_in, meta["rank"]) or b.shape != (meta["rank"], d_out):
            raise AdapterFileError(f"{path}: {PREFIX}{reference_module(m)} has A {a.T.shape} / "
                                   f"B {b.T.shape}, the model needs [{meta['rank']}, {d_in}] / "
                                   f"[{d_out}, {meta['rank']}]")
    return lora.unflatten(flat), meta


def apply_adapter(params: Mapping, path: str | Path, user_scale: float = 1.0) -> tuple[dict, dict]:
    """``params`` with the adapter file merged into ``params['flow']`` at
    ``user_scale * alpha / rank`` (``user_scale=0`` gives the base weights unchanged)."""
    adapters, meta = load_adapter(path, params["flow"])
    s = float(user_scale) * lora.scale(meta["rank"], meta["alpha"])
    out = dict(params)
    if s != 0.0:
        out["flow"] = lora.merge(params["flow"], adapters, s)
    return out, meta
