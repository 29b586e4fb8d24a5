"""Optimizer factories (torch semantics), partitioning over model groups, accumulation and EMA.

One optax chain per trained model group (``vae``, ``flow``, ``text_encoder``, ``discriminator``),
configured with the reference's key names (REFERENCE.md section 4) and reproducing the *torch*
update rules the reference used, where they differ from optax's defaults:

* Lion is ``lion_pytorch.Lion(decoupled_weight_decay=True)``: the decay is divided by the initial
  lr, so ``p *= 1 - lr * wd / lr0`` (1 % per step at ``lr0`` for wd=0.01, section 10 item 19 - kept,
  because a config tuned in PyTorch must behave the same; set ``decoupled_weight_decay=False`` for
  the plain ``p *= 1 - lr * wd``).
* Adam's ``weight_decay`` is torch's coupled L2 (added to the gradient); AdamW's is decoupled.
* AMSGrad takes the running maximum of the *raw* second moment, then bias-corrects (optax's
  ``scale_by_amsgrad`` takes the maximum of bias-corrected values, a different trajectory).
* RMSprop adds ``eps`` outside the square root; SGD supports torch's ``dampening``.
* Gradient clipping is torch's ``clip_grad_norm_``: scale by ``max / (norm + 1e-6)`` when below 1.

The learning rate lives in the optimizer state (``optax.inject_hyperparams``) as two
hyperparameters: ``learning_rate`` (the schedule's value at the last update) and ``lr_scale`` (a
host-fed multiplier, 1 by default, which ReduceLROnPlateau drives through ``set_lr_scale``), so the
rate is logged, checkpointed and restored with the state. Configs are Mappings (dict or
ml_collections.ConfigDict); every error names the config key at fault.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fluxflow_jax.schedules import check_setting as _check
from fluxflow_jax.schedules import make_schedule
from fluxflow_jax.schedules import settings_with_defaults as _settings
from fluxflow_jax.state import OPT_GROUPS

PyTree = Any
# Reference per-group defaults (optimizer_factory / scheduler_factory .get_default_*_config) plus
# the clipping the trainers apply (initial_clipping_norm 1.0 on VAE and flow params only).
_DEFAULT_OPTIMIZERS = {
    "flow": {"type": "Lion", "lr": 5e-7, "betas": (0.9, 0.95), "weight_decay": 0.01,
             "decoupled_weight_decay": True, "clip_norm": 1.0},
    "vae": {"type": "AdamW", "lr": 5e-7, "betas": (0.9, 0.95), "weight_decay": 0.01,
            "clip_norm": 1.0},
    "text_encoder": {"type": "AdamW", "lr": 5e-8, "betas": (0.9, 0.99), "weight_decay": 0.01,
                     "clip_norm": None},
    "discriminator": {"type": "AdamW", "lr": 5e-7, "betas": (0.0, 0.9), "weight_decay": 0.001,
                      "amsgrad": True, "clip_norm": None},
    # LoRA adapters (not in the reference): the usual LoRA trainer setting (ai-toolkit's AdamW 1e-4)
    "lora": {"type": "AdamW", "lr": 1e-4, "betas": (0.9, 0.999), "weight_decay": 0.0,
             "clip_norm": 1.0},
}
_OPTIMIZER_KEYS = {
    "Lion": {"betas": (0.9, 0.95), "weight_decay": 0.01, "decoupled_weight_decay": True},
    "AdamW": {"betas": (0.9, 0.999), "weight_decay": 0.0, "eps": 1e-8, "amsgrad": False},
    "Adam": {"betas": (0.9, 0.999), "weight_decay": 0.0, "eps": 1e-8, "amsgrad": False},
    "SGD": {"momentum": 0.0, "weight_decay": 0.0, "dampening": 0.0, "nesterov": False},
    "RMSprop": {"alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0,
                "centered": False},
}
_COMMON_OPTIMIZER_KEYS = ("type", "lr", "clip_norm")


def default_optimizer_config(group: str) -> dict:
    """The reference's default optimizer settings for ``group`` (a fresh, mutable copy)."""
    if group not in _DEFAULT_OPTIMIZERS:
        raise ValueError(f"unknown optimizer group {group!r}; expected one of {OPT_GROUPS}")
    return copy.deepcopy(_DEFAULT_OPTIMIZERS[group])


