"""Pieces every step function shares: loss settings, per-step keys, the guarded update (NaN
policy), EMA, metrics and the jit wrapper with explicit shardings and a donated state.

NaN policy: a step whose loss or any gradient is not finite changes nothing but
``state.nonfinite`` (+1) and ``state.step`` (which advances as usual, so the next step gets a fresh
key and the data order stays in step with the counter). Params, optimizer state (including an
accumulation ``MultiSteps`` counter), EMA, spectral stats and loss windows stay bit-identical.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fluxflow_jax import losses, optim, sharding, xla
from fluxflow_jax.state import TrainState, step_params

# What a stage's ``train`` flags and EMA settings tell a step (set by the loop, not the loss block),
# beside the loss schema (``losses.LOSS_SCHEMA``: the user-settable keys, defaults and rules).
STEP_FLAGS: dict[str, Any] = {
    "train_reconstruction": True, "use_gan": False, "use_spade": True, "use_lpips": False,
    "train_text_encoder": False, "ema_decay": 0.0, "ema_warmup": False,
}
LOSS_DEFAULTS: dict[str, Any] = {**STEP_FLAGS, **losses.loss_defaults()}

# Logged by every step (``finish``): the non-finite counter (per-kind skip flags are added there).
COMMON_METRICS = ("train/nonfinite",)

# Distinct streams per step kind: the D and G steps of one iteration share state.step.
KIND_IDS = {"vae": 1, "disc": 2, "flow": 3}


def loss_settings(loss_cfg: Mapping[str, Any] | None, key: str = "loss") -> dict:
    """``loss_cfg`` (loss-schema keys and step flags) with defaults filled; a bad key or value
    raises ValueError naming ``config.<key>.<name>``."""
    cfg = {} if loss_cfg is None else {k: loss_cfg[k] for k in loss_cfg}
    schema_part = {k: v for k, v in cfg.items() if k not in STEP_FLAGS}
    errs = losses.loss_errors(schema_part, prefix=f"config.{key}")
    if not 0.0 <= float(cfg.get("ema_decay", 0.0)) < 1.0:
        errs.append(f"config.{key}.ema_decay: must be in [0, 1), got {cfg['ema_decay']!r}")
    if errs:
        raise ValueError("; ".join(errs))
    out = dict(LOSS_DEFAULTS)
    out.update(cfg)
    return out


def step_key(rng: jax.Array, step: jax.Array, kind: str) -> jax.Array:
    """``fold_in(fold_in(rng, step), kind)``; ``rng`` may be a typed key or raw key data."""
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)
    return jax.random.fold_in(jax.random.fold_in(rng, step), KIND_IDS[kind])


def tree_finite(tree: Any) -> jax.Array:
    """True when every floating leaf of ``tree`` is finite (scalar bool)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def select(ok: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``ok`` else ``old``, leaf by leaf (structures must match)."""
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def zeros_like_tree(tree: Any) -> Any:
    return jax.tree.map(jnp.zeros_like, tree)


def trained_names(kind: str, params: Mapping[str, Any], frozen: Collection[str]) -> tuple[str, ...]:
    """Models step ``kind`` differentiates: its group minus ``frozen``."""
    return tuple(n for n in step_params(kind, params) if n not in set(frozen))


def check_opt_state(state: TrainState, kind: str) -> None:
    if kind not in state.opt_state:
        raise ValueError(f"state.opt_state has no {kind!r} entry (has {sorted(state.opt_state)}); "
                         f"create the state with txs[{kind!r}]")


def apply_grads(tx: optax.GradientTransformation, kind: str, state: TrainState,
                grads: Mapping[str, Any], trained: Collection[str], ok: jax.Array
                ) -> tuple[dict, Any]:
    """One optimizer update of ``step_params(kind)``, skipped (old values) unless ``ok``.

    ``grads`` holds the trained models; the other models of the group get zero gradients and
    are copied unchanged (bit-identical) whatever the optimizer does with zeros.
    """
    sub = step_params(kind, state.params)
    full = {n: grads[n] if n in trained else zeros_like_tree(sub[n]) for n in sub}
    opt_state = state.opt_state[kind]
    updates, new_opt = tx.update(full, opt_state, sub)
    new_sub = optax.apply_updates(sub, updates)
    new_sub = {n: (new_sub[n] if n in trained else sub[n]) for n in sub}
    new_params = dict(state.params)
    new_params.update(select(ok, new_sub, sub))
    return new_params, select(ok, new_opt, opt_state)


def update_ema(state: TrainState, new_params: Mapping[str, Any], trained: Collection[str],
               cfg: Mapping[str, Any], ok: jax.Array) -> dict:
    """EMA ``s = d s + (1 - d) p`` of the trained models that have an EMA copy (when ``ok``)."""
    decay = float(cfg["ema_decay"])
    if decay <= 0 or not state.ema:
        return state.ema
    ema = dict(state.ema)
    for n in trained:
        if n in ema:
            new = optim.ema_update(ema[n], new_params[n], decay, step=state.step,
                                   warmup=bool(cfg["ema_warmup"]))
            ema[n] = select(ok, new, ema[n])
    return ema


def grad_norms(grads: Mapping[str, Any], groups: Mapping[str, Collection[str]]) -> dict:
    """``train/grad_norm_<label>``: global L2 norm (before clipping) over the named models."""
    out = {}
    for label, names in groups.items():
        sub = [grads[n] for n in names if n in grads]
        if sub:
            out[f"train/grad_norm_{label}"] = optax.tree.norm(sub)
    return out


def lr_metrics(opt_state: Any, kind: str) -> dict:
    """``learning/lr_<group>`` for every lr-carrying group of the optimizer state."""
    return {f"learning/lr_{kind if g == 'default' else g}": jnp.asarray(v, jnp.float32)
            for g, v in optim.learning_rates(opt_state).items()}


def finish(state: TrainState, kind: str, ok: jax.Array, advance: bool, metrics: dict,
           **changes: Any) -> tuple[TrainState, dict]:
    """New state (step/nonfinite bookkeeping) and the float32 metrics dict."""
    nonfinite = state.nonfinite + jnp.where(ok, 0, 1).astype(jnp.int32)
    new = state.replace(step=state.step + (1 if advance else 0), nonfinite=nonfinite, **changes)
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    metrics["train/nonfinite"] = nonfinite.astype(jnp.float32)
    metrics[f"train/skipped_{kind}"] = jnp.where(ok, 0.0, 1.0)
    metrics.update(lr_metrics(new.opt_state[kind], kind))
    return new, metrics


def latent_grid(downscales: int, image_hw: tuple[int, int], what: str = "image") -> tuple[int, int]:
    f = 2 ** downscales
    h, w = int(image_hw[0]), int(image_hw[1])
    if h % f or w % f or h <= 0 or w <= 0:
        raise ValueError(f"{what} size {h}x{w} must be a positive multiple of 2**downscales = {f}")
    return h // f, w // f


def require(batch: Mapping[str, Any], keys: Collection[str], step: str) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"{step}: batch lacks {missing} (has {sorted(batch)})")


def make_jitted(fn: Callable, mesh: Mesh, state_sharding: Any, extra: Any = None) -> Callable:
    """``jax.jit`` of ``fn(state, batch, rng[, extra])`` with explicit shardings.

    State: ``state_sharding`` in and out, donated. Batch: leading dim over the data axes. rng,
    ``extra`` (frozen constants such as LPIPS weights) and metrics: replicated. On CPU a step
    with large convolutions times both convolution libraries at its first call and keeps the
    faster (``xla.jit(measure=True)``): it runs thousands of times. The returned
    callable takes ``(state, batch, rng)``; ``.lower(state, batch, rng)`` exposes compilation
    (benchmarks) and ``.jitted`` the underlying jitted function.
    """
    repl = NamedSharding(mesh, P())
    data = sharding.batch_sharding(mesh)
    if extra is None:
        jitted = xla.jit(fn, in_shardings=(state_sharding, data, repl),
                         out_shardings=(state_sharding, repl), donate_argnums=(0,), measure=True)

        def step(state, batch, rng):
            return jitted(state, batch, rng)

        step.lower = lambda state, batch, rng: jitted.lower(state, batch, rng)
    else:
        extra = jax.device_put(extra, repl)
        jitted = xla.jit(fn, in_shardings=(state_sharding, data, repl, repl),
                         out_shardings=(state_sharding, repl), donate_argnums=(0,), measure=True)

        def step(state, batch, rng):
            return jitted(state, batch, rng, extra)

        step.lower = lambda state, batch, rng: jitted.lower(state, batch, rng, extra)
    step.jitted = jitted
    return step
