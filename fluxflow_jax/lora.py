"""LoRA adapters for the flow processor: a separate param tree, merged into the frozen kernels.

An adapter on a Dense layer with kernel ``W [in, out]`` is ``A [in, r]`` and ``B [r, out]``; the
adapted layer computes ``x @ (W + s A B) + b`` with ``s = alpha / rank``. The adapter tree mirrors
the flow params' module paths (``{'transformer_blocks_0': {'self_attn': {'q_proj': {'lora_A',
'lora_B'}}}}``), so it checkpoints, shards and gets its own optimizer group like any model
(``state.MODELS['flow_lora']``) while the base ``flow`` params stay frozen.

Why merge instead of wrapping the modules: the flow modules stay exactly the reference's (parity,
interop untouched), one code path serves training, sampling and the merged export, and ``B = 0``
gives ``W + s A 0 = W`` - the base model bit for bit at step 0. The cost is one ``[in, out]``
product per adapted layer per step (negligible beside the activations). ``apply_unmerged``
computes the same thing the other way round, ``x W + s (x A) B`` through
``nn.intercept_methods``; tests use it as the oracle of the merge.

Targets (``target_layers``): ``'attention'`` = q_proj, kv_proj (k and v, one fused Linear in the
reference) and out_proj of every block's self- and cross-attention; ``'all'`` adds the pillar MLP
layers and the feed-forward layer. (Cross-attention attends to a single text token, so its softmax
is constantly 1: adapters on its q_proj - and on the k half of its kv_proj - get no gradient and stay
zero. They are kept so 'attention' means what it means in other trainers; they cost 2 x r x D each.)
Input dropout on the adapter branch is not implemented (a merged
kernel has no separate branch to drop): validation refuses ``dropout > 0``.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fluxflow_jax.models.layers import Dense

TARGETS: dict[str, str] = {
    "attention": r"transformer_blocks_\d+/(self_attn|cross_attn)/(q_proj|kv_proj|out_proj)",
    "all": r"transformer_blocks_\d+/((self_attn|cross_attn)/(q_proj|kv_proj|out_proj)|p\d+/l\d+|ffn)",
}
# The stage's ``lora`` block: every key, its default and what it means (configs, validation and
# the step read this one table).
LORA_DEFAULTS: dict[str, Any] = {
    "rank": 4,                  # r: columns of A / rows of B
    "alpha": 4.0,               # scale alpha / rank on the adapter product
    "target_layers": "attention",  # 'attention' | 'all' (see TARGETS)
    "dropout": 0.0,             # not implemented: must stay 0 (validation refuses > 0)
    "trigger": "",              # the word the captions use for the new concept (required)
    "class_word": "",           # what DOP replaces the trigger with (required when DOP is on)
    "dop_multiplier": 0.0,      # weight of the DOP term; 0 = off
    "dop_every_n_steps": 1,     # run the DOP term on steps where step % n == 0
    "export_merged": False,     # also write base + adapter merged as a reference-layout export
}


def scale(rank: int, alpha: float) -> float:
    """The adapter product's scale ``alpha / rank``."""
    return float(alpha) / int(rank)