def _check_bool(s: dict, name: str, *keys: str) -> None:
    for k in keys:
        if k in s:
            _check(isinstance(s[k], bool), name, k, "a bool", s[k])


# ----------------------------------------------------------------------------------------------
# torch-semantics pieces optax does not have


class TorchAmsgradState(NamedTuple):
    count: jax.Array
    mu: PyTree
    nu: PyTree
    nu_max: PyTree


def scale_by_torch_amsgrad(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """torch Adam(amsgrad=True) direction: max over *raw* second moments, then bias correction."""

    def init(params):
        z = lambda: jax.tree.map(jnp.zeros_like, params)
        return TorchAmsgradState(jnp.zeros([], jnp.int32), z(), z(), z())

    def update(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu)
        count = optax.safe_increment(state.count)
        bc1 = 1 - b1 ** count.astype(jnp.float32)
        bc2 = 1 - b2 ** count.astype(jnp.float32)
        out = jax.tree.map(lambda m, v: (m / bc1) / (jnp.sqrt(v) / jnp.sqrt(bc2) + eps), mu, nu_max)
        return out, TorchAmsgradState(count, mu, nu, nu_max)

    return optax.GradientTransformation(init, update)


class TorchMomentumState(NamedTuple):
    count: jax.Array
    buf: PyTree


def torch_momentum(momentum: float, dampening: float,
                   nesterov: bool) -> optax.GradientTransformation:
    """torch SGD momentum with dampening: buf = g on the first step, then m*buf + (1-d)*g.

    (optax.trace equals this when dampening is 0 and is used then.)
    """

    def init(params):
        return TorchMomentumState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        del params
        first = state.count == 0
        buf = jax.tree.map(lambda b, g: jnp.where(first, g, momentum * b + (1 - dampening) * g),
                           state.buf, updates)
        out = jax.tree.map(lambda g, b: g + momentum * b, updates, buf) if nesterov else buf
        return out, TorchMomentumState(optax.safe_increment(state.count), buf)

    return optax.GradientTransformation(init, update)


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """torch ``clip_grad_norm_``: ``g * min(1, max_norm / (||g|| + 1e-6))`` over the whole tree."""

    def update(updates, state, params=None):
        del params
        coef = jnp.minimum(max_norm / (optax.tree.norm(updates) + 1e-6), 1.0)
        return jax.tree.map(lambda g: g * coef.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


# ----------------------------------------------------------------------------------------------
# optimizers


def _validate_optimizer(s: dict, name: str) -> None:
    kind = s["type"]
    _check(isinstance(s["lr"], (int, float)) and s["lr"] > 0, name, "lr", "> 0", s["lr"])
    if "betas" in s:
        betas = tuple(s["betas"])
        _check(len(betas) == 2, name, "betas", "2 values", s["betas"])
        for i, b in enumerate(betas):
            _check(0 <= b < 1, name, f"betas[{i}]", "in [0, 1)", b)
    if "weight_decay" in s:
        _check(s["weight_decay"] >= 0, name, "weight_decay", ">= 0", s["weight_decay"])
    if "eps" in s:
        _check(s["eps"] > 0, name, "eps", "> 0", s["eps"])
    if "momentum" in s:
        _check(0 <= s["momentum"] < 1, name, "momentum", "in [0, 1)", s["momentum"])
    if "alpha" in s:
        _check(0 < s["alpha"] <= 1, name, "alpha", "in (0, 1]", s["alpha"])
    if "dampening" in s:
        _check(0 <= s["dampening"] <= 1, name, "dampening", "in [0, 1]", s["dampening"])
    _check_bool(s, name, "amsgrad", "nesterov", "centered", "decoupled_weight_decay")
    if kind == "SGD" and s["nesterov"]:  # torch raises the same
        _check(s["momentum"] > 0 and s["dampening"] == 0, name, "nesterov",
               "used with momentum > 0 and dampening 0", s["nesterov"])
    clip = s.get("clip_norm")
    _check(clip is None or (isinstance(clip, (int, float)) and clip >= 0), name, "clip_norm",
           "None or >= 0", clip)


def _torch_rule(s: dict) -> Callable[..., optax.GradientTransformation]:
    """Factory (learning_rate, lr_scale) -> chain for inject_hyperparams."""
    kind, lr0 = s["type"], float(s["lr"])

    def factory(learning_rate, lr_scale):
        lr = learning_rate * lr_scale
        wd = s.get("weight_decay", 0.0)
        if kind == "Lion":
            b1, b2 = s["betas"]
            decay = wd / lr0 if s["decoupled_weight_decay"] else wd
            return optax.lion(lr, b1, b2, weight_decay=decay)
        parts = []
        if kind in ("Adam", "AdamW"):
            b1, b2 = s["betas"]
            if kind == "Adam" and wd:
                parts.append(optax.add_decayed_weights(wd))  # L2-coupled
            parts.append(scale_by_torch_amsgrad(b1, b2, s["eps"]) if s["amsgrad"]
                         else optax.scale_by_adam(b1, b2, s["eps"]))
            if kind == "AdamW" and wd:
                parts.append(optax.add_decayed_weights(wd))  # decoupled: -lr * wd * p
        elif kind == "SGD":
            if wd:
                parts.append(optax.add_decayed_weights(wd))
            if s["momentum"] > 0:
                parts.append(optax.trace(s["momentum"], s["nesterov"]) if s["dampening"] == 0
                             else torch_momentum(s["momentum"], s["dampening"], s["nesterov"]))
        elif kind == "RMSprop":
            if wd:
                parts.append(optax.add_decayed_weights(wd))
            rms = optax.scale_by_stddev if s["centered"] else optax.scale_by_rms
            parts.append(rms(s["alpha"], s["eps"], eps_in_sqrt=False))
            if s["momentum"] > 0:
                parts.append(optax.trace(s["momentum"]))
        parts.append(optax.scale_by_learning_rate(lr))
        return optax.chain(*parts)

    return factory


def _group_of(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def make_optimizer(opt_cfg: Mapping | None, sched_cfg: Mapping | None, total_steps: int, *,
                   name: str = "optimizers.vae") -> optax.GradientTransformation:
    """One model group's chain: [torch-style global-norm clipping] + torch-semantics optimizer.

    ``opt_cfg`` uses the reference keys (``type`` default AdamW, ``lr`` default 1e-4 as the
    reference's create_optimizer) plus ``clip_norm`` (missing: 1.0 for the ``vae``/``flow`` groups,
    as the reference's trainers clip only those, else off; None/0 = off). ``name`` is the config
    path used in error messages; its last component picks the clipping default. The schedule
    (``make_schedule``) drives ``learning_rate``; ``lr_scale`` starts at 1.
    """
    cfg = {} if opt_cfg is None else {k: opt_cfg[k] for k in opt_cfg}
    kind = cfg.get("type") or "AdamW"
    if kind not in _OPTIMIZER_KEYS:
        raise ValueError(f"{name}.type: unsupported optimizer {kind!r}; "
                         f"supported: {sorted(_OPTIMIZER_KEYS)}")
    s = _settings(cfg, _OPTIMIZER_KEYS[kind], _COMMON_OPTIMIZER_KEYS, name, kind)
    s["type"] = kind
    s.setdefault("lr", 1e-4)
    if "clip_norm" not in cfg:
        s["clip_norm"] = _DEFAULT_OPTIMIZERS.get(_group_of(name), {}).get("clip_norm")
    _validate_optimizer(s, name)
    # The schedule's errors name its own key: stages.x.optimizers.vae -> stages.x.schedulers.vae.
    head, sep, tail = name.rpartition("optimizers")
    sched_name = head + "schedulers" + tail if sep else name
    schedule = make_schedule(sched_cfg, float(s["lr"]), total_steps, name=sched_name)
    tx = optax.inject_hyperparams(_torch_rule(s))(learning_rate=schedule, lr_scale=1.0)
    if s.get("clip_norm"):
        tx = optax.chain(clip_by_global_norm_torch(float(s["clip_norm"])), tx)
    return tx


# ----------------------------------------------------------------------------------------------
# groups, accumulation, lr access, EMA


def param_labels(params: Mapping, mapping: Mapping[str, str]) -> PyTree:
    """Label tree for ``make_partitioned``: every leaf under top-level entry k gets mapping[k]."""
    missing = [k for k in params if k not in mapping]
    if missing:
        raise ValueError(f"params entries {missing} are not covered by any optimizer group "
                         f"(group mapping covers {sorted(mapping)})")
    return {k: jax.tree.map(lambda _, lab=mapping[k]: lab, v) for k, v in params.items()}


def make_partitioned(txs: Mapping[str, optax.GradientTransformation | None],
                     labels: PyTree) -> optax.GradientTransformation:
    """Combine per-group chains over a label tree; a group mapped to None is frozen.

    Frozen groups get ``optax.set_to_zero()``: zero updates (params stay bit-identical) and no
    optimizer state.
    """
    if not callable(labels):
        used = set(jax.tree.leaves(labels))
        unknown = sorted(used - set(txs))
        if unknown:
            raise ValueError(f"param labels {unknown} have no optimizer (groups: {sorted(txs)})")
    transforms = {k: optax.set_to_zero() if v is None else v for k, v in txs.items()}
    return optax.transforms.partition(transforms, labels)


def with_accumulation(tx: optax.GradientTransformation,
                      every_k: int) -> optax.GradientTransformation:
    """Real gradient accumulation: average ``every_k`` micro-batch gradients, then one update.

    Updates are zero on the other micro-steps; the schedule counts optimizer updates only.
    """
    if not (isinstance(every_k, int) and every_k >= 1):
        raise ValueError(f"gradient accumulation every_k must be an int >= 1, got {every_k!r}")
    if every_k == 1:
        return tx
    return optax.MultiSteps(tx, every_k_schedule=every_k).gradient_transformation()


_INJECT = (optax.InjectStatefulHyperparamsState, optax.InjectHyperparamsState)


def _map_inject(state: Any, fn: Callable[[Any, str | None], Any], label: str | None) -> Any:
    """Rebuild ``state`` with fn applied to every lr-carrying inject_hyperparams state."""
    if isinstance(state, _INJECT) and "learning_rate" in state.hyperparams:
        return fn(state, label)
    if isinstance(state, optax.transforms.PartitionState):
        return type(state)({k: _map_inject(v, fn, k) for k, v in state.inner_states.items()})
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(_map_inject(v, fn, label) for v in state))
    if isinstance(state, (tuple, list)):
        return type(state)(_map_inject(v, fn, label) for v in state)
    if isinstance(state, dict):
        return {k: _map_inject(v, fn, label) for k, v in state.items()}
    return state


def learning_rates(opt_state: Any) -> dict[str, jax.Array]:
    """Effective lr per group (``learning_rate * lr_scale``), found in any partition/MultiSteps.

    The value is the one the last update used (before the first update: the one it will use).
    A state that is not partitioned reports under the key ``"default"``.
    """
    out: dict[str, jax.Array] = {}

    def grab(s, label):
        h = s.hyperparams
        out[label or "default"] = h["learning_rate"] * h.get("lr_scale", 1.0)
        return s

    _map_inject(opt_state, grab, None)
    return out


def set_lr_scale(opt_state: Any, scale: float, group: str | None = None) -> Any:
    """Return ``opt_state`` with ``lr_scale`` set (in every group, or only ``group``)."""
    found = []

    def put(s, label):
        if group is not None and label != group:
            return s
        old = s.hyperparams["lr_scale"]
        found.append(label)
        h = dict(s.hyperparams, lr_scale=jnp.asarray(scale, dtype=jnp.asarray(old).dtype))
        return s._replace(hyperparams=h)

    new = _map_inject(opt_state, put, None)
    if not found:
        raise ValueError(f"no optimizer group {group!r} with an lr_scale in this state")
    return new


def ema_update(ema: PyTree, params: PyTree, decay: float, step: jax.Array | None = None,
               warmup: bool = False) -> PyTree:
    """``s = d*s + (1-d)*p`` on floating leaves (others copied from params), as the reference.

    ``warmup=True`` uses ``d = min(decay, (1+step)/(10+step))`` so early averages are not dominated
    by the initial weights (the reference has no warm-up).
    """
    d = jnp.asarray(decay, jnp.float32)
    if warmup:
        if step is None:
            raise ValueError("ema_update(warmup=True) needs step")
        s = jnp.asarray(step, jnp.float32)
        d = jnp.minimum(d, (1.0 + s) / (10.0 + s))

    def upd(e, p):
        if not jnp.issubdtype(jnp.asarray(p).dtype, jnp.inexact):
            return p
        dd = d.astype(e.dtype)
        return dd * e + (1 - dd) * p.astype(e.dtype)

    return jax.tree.map(upd, ema, params)
