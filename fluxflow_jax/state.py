"""The run's train state: one ``flax.struct`` pytree that checkpoints, shards and donates as one.

What is *not* in it: the run's base PRNG key. Every step function takes it as its ``rng``
argument and derives the step's key as ``fold_in(rng, state.step)``, so the state holds no key
(the loop stores the key data in the checkpoint metadata). Static things (the modules, the optax
transformations) live in the step closures, never in the state.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp

from fluxflow_jax import losses

# The one table of models: model -> (optimizer group, step kind that differentiates it).
# Everything else is derived from it: the model names the registry builds, the optimizer groups a
# stage may configure, which params each jitted step updates and the labels of its optax partition.
MODELS: dict[str, tuple[str, str]] = {
    "compressor": ("vae", "vae"),
    "expander": ("vae", "vae"),
    "flow": ("flow", "flow"),
    "text_encoder": ("text_encoder", "flow"),
    "discriminator": ("discriminator", "disc"),
    # LoRA adapters of the flow model (lora.py): not a module of their own but a param tree merged
    # into the frozen flow kernels inside the flow step; their own group, so only they get state.
    "flow_lora": ("lora", "flow"),
}
MODEL_NAMES: tuple[str, ...] = tuple(MODELS)
OPT_GROUPS: tuple[str, ...] = tuple(dict.fromkeys(g for g, _ in MODELS.values()))
# Step kinds in the order one iteration runs them (D before G, as the reference does).
STEP_KINDS: tuple[str, ...] = ("disc", "vae", "flow")
# Which models each step kind differentiates (and hence what its optax state covers).
# The optax transformation for kind K is applied to ``step_params(K, params)``: a dict with the
# names below that the run has, e.g. {'compressor': ..., 'expander': ...} for 'vae'.
STEP_PARAM_GROUPS: dict[str, tuple[str, ...]] = {
    k: tuple(m for m, (_, kind) in MODELS.items() if kind == k) for k in STEP_KINDS}


def group_of(model: str) -> str:
    """The optimizer group that updates ``model``."""
    return MODELS[model][0]


def kind_of_group(group: str) -> str:
    """The step kind whose optimizer state holds ``group``."""
    return next(kind for g, kind in MODELS.values() if g == group)


# Per-loss running windows the adaptive VAE loss weights average over (reference FloatBuffer(100)).
ADAPTIVE_KEYS = ("recon", "kl", "gan")
ADAPTIVE_WINDOW = 100


@flax.struct.dataclass
class TrainState:
    """Everything a step changes.

    step: int32 scalar, the global step (spans pipeline stages; drives the KL warm-up, R1 interval
        and per-step RNG).
    params: model name -> params tree, only for the models the run has (``MODEL_NAMES``).
    opt_state: step kind ('vae' | 'disc' | 'flow') -> that step's optax state over
        ``step_params(kind, params)``.
    ema: model name -> EMA params ({} when EMA is off).
    spectral: the discriminator's 'spectral' collection (u/v power-iteration state), {} if none.
    loss_stats: running statistics the adaptive weights need: ``{'vae': losses.loss_history_init(
        ('recon', 'kl', 'gan'))}`` (100-value windows + push counts); {} when unused.
    nonfinite: int32 count of updates skipped because the loss or a gradient was not finite.
    """

    step: jax.Array
    params: dict
    opt_state: dict
    ema: dict
    spectral: dict
    loss_stats: dict
    nonfinite: jax.Array


def step_params(kind: str, params: Mapping[str, Any]) -> dict:
    """The sub-dict of ``params`` that step ``kind`` differentiates and its optimizer updates."""
    if kind not in STEP_PARAM_GROUPS:
        raise ValueError(f"unknown step kind {kind!r}; expected one of {tuple(STEP_PARAM_GROUPS)}")
    return {n: params[n] for n in STEP_PARAM_GROUPS[kind] if n in params}


def init_loss_stats(window: int = ADAPTIVE_WINDOW) -> dict:
    """Empty adaptive-weight windows of the VAE step (``losses.loss_history_init`` layout)."""
    return losses.loss_history_init(ADAPTIVE_KEYS, window)


def _copy(tree: Any) -> Any:
    # A real copy: EMA buffers must not alias the params they shadow, or donating the state
    # would hand XLA the same buffer twice.
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def create_train_state(params: Mapping[str, Any], txs: Mapping[str, Any], *,
                       spectral: Mapping[str, Any] | None = None,
                       ema_models: tuple[str, ...] = (),
                       adaptive_window: int | None = ADAPTIVE_WINDOW,
                       step: int = 0) -> TrainState:
    """Initial state: ``txs[kind].init(step_params(kind, params))`` for every kind given.

    ``txs`` maps step kinds to optax transformations (``None`` skips a kind). ``ema_models``
    names the models whose EMA copy is kept; ``adaptive_window=None`` stores no loss windows.
    """
    unknown = sorted(set(params) - set(MODEL_NAMES))
    if unknown:
        raise ValueError(f"params has unknown model name(s) {unknown}; expected {MODEL_NAMES}")
    opt_state = {}
    for kind, tx in txs.items():
        if tx is None:
            continue
        sub = step_params(kind, params)
        if not sub:
            raise ValueError(f"txs[{kind!r}] given but params has none of the models "
                             f"{STEP_PARAM_GROUPS[kind]} that step trains")
        opt_state[kind] = tx.init(sub)
    missing = sorted(set(ema_models) - set(params))
    if missing:
        raise ValueError(f"EMA requested for model(s) {missing} that params does not have")
    ema = {n: _copy(params[n]) for n in ema_models}
    loss_stats = {}
    if adaptive_window and "compressor" in params:
        loss_stats = {"vae": init_loss_stats(adaptive_window)}
    return TrainState(step=jnp.asarray(step, jnp.int32), params=dict(params),
                      opt_state=opt_state, ema=ema, spectral=dict(spectral or {}),
                      loss_stats=loss_stats, nonfinite=jnp.zeros((), jnp.int32))
