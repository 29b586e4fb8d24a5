"""FluxFlowProcessor against the PyTorch reference fixtures (component "FluxFlowProcessor").

A case holds ``weights.safetensors`` (the reference ``state_dict()``, keys without the
``flow_processor.`` prefix, ``rotary_pe.inv_freq`` included) and ``io.safetensors`` with
``packed [B, T+1, d]`` (HW token last), ``text_embeddings [B, E]``, float ``timesteps [B]`` in
[0, 1] and the reference ``out [B, T+1, d]``.
"""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from parity_utils import assert_close_ref, load_case

from fluxflow_jax.interop.flow import flow_from_torch, flow_to_torch, infer_flow_config
from fluxflow_jax.models.flow import FluxFlowProcessor, grid_from_hw_token


def check_flow_processor(case: pathlib.Path) -> None:
    cfg, io, weights = load_case(case)
    kw = cfg["kwargs"]
    inferred = infer_flow_config(weights)
    for key in ("d_model", "vae_dim", "embedding_size", "n_head", "n_layers"):
        assert inferred[key] == kw[key], f"{case.name}: inferred {key}={inferred[key]} vs {kw[key]}"
    config = {**inferred, **{k: kw[k] for k in ("max_hw", "ctx_tokens") if k in kw}}
    variables, _ = flow_from_torch(weights, config)
    model = FluxFlowProcessor(**config)
    packed = jnp.asarray(io["packed"])
    emb, t = jnp.asarray(io["text_embeddings"]), jnp.asarray(io["timesteps"])

    # Grid read from the HW token, as the reference does.
    out = model.apply(variables, packed, emb, t)
    assert_close_ref(out, io["out"], f"{case.name}: out (grid from HW token)")
    np.testing.assert_array_equal(np.asarray(out)[:, -1], io["packed"][:, -1],
                                  err_msg="HW token must pass through unchanged")

    # The same under jit with the grid given statically.
    grids = set(grid_from_hw_token(io["packed"][:, -1], config["max_hw"]))
    if len(grids) == 1:
        fwd = jax.jit(model.apply, static_argnames="hw")
        out_jit = fwd(variables, packed, emb, t, hw=grids.pop())
        assert_close_ref(out_jit, io["out"], f"{case.name}: out (jit, static hw)")

    # Export gives back the reference state dict exactly (inv_freq buffers included).
    sd = flow_to_torch(variables, config)
    assert sorted(sd) == sorted(weights), (
        f"{case.name}: exported keys differ: missing {sorted(set(weights) - set(sd))}, "
        f"extra {sorted(set(sd) - set(weights))}")
    for k, v in weights.items():
        assert sd[k].dtype == np.float32, f"{k}: exported dtype {sd[k].dtype}"
        np.testing.assert_array_equal(sd[k], v, err_msg=f"exported {k} differs from the reference")


CHECKS = {"FluxFlowProcessor": check_flow_processor}
