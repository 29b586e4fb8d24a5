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

from fluxflow_jax.state import TrainState, step_params
from fluxflow_jax.steps import disc, flow, vae
from fluxflow_jax.steps.common import LOSS_DEFAULTS, loss_settings
from fluxflow_jax.steps.disc import make_disc_step
from fluxflow_jax.steps.flow import make_flow_step
from fluxflow_jax.steps.vae import make_vae_step

# Metric names each step kind may log ('train/skipped_<kind>' besides).
METRICS: dict[str, tuple[str, ...]] = {
    "vae": vae.METRICS + ("train/skipped_vae",),
    "disc": disc.METRICS + ("train/skipped_disc",),
    "flow": flow.METRICS + ("train/skipped_flow",),
}

__all__ = [
    "LOSS_DEFAULTS",
    "METRICS",
    "TrainState",
    "loss_settings",
    "make_disc_step",
    "make_flow_step",
    "make_vae_step",
    "step_params",
]
