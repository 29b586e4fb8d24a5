"""PyTorch-reference checkpoint import/export at the file level.

The reference writes (``REFERENCE.md`` 1.8):
  ``flxflow_final.safetensors``  ``diffuser.compressor.*``, ``diffuser.expander.*``, ``diffuser.flow_processor.*``
  ``text_encoder.safetensors``   ``text_encoder.*``
  ``D_img.safetensors``          ``D_img.*``
Per-model key maps live in ``interop/{vae,flow,discriminator,text}.py``; the engine in ``common``.
A model's config is inferred from the checkpoint's shapes, as the reference does.

Our own "Flax param file" is a safetensors file of ``<model>/<flax/path>`` arrays whose metadata
holds the model configs as JSON (no pickle).
"""
from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from fluxflow_jax.interop.common import InteropError, count_params  # noqa: F401
from fluxflow_jax.interop.text import (  # noqa: F401  (the run-level entry points)
    check_pretrained_config,
    load_pretrained_text_encoder,
    pretrained_tokenizer_dir,
)

PathLike = Union[str, Path]

# model name -> (file, key prefix, interop module, from_torch fn, to_torch fn)
COMPONENTS: dict[str, tuple[str, str, str, str, str]] = {
    "compressor": ("flxflow_final.safetensors", "diffuser.compressor.", "vae",
                   "compressor_from_torch", "compressor_to_torch"),
    "expander": ("flxflow_final.safetensors", "diffuser.expander.", "vae",
                 "expander_from_torch", "expander_to_torch"),
    "flow": ("flxflow_final.safetensors", "diffuser.flow_processor.", "flow",
             "flow_from_torch", "flow_to_torch"),
    "text_encoder": ("text_encoder.safetensors", "text_encoder.", "text",
                     "text_from_torch", "text_to_torch"),
    "discriminator": ("D_img.safetensors", "D_img.", "discriminator",
                      "disc_from_torch", "disc_to_torch"),
}
FILES = ("flxflow_final.safetensors", "text_encoder.safetensors", "D_img.safetensors")
FLAX_FORMAT = "fluxflow_jax.params.v1"
CONFIG_META = "fluxflow_jax.configs"


