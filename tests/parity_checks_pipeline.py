"""The reference's FluxPipeline (compressor -> flow -> expander) against its fixture.

The reference's ``FluxPipeline`` sets ``flow_processor.ctx_tokens = expander.ctx_tokens =
compressor.downscales`` (3 in the fixture; a bare processor has 4). The check goes the way a user
goes: the fixture's weights are written as a reference ``flxflow_final.safetensors``, loaded by
``interop.load_any`` with the run's ``config.model`` (what ``init_from`` does), and run through the
modules ``models.registry`` builds from that config.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from parity_utils import assert_close_ref, load_case, nchw_to_nhwc, nhwc_to_nchw
from safetensors.numpy import save_file

from fluxflow_jax import interop
from fluxflow_jax.models import registry


def model_config_for(kwargs: dict) -> dict:
    """The ``config.model`` section a run training this pipeline would have."""
    c, f, e = kwargs["compressor"], kwargs["flow_processor"], kwargs["expander"]
    return {"vae_dim": c["d_model"], "downscales": c["downscales"], "upscales": e["upscales"],
            "vae_attn_layers": c["attn_layers"], "vae_attn_heads": c["attn_heads"],
            "flow_dim": f["d_model"], "flow_layers": f["n_layers"], "flow_heads": f["n_head"],
            "text_embedding_dim": f["embedding_size"], "max_hw": f.get("max_hw", 1024)}


def check_pipeline(case: Path) -> None:
    cfg, io, weights = load_case(case)
    kw = cfg["kwargs"]
    model_cfg = model_config_for(kw)
    with tempfile.TemporaryDirectory() as d:
        save_file({"diffuser." + k: v for k, v in weights.items()},
                  str(Path(d) / "flxflow_final.safetensors"))
        loaded = interop.load_any(d, model_cfg=model_cfg)
    assert sorted(loaded) == ["compressor", "expander", "flow"], sorted(loaded)
    k = kw["ctx_tokens_set_by_pipeline"]
    for name in ("flow", "expander"):
        assert loaded[name][1]["ctx_tokens"] == k, f"import: {name} ctx_tokens != {k}"
    models = registry.build_models(model_cfg, {"compressor", "flow", "expander"})
    assert models.flow.ctx_tokens == models.expander.ctx_tokens == k
    assert models.compressor.attn_heads == loaded["compressor"][1]["attn_heads"]

    img = jnp.asarray(nchw_to_nhwc(io["image"]))
    packed, _, _ = models.compressor.apply(loaded["compressor"][0], img, sample=False)  # z = mu
    assert_close_ref(packed, io["packed"], f"{case.name}/packed")
    emb, t = jnp.asarray(io["text_embeddings"]), jnp.asarray(io["timesteps"])
    flow_out = models.flow.apply(loaded["flow"][0], jnp.asarray(io["packed"]), emb, t)
    assert_close_ref(flow_out, io["flow_out"], f"{case.name}/flow_out")
    image_out = models.expander.apply(loaded["expander"][0], jnp.asarray(io["flow_out"]))
    assert_close_ref(nhwc_to_nchw(image_out), io["image_out"], f"{case.name}/image_out")

    # The case does tell ctx_tokens apart: a bare processor's default (4) misses the reference.
    bare = models.flow.clone(ctx_tokens=4).apply(loaded["flow"][0], jnp.asarray(io["packed"]),
                                                 emb, t)
    err = float(np.max(np.abs(np.asarray(bare) - io["flow_out"])))
    assert err > 1e-2 * max(1.0, float(np.max(np.abs(io["flow_out"])))), err


CHECKS = {"FluxPipeline": check_pipeline}
