"""BertTextEncoder <-> reference state dict, and HF DistilBERT checkpoints from a local directory.

Reference keys (``text_encoder.safetensors`` without its ``text_encoder.`` prefix):
``language_model.<HF DistilBertModel key>`` and ``ouput_layer.{0,1,3,4}.{weight,bias}`` (the
typo is the reference's and stays in the key names). Our tree: ``params/language_model/...``
with HF's module names (``layer_i`` for ``transformer.layer.i``) and ``params/head/{dense_0,
norm_1, dense_3, norm_4}``.

Older transformers versions saved the non-persistent ``embeddings.position_ids`` buffer; it is
accepted and ignored on import and never written (the reference, on current transformers, has
no such key).
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fluxflow_jax.interop.common import InteropError, export_state_dict, import_state_dict
from fluxflow_jax.models.text import DISTILBERT_KEYS, BertTextEncoder, DistilBert

POSITION_IDS = "embeddings.position_ids"
# Task heads of HF DistilBERT checkpoints that are not part of DistilBertModel.
HF_HEAD_PREFIXES = ("vocab_transform.", "vocab_layer_norm.", "vocab_projector.",
                    "pre_classifier.", "classifier.", "qa_outputs.")
TEXT_CONFIG_KEYS = ("embed_dim",) + DISTILBERT_KEYS + ("pooling", "freeze_backbone", "activation")
_HEAD_INDEX = {"dense_0": "0", "norm_1": "1", "dense_3": "3", "norm_4": "4"}


def _leaf(leaf: str) -> tuple[str, str] | None:
    return {"kernel": ("weight", "linear"), "embedding": ("weight", "plain"),
            "scale": ("weight", "plain"), "bias": ("bias", "plain")}.get(leaf)


def distilbert_rule(path: tuple) -> tuple[str, str] | None:
    """``('params', *names)`` of a standalone :class:`DistilBert` -> HF ``DistilBertModel`` key."""
    if path[:1] != ("params",) or len(path) < 3:
        return None
    names, leaf = list(path[1:-1]), _leaf(path[-1])
    if leaf is None:
        return None
    if m := re.fullmatch(r"layer_(\d+)", names[0]):
        names[0] = f"transformer.layer.{m.group(1)}"
    return ".".join(names + [leaf[0]]), leaf[1]


def text_rule(path: tuple) -> tuple[str, str] | None:
    """``('params', *names)`` of a :class:`BertTextEncoder` -> reference key."""
    if path[:1] != ("params",) or len(path) < 3:
        return None
    top = path[1]
    if top == "language_model":
        sub = distilbert_rule(("params",) + path[2:])
        return None if sub is None else (f"language_model.{sub[0]}", sub[1])
    if top == "head" and len(path) == 4 and path[2] in _HEAD_INDEX and _leaf(path[3]):
        name, kind = _leaf(path[3])
        return f"ouput_layer.{_HEAD_INDEX[path[2]]}.{name}", kind
    return None


def infer_text_config(sd: Mapping[str, Any], prefix: str = "",
                      overrides: Mapping[str, Any] | None = None) -> dict:
    """BertTextEncoder kwargs from a reference state dict's shapes, then ``overrides``.

    ``n_heads`` is not visible in the shapes and must be in ``overrides``: DistilBERT's usual
    head width 64 is a convention, not a rule, and a wrong guess changes the model silently. The head's activation is
    ``'bezier'`` when ``ouput_layer.0`` is 2560 wide; the 512-wide ablation head needs
    ``overrides['activation']``.
    """
    overrides = dict(overrides or {})
    lm = f"{prefix}language_model."

    def shape(key: str) -> tuple:
        if key not in sd:
            raise InteropError(f"text encoder checkpoint has no {key!r}; expected reference "
                               f"keys like '{lm}embeddings.word_embeddings.weight'")
        return tuple(np.shape(sd[key]))

    vocab, dim = shape(f"{lm}embeddings.word_embeddings.weight")
    layers = {int(m.group(1)) for k in sd
              if (m := re.match(re.escape(lm) + r"transformer\.layer\.(\d+)\.", k))}
    cfg: dict[str, Any] = {
        "vocab_size": vocab, "dim": dim, "n_layers": len(layers),
        "max_position_embeddings": shape(f"{lm}embeddings.position_embeddings.weight")[0],
        "hidden_dim": shape(f"{lm}transformer.layer.0.ffn.lin1.weight")[0] if layers else 4 * dim,
    }
    head0 = shape(f"{prefix}ouput_layer.0.weight")[0]
    head3 = shape(f"{prefix}ouput_layer.3.weight")[0]
    if head0 == 2560:
        cfg["activation"], cfg["embed_dim"] = "bezier", head3 // 5
    elif head0 == 512:
        if overrides.get("activation", "bezier") == "bezier":
            raise InteropError(f"{prefix}ouput_layer.0.weight is 512 wide (an ablation head); "
                               "pass config={'activation': 'relu'|'silu'|'gelu'}")
        cfg["embed_dim"] = head3
    else:
        raise InteropError(f"{prefix}ouput_layer.0.weight has {head0} rows; expected 2560 "
                           "(Bezier head) or 512 (ablation head)")
    if "n_heads" not in overrides:
        raise InteropError(f"{lm}transformer: the text encoder's head count cannot be read from "
                           "the weights; give it: `convert to-flax --config <config file>` "
                           "(model.text.n_heads), a file exported by fluxflow_jax (its metadata "
                           "carries it) or config={'n_heads': N}")
    cfg.update(overrides)
    return _check_config(cfg)


def _check_config(config: Mapping[str, Any]) -> dict:
    unknown = sorted(set(config) - set(TEXT_CONFIG_KEYS))
    if unknown:
        raise InteropError(f"unknown BertTextEncoder config keys {unknown}; "
                           f"expected a subset of {list(TEXT_CONFIG_KEYS)}")
    return {k: (int(v) if isinstance(v, (np.integer,)) else v) for k, v in config.items()}


def text_template(config: Mapping[str, Any]) -> dict:
    """Abstract ``{'params': ...}`` of a BertTextEncoder built from ``config``."""
    model = BertTextEncoder(**_check_config(config))
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda k: model.init(k, ids), jax.random.key(0))


def text_to_torch(variables: Mapping, config: Mapping[str, Any] | None = None,
                  prefix: str = "") -> dict[str, np.ndarray]:
    """Export ``{'params': ...}`` to reference keys (``prefix='text_encoder.'``: trainer file).

    With ``config`` the tree is first checked against that model's structure.
    """
    if "params" not in variables:
        raise InteropError(f"text_to_torch needs variables['params'] (got {sorted(variables)})")
    variables = {"params": variables["params"]}
    if config is not None:
        want = {text_rule(p)[0] for p in traverse_util.flatten_dict(text_template(config))}
        have = {r[0] for p in traverse_util.flatten_dict(variables) if (r := text_rule(p))}
        if want != have:
            raise InteropError(f"variables do not match BertTextEncoder{dict(config)}: missing "
                               f"{sorted(want - have)}, unexpected {sorted(have - want)}")
    return export_state_dict(variables, text_rule, prefix=prefix)


def text_from_torch(sd: Mapping[str, Any], config: Mapping[str, Any] | None = None,
                    prefix: str = "") -> tuple[dict, dict]:
    """Import a reference state dict -> (``{'params': jnp arrays}``, full config).

    ``config`` may be partial: missing shape keys are inferred (:func:`infer_text_config`).
    Every missing, unexpected or mis-shaped key is reported in one :class:`InteropError`.
    """
    config = infer_text_config(sd, prefix, config)
    variables = import_state_dict(sd, text_template(config), text_rule, prefix=prefix,
                                  ignore=(f"language_model.{POSITION_IDS}",),
                                  what=f"BertTextEncoder checkpoint ({prefix or 'no prefix'})")
    return jax.tree.map(jnp.asarray, variables), config


# --------------------------------------------------------------------------- HF loader

def _read_hf_config(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InteropError(f"{path}: not valid JSON ({e})") from None
    if raw.get("model_type", "distilbert") != "distilbert":
        raise InteropError(f"{path}: model_type is {raw['model_type']!r}, expected 'distilbert'")
    if raw.get("activation", "gelu") != "gelu":
        raise InteropError(f"{path}: activation {raw['activation']!r} is not supported "
                           "(DistilBert here uses exact GELU)")
    cfg = {"pad_token_id": int(raw.get("pad_token_id", 0) or 0)}
    missing = [k for k in DISTILBERT_KEYS if k not in raw and k != "pad_token_id"]
    if missing:
        raise InteropError(f"{path}: missing DistilBERT config keys {missing}")
    for k in DISTILBERT_KEYS:
        if k != "pad_token_id":
            cfg[k] = raw[k]
    return cfg


def load_hf_distilbert(model_dir: str | Path) -> tuple[dict, dict[str, Any]]:
    """Read ``config.json`` + ``model.safetensors`` of a HF DistilBERT from a LOCAL directory.

    Returns ``(backbone_params, config_kwargs)``: the params tree of :class:`DistilBert` (put it
    at ``params['language_model']`` of a :class:`BertTextEncoder` built with the same kwargs)
    and its constructor kwargs. Keys may carry the ``distilbert.`` prefix of task models; the
    MLM/classification head keys are ignored. Weights are used as loaded: unlike the reference
    (REFERENCE §10 item 12) no Linear is re-initialised. Only safetensors is read: a
    ``pytorch_model.bin`` is pickle and is refused.
    """
    root = Path(model_dir)
    cfg_path, w_path = root / "config.json", root / "model.safetensors"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"HF DistilBERT directory {root}: no config.json at {cfg_path}")
    if not w_path.is_file():
        hint = ""
        if (root / "pytorch_model.bin").exists():
            hint = (" (found pytorch_model.bin: a pickle file, not loaded; convert it to "
                    "safetensors)")
        elif (root / "model.safetensors.index.json").exists():
            hint = " (found a sharded checkpoint index; merge the shards into model.safetensors)"
        raise FileNotFoundError(f"HF DistilBERT directory {root}: no weights at {w_path}{hint}")
    cfg = _read_hf_config(cfg_path)
    from safetensors.numpy import load_file
    try:
        raw = load_file(str(w_path))
    except Exception as e:
        raise InteropError(f"could not read {w_path}: {e}") from e
    sd = {}
    for k, v in raw.items():
        k = k.removeprefix("distilbert.")
        if not k.startswith(HF_HEAD_PREFIXES):
            sd[k] = v
    model = DistilBert(**cfg)
    template = jax.eval_shape(lambda key: model.init(key, jnp.zeros((1, 1), jnp.int32)),
                              jax.random.key(0))
    params = import_state_dict(sd, template, distilbert_rule, ignore=(POSITION_IDS,),
                               what=f"HF DistilBERT weights {w_path}")
    return jax.tree.map(jnp.asarray, params["params"]), cfg


# --------------------------------------------------------------------------- run-level loader

# config.model.text keys that must equal the pretrained directory's config.json (they fix shapes
# or, for pad_token_id, which embedding row is the padding one). Dropout rates are training
# settings and stay the run's.
PRETRAINED_MUST_MATCH = ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim",
                         "max_position_embeddings", "pad_token_id")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def check_pretrained_config(model_dir: str | Path, text_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The directory's DistilBERT kwargs, after checking ``config.model.text`` agrees with them.

    A mismatch is one line naming the key, both values and the fix.
    """
    hf = _read_hf_config(Path(model_dir) / "config.json")
    for key in PRETRAINED_MUST_MATCH:
        if key in text_cfg and int(text_cfg[key]) != int(hf[key]):
            fix = (f"set config.tokenizer={model_dir} (the checkpoint's own tokenizer)"
                   if key in ("vocab_size", "pad_token_id") else
                   f"set --config.model.text.{key}={hf[key]}")
            raise InteropError(f"config.model.text.{key}={text_cfg[key]} but "
                               f"{Path(model_dir) / 'config.json'} has {key}={hf[key]}: {fix}")
    return hf