def _stored_configs(path: Path) -> dict[str, dict]:
    """Model configs an export of ours stored in the safetensors metadata ({} otherwise)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
        return json.loads(meta.get(CONFIG_META, "{}"))
    except Exception:
        return {}


def _fn(module: str, name: str):
    return getattr(importlib.import_module(f"fluxflow_jax.interop.{module}"), name)


def _strip(sd: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def read_state_dict(path: PathLike) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise InteropError(f"{path}: not a readable safetensors file ({e})") from e


def reference_files(path: PathLike) -> list[Path]:
    """The reference checkpoint files at ``path`` (a directory or a single .safetensors file)."""
    path = Path(path)
    if path.is_dir():
        files = [path / f for f in FILES if (path / f).exists()]
        if not files:
            raise FileNotFoundError(f"{path}: no reference checkpoint files ({', '.join(FILES)})")
        return files
    return [path]


# model name -> the config-inference function of its interop module (shapes -> kwargs).
_INFER = {"compressor": ("vae", "infer_compressor_config"),
          "expander": ("vae", "infer_expander_config"),
          "flow": ("flow", "infer_flow_config"),
          "text_encoder": ("text", "infer_text_config"),
          "discriminator": ("discriminator", "infer_disc_config")}
# Settings the weights cannot show, by model: (our config key, config.model key).
UNSEEN_SETTINGS = {"compressor": (("attn_heads", "vae_attn_heads"),),
                   "flow": (("n_head", "flow_heads"),),
                   "text_encoder": (("n_heads", "text.n_heads"),)}


def overrides_from_model_config(model_cfg: Mapping[str, Any] | None) -> dict[str, dict]:
    """Per-model settings a checkpoint's shapes cannot reveal, read from a run's ``config.model``.

    Head counts (any divisor of the width fits the weights) and the pipeline's ``ctx_tokens``
    (= ``downscales``, used only when the file has no compressor to read it from).
    """
    if not model_cfg:
        return {}
    out: dict[str, dict] = {}
    for name, pairs in UNSEEN_SETTINGS.items():
        for ours, key in pairs:
            node: Any = model_cfg
            for part in key.split("."):
                node = node.get(part) if isinstance(node, Mapping) or hasattr(node, "get") else None
                if node is None:
                    break
            if node is not None:
                out.setdefault(name, {})[ours] = int(node)
    if model_cfg.get("downscales") is not None:
        for name in ("flow", "expander"):
            out.setdefault(name, {})["ctx_tokens"] = int(model_cfg["downscales"])
    return out


# Settings that change what a model computes but not its weights' shapes, so a shape check
# cannot catch a checkpoint/config disagreement on them.
SHAPELESS_SETTINGS = ("ctx_tokens", "attn_heads", "n_head", "n_heads", "activation",
                      "head_activation")


def check_loaded_config(name: str, loaded: Mapping[str, Any], built: Mapping[str, Any],
                        source: PathLike) -> None:
    """Refuse weights whose config differs from the run's module on a shapeless setting.

    ``loaded``: the config that came with the weights; ``built``: the constructor fields of the
    module the run built (e.g. ``train.module_config(models.flow)``). One line, naming both.
    """
    for key in SHAPELESS_SETTINGS:
        if key in loaded and key in built and loaded[key] != built[key]:
            hint = ("it follows config.model.downscales" if key == "ctx_tokens"
                    else "set config.model to the checkpoint's value")
            raise InteropError(f"{source}: {name}.{key}={loaded[key]} in the checkpoint but "
                               f"{built[key]} in the run's model ({hint})")


def _merge(name: str, stored: Mapping, given: Mapping, path: PathLike) -> dict:
    """``given`` over ``stored`` (our export's metadata); a disagreement on a setting is refused."""
    for k, v in given.items():
        if k != "ctx_tokens" and k in stored and stored[k] != v:
            raise InteropError(f"{path}: {name}.{k}={stored[k]} in the file's metadata but {v} "
                               "in the given config; drop one of them")
    merged = {**stored, **given}
    merged.pop("ctx_tokens", None)  # decided by _pipeline_ctx_tokens
    return merged


def _pipeline_ctx_tokens(sd: Mapping[str, np.ndarray], stored: Mapping, given: Mapping
                         ) -> int | None:
    """``ctx_tokens`` of the flow model and expander, as the reference's ``FluxPipeline`` sets it.

    Order: our export's metadata; else the compressor in the same file (its ``downscales``: the
    reference overwrites both modules' ``ctx_tokens`` with it); else the given config; else None
    (a bare module keeps the reference's default).
    """
    for name in ("flow", "expander"):
        if "ctx_tokens" in stored.get(name, {}):
            return int(stored[name]["ctx_tokens"])
    downscales = _fn("vae", "count_downscales")(sd, COMPONENTS["compressor"][1])
    if downscales:
        return downscales
    for name in ("flow", "expander"):
        if "ctx_tokens" in given.get(name, {}):
            return int(given[name]["ctx_tokens"])
    return None


def load_reference(path: PathLike, models: set[str] | None = None,
                   configs: Mapping[str, Mapping] | None = None,
                   model_cfg: Mapping[str, Any] | None = None
                   ) -> dict[str, tuple[dict, dict]]:
    """Read a reference checkpoint (file or directory) -> ``{model: (variables, config)}``.

    ``models`` restricts which components are read (default: every component found). A model's
    config is inferred from the shapes, completed by (in rising priority) our export's metadata,
    ``model_cfg`` (a run's ``config.model``: head counts, see
    :func:`overrides_from_model_config`) and ``configs`` (``{model: partial config}``). Settings
    the shapes cannot show and nothing gives are refused, not guessed. The flow model's and the
    expander's ``ctx_tokens`` follow the reference's pipeline (:func:`_pipeline_ctx_tokens`).
    Components whose prefix is absent from the files are simply not returned.
    """
    sd: dict[str, np.ndarray] = {}
    stored: dict[str, dict] = {}
    for f in reference_files(path):
        sd.update(read_state_dict(f))
        stored.update(_stored_configs(f))
    given = overrides_from_model_config(model_cfg)
    for name, cfg in (configs or {}).items():
        given[name] = {**given.get(name, {}), **dict(cfg)}
    ctx_tokens = _pipeline_ctx_tokens(sd, stored, given)
    out = {}
    for name, (_, prefix, module, from_fn, _) in COMPONENTS.items():
        if models is not None and name not in models:
            continue
        part = _strip(sd, prefix)
        if not part:
            continue
        overrides = _merge(name, stored.get(name, {}), given.get(name, {}), path)
        if name in ("flow", "expander") and ctx_tokens is not None:
            overrides["ctx_tokens"] = ctx_tokens
        try:
            cfg = _infer(name, part, overrides)
            out[name] = _fn(module, from_fn)(part, cfg)
        except InteropError as e:
            raise InteropError(f"{path} [{prefix}*]: {e}") from e
    if models is not None and (missing := sorted(set(models) - set(out))):
        raise InteropError(f"{path}: no weights for {missing} (looked for prefixes "
                           f"{[COMPONENTS[m][1] for m in missing]})")
    return out


def _infer(name: str, sd: Mapping[str, np.ndarray], overrides: Mapping[str, Any]) -> dict:
    module, fn = _INFER[name]
    if name == "discriminator":  # every setting of D shows in its shapes
        return {**_fn(module, fn)(sd), **overrides}
    return dict(_fn(module, fn)(sd, "", overrides))


def to_reference_state_dicts(models: Mapping[str, tuple[Mapping, Mapping]]
                             ) -> dict[str, dict[str, np.ndarray]]:
    """``{model: (variables, config)}`` -> ``{file name: state dict}`` in the reference layout."""
    files: dict[str, dict[str, np.ndarray]] = {}
    for name, (variables, cfg) in models.items():
        if name not in COMPONENTS:
            raise KeyError(f"unknown model {name!r}; expected one of {sorted(COMPONENTS)}")
        fname, prefix, module, _, to_fn = COMPONENTS[name]
        sd = _fn(module, to_fn)(variables, dict(cfg))
        files.setdefault(fname, {}).update(
            {prefix + k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)
                                              if np.asarray(v).dtype.kind == "f" else np.asarray(v))
             for k, v in sd.items()})
    return files


