"""Jitted training steps: pure functions ``step(state, batch, rng) -> (state, metrics)``.

* :func:`make_vae_step` - compressor + expander (reconstruction and/or GAN-generator terms);
* :func:`make_disc_step` - the patch discriminator (hinge + lazy R1);
* :func:`make_flow_step` - the flow model (+ optionally the text encoder) on frozen-VAE latents.

Each is ``jax.jit`` with explicit ``in_shardings``/``out_shardings`` over a ``Mesh`` and the
state donated; per-step randomness is ``fold_in(fold_in(rng, state.step), kind)``. One iteration
of a stage runs its kinds in the order disc -> vae -> flow on the same batch; exactly one of them
advances ``state.step`` (by default the flow step if the run has a flow model, else the VAE step;
override with ``advance_step=``). See ``common`` for the NaN policy.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jax.sharding import Mesh

from fluxflow_jax import sharding
from fluxflow_jax.models.registry import ModelSet
from fluxflow_jax.state import TrainState, create_train_state, step_params
from fluxflow_jax.steps.common import LOSS_DEFAULTS, loss_settings
from fluxflow_jax.steps.disc import make_disc_step
from fluxflow_jax.steps.flow import make_flow_step
from fluxflow_jax.steps.vae import make_vae_step

__all__ = [
    "LOSS_DEFAULTS",
    "TrainState",
    "loss_settings",
    "make_disc_step",
    "make_flow_step",
    "make_train_state",
    "make_vae_step",
    "state_shardings",
    "step_params",
]


def make_train_state(models: ModelSet, params: Mapping[str, Any], spectral: Mapping | None,
                     txs: Mapping[str, Any], ema: bool) -> TrainState:
    """Initial state for ``models``: opt states for ``txs`` ('vae'/'disc'/'flow' -> tx), EMA
    copies of every model except the discriminator when ``ema``, adaptive-weight windows when
    the run has a compressor."""
    names = set(models.names())
    if set(params) != names:
        raise ValueError(f"params has models {sorted(params)}, the ModelSet built {sorted(names)}")
    ema_models = tuple(n for n in models.names() if n != "discriminator") if ema else ()
    return create_train_state(params, txs, spectral=spectral, ema_models=ema_models)


def state_shardings(abstract_state: Any, mesh: Mesh, rules=None) -> Any:
    """NamedShardings for every array of the state (regex rules on '/'-joined paths such as
    ``params/flow/...``, ``opt_state/vae/...``; default: replicate, or FSDP when the mesh has an
    ``fsdp`` axis). Accepts a concrete state or ``jax.eval_shape`` output."""
    return sharding.tree_shardings(abstract_state, mesh, rules)