def _flat(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _nest(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for k, v in flat.items():
        *head, leaf = k.split("/")
        d = out
        for h in head:
            d = d.setdefault(h, {})
        d[leaf] = v
    return out


def target_paths(flow_params: Mapping, target_layers: str) -> list[str]:
    """'/'-joined module paths of the Dense layers ``target_layers`` adapts, in param order."""
    if target_layers not in TARGETS:
        raise ValueError(f"lora.target_layers: {target_layers!r} not in {tuple(TARGETS)}")
    rx = re.compile(TARGETS[target_layers] + "$")
    mods = [k[: -len("/kernel")] for k, v in _flat(flow_params).items()
            if k.endswith("/kernel") and jnp.ndim(v) == 2]
    return [m for m in mods if rx.match(m)]


def init_adapters(flow_params: Mapping, rank: int, target_layers: str, rng: jax.Array) -> dict:
    """Fresh adapters: ``A ~ U(+-1/sqrt(in))`` (PEFT's kaiming-uniform), ``B = 0``."""
    flat = _flat(flow_params)
    out = {}
    for i, m in enumerate(target_paths(flow_params, target_layers)):
        d_in, d_out = jnp.shape(flat[f"{m}/kernel"])
        bound = 1.0 / math.sqrt(d_in)
        out[f"{m}/lora_A"] = jax.random.uniform(jax.random.fold_in(rng, i), (d_in, int(rank)),
                                                jnp.float32, -bound, bound)
        out[f"{m}/lora_B"] = jnp.zeros((int(rank), d_out), jnp.float32)
    if not out:
        raise ValueError(f"lora.target_layers={target_layers!r} matches no layer of the flow model")
    return _nest(out)


def merge(flow_params: Mapping, adapters: Mapping, s: float | jax.Array) -> dict:
    """Flow params with ``kernel + s * A @ B`` on every adapted layer. One jitted function (a
    single compilation per adapter layout, instead of op-by-op dispatch when called eagerly from
    sampling, generate or tests; inlined when called inside a step's trace)."""
    return _merge(flow_params, adapters, jnp.asarray(s, jnp.float32))


@jax.jit
def _merge(flow_params: Mapping, adapters: Mapping, s: jax.Array) -> dict:
    def go(p: Mapping, a: Mapping) -> dict:
        if "lora_A" in a:
            k = p["kernel"]
            delta = (s * (a["lora_A"].astype(jnp.float32) @ a["lora_B"].astype(jnp.float32)))
            return {**p, "kernel": k + delta.astype(k.dtype)}
        missing = sorted(set(a) - set(p))
        if missing:
            raise ValueError(f"adapter entries {missing} have no layer in the flow params")
        return {k: (go(v, a[k]) if k in a else v) for k, v in p.items()}
    return go(flow_params, adapters)


def apply_unmerged(module: nn.Module, flow_params: Mapping, adapters: Mapping, s: float,
                   *args: Any, **kwargs: Any) -> Any:
    """``module.apply`` with every adapted Dense computing ``x W + b + s (x A) B`` (the base kernel
    untouched): the textbook form of LoRA, the oracle ``merge`` is checked against."""
    flat = _flat(adapters)

    def interceptor(next_fun, args_, kwargs_, context):
        mod = context.module
        y = next_fun(*args_, **kwargs_)
        if context.method_name != "__call__" or not isinstance(mod, Dense):
            return y
        key = "/".join(mod.path)
        if f"{key}/lora_A" not in flat:
            return y
        x = args_[0]
        return y + s * ((x @ flat[f"{key}/lora_A"]) @ flat[f"{key}/lora_B"]).astype(y.dtype)

    with nn.intercept_methods(interceptor):
        return module.apply({"params": flow_params}, *args, **kwargs)


def adapter_paths(adapters: Mapping) -> list[str]:
    """Module paths that carry an adapter ('/'-joined)."""
    return sorted(k[: -len("/lora_A")] for k in _flat(adapters) if k.endswith("/lora_A"))


def flatten(adapters: Mapping) -> dict[str, Any]:
    """``{'<module path>/lora_A': A, ...}`` ('/'-joined)."""
    return _flat(adapters)


def unflatten(flat: Mapping[str, Any]) -> dict:
    """Inverse of :func:`flatten`."""
    return _nest(flat)


def config_errors(cfg: Mapping[str, Any], prefix: str) -> list[str]:
    """Problems of a stage's ``lora`` block, each naming ``<prefix>.<key>``."""
    errs = [f"{prefix}.{k}: unknown key (known: {sorted(LORA_DEFAULTS)})"
            for k in cfg if k not in LORA_DEFAULTS]
    get = lambda k: cfg[k] if k in cfg else LORA_DEFAULTS[k]
    rank, alpha = get("rank"), get("alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        errs.append(f"{prefix}.rank: must be an integer >= 1, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        errs.append(f"{prefix}.alpha: must be > 0 (the scale is alpha / rank), got {alpha!r}")
    if get("target_layers") not in TARGETS:
        errs.append(f"{prefix}.target_layers: {get('target_layers')!r} not in {tuple(TARGETS)}")
    if float(get("dropout")) != 0.0:
        errs.append(f"{prefix}.dropout: {get('dropout')!r} - adapter dropout is not implemented "
                    "(adapters are merged into the kernels); set it to 0")
    trigger = str(get("trigger")).strip()
    if not trigger:
        errs.append(f"{prefix}.trigger: required - the word your captions use for the new concept "
                    "(e.g. 'sks')")
    elif not re.fullmatch(r"\w+", trigger):
        errs.append(f"{prefix}.trigger: {trigger!r} must be one word (letters, digits, _)")
    mult, every = get("dop_multiplier"), get("dop_every_n_steps")
    if not isinstance(mult, (int, float)) or mult < 0:
        errs.append(f"{prefix}.dop_multiplier: must be >= 0 (0 = no DOP), got {mult!r}")
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        errs.append(f"{prefix}.dop_every_n_steps: must be an integer >= 1, got {every!r}")
    word = str(get("class_word")).strip()
    if isinstance(mult, (int, float)) and mult > 0 and not word:
        errs.append(f"{prefix}.class_word: required when dop_multiplier > 0 (DOP replaces the "
                    "trigger with it, e.g. 'colored')")
    if word and trigger and word == trigger:
        errs.append(f"{prefix}.class_word: must differ from the trigger {trigger!r}")
    if not isinstance(get("export_merged"), bool):
        errs.append(f"{prefix}.export_merged: must be True or False")
    return errs


def settings(cfg: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A stage's ``lora`` block with defaults filled (None when the stage has none)."""
    if cfg is None:
        return None
    return {**LORA_DEFAULTS, **{k: cfg[k] for k in cfg}}


def swap_word(text: str, trigger: str, class_word: str) -> str:
    """``text`` with every whole-word ``trigger`` replaced by ``class_word`` (case-insensitive,
    as the uncased tokenizers see it)."""
    return re.sub(rf"(?i)\b{re.escape(trigger)}\b", class_word, text)


def has_word(text: str, word: str) -> bool:
    """Whether ``word`` occurs in ``text`` as a whole word (case-insensitive)."""
    return re.search(rf"(?i)\b{re.escape(word)}\b", text) is not None