def export_reference(out_dir: PathLike, models: Mapping[str, tuple[Mapping, Mapping]]) -> list[Path]:
    """Write the reference's safetensors files into ``out_dir``; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, sd in to_reference_state_dicts(models).items():
        tmp = out_dir / (fname + ".tmp")
        # Our configs ride along as metadata (the reference ignores it): some settings, e.g. the
        # text encoder's head count, cannot be inferred from tensor shapes.
        cfgs = {n: dict(c) for n, (_, c) in models.items() if COMPONENTS[n][0] == fname}
        # One metadata key only: safetensors writes its metadata map in a per-process random
        # order, so two keys would make identical exports differ byte for byte.
        save_file(sd, str(tmp), metadata={CONFIG_META: json.dumps(
            cfgs, default=_json_default, sort_keys=True)})
        tmp.replace(out_dir / fname)  # atomic: a crash never leaves half a file
        written.append(out_dir / fname)
    return written


def save_flax_params(path: PathLike, models: Mapping[str, tuple[Mapping, Mapping]]) -> Path:
    """Our own param file: ``<model>/<collection>/<path>`` arrays + JSON configs in metadata."""
    path = Path(path)
    arrays, configs = {}, {}
    for name, (variables, cfg) in models.items():
        configs[name] = dict(cfg)
        for k, v in traverse_util.flatten_dict(_plain(variables), sep="/").items():
            arrays[f"{name}/{k}"] = np.ascontiguousarray(np.asarray(v))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    # One metadata key (its name marks the format): see export_reference on byte-identical files.
    save_file(arrays, str(tmp), metadata={FLAX_FORMAT: json.dumps(
        configs, default=_json_default, sort_keys=True)})
    tmp.replace(path)
    return path


def load_flax_params(path: PathLike) -> dict[str, tuple[dict, dict]]:
    """Inverse of :func:`save_flax_params`."""
    from safetensors import safe_open
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"param file not found: {path}")
    with safe_open(str(path), "np") as f:
        meta = f.metadata() or {}
    if not _is_flax_meta(meta):
        raise InteropError(f"{path}: not a fluxflow_jax param file (format={meta.get('format')!r}); "
                           "for a PyTorch reference checkpoint use load_reference()")
    configs = json.loads(meta[FLAX_FORMAT] if FLAX_FORMAT in meta else meta["configs"])
    flat = load_file(str(path))
    out = {}
    for name, cfg in configs.items():
        sub = {k[len(name) + 1:]: v for k, v in flat.items() if k.startswith(name + "/")}
        out[name] = (traverse_util.unflatten_dict(sub, sep="/"), cfg)
    return out


def param_file_configs(path: PathLike) -> dict[str, dict]:
    """``{model: config}`` of one of our param files, from its metadata only (no tensor read)."""
    from safetensors import safe_open
    with safe_open(str(path), "np") as f:
        meta = f.metadata() or {}
    if not _is_flax_meta(meta):
        return {}
    return json.loads(meta[FLAX_FORMAT] if FLAX_FORMAT in meta else meta.get("configs", "{}"))


def _is_flax_meta(meta: Mapping[str, str]) -> bool:
    """Our param file: the FLAX_FORMAT key (or, before v0.2, ``format == FLAX_FORMAT``)."""
    return FLAX_FORMAT in meta or meta.get("format") == FLAX_FORMAT


def is_flax_param_file(path: PathLike) -> bool:
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), "np") as f:
            return _is_flax_meta(f.metadata() or {})
    except Exception:
        return False


def load_any(path: PathLike, models: set[str] | None = None,
             model_cfg: Mapping[str, Any] | None = None) -> dict[str, tuple[dict, dict]]:
    """A Flax param file or a reference checkpoint (file or directory).

    ``model_cfg`` (a run's ``config.model``) supplies what a reference file's shapes cannot show
    (head counts; see :func:`load_reference`).
    """
    if is_flax_param_file(path):
        out = load_flax_params(path)
        return {k: v for k, v in out.items() if models is None or k in models}
    return load_reference(path, models, model_cfg=model_cfg)


def _plain(tree: Any) -> Any:
    if hasattr(tree, "unfreeze"):
        tree = tree.unfreeze()
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {o!r}")