def load_pretrained_text_encoder(model_dir: str | Path, model_cfg: Mapping[str, Any],
                                 params: Mapping[str, Any]) -> dict:
    """``params`` of a BertTextEncoder with its DistilBERT backbone replaced by the pretrained
    weights of a local HF directory (``config.json`` + ``model.safetensors``).

    ``model_cfg`` is the run's ``config.model`` (its ``text`` section is checked against the
    directory by :func:`check_pretrained_config`); ``params`` the encoder's current params, whose
    ``head`` is kept (DistilBERT has no such head). The backbone is used exactly as stored: the
    reference re-initialises every pretrained Linear with xavier after loading (REFERENCE.md
    section 10), which discards the pretraining.
    """
    text_cfg = model_cfg.get("text", {})
    check_pretrained_config(model_dir, text_cfg)
    backbone, _ = load_hf_distilbert(model_dir)
    if "language_model" not in params:
        raise InteropError("load_pretrained_text_encoder: params has no 'language_model' subtree "
                           "(pass the text encoder's params, e.g. params['text_encoder'])")
    want = {p: np.shape(v) for p, v in traverse_util.flatten_dict(params["language_model"]).items()}
    got = {p: np.shape(v) for p, v in traverse_util.flatten_dict(backbone).items()}
    if want != got:
        bad = sorted("/".join(p) for p in set(want) | set(got) if want.get(p) != got.get(p))
        raise InteropError(f"{model_dir}: backbone does not fit config.model.text ({bad[:3]})")
    return {**dict(params), "language_model": backbone}


def pretrained_tokenizer_dir(model_dir: str | Path | None) -> str | None:
    """``model_dir`` when it holds a tokenizer (HF ``save_pretrained`` files), else None.

    The tokenizer a backbone was pretrained with is the one whose ids its embeddings know.
    """
    if not model_dir:
        return None
    root = Path(model_dir)
    return str(root) if any((root / f).is_file() for f in TOKENIZER_FILES) else None
