"""Parity checks for PatchDiscriminator and BertTextEncoder against the reference fixtures.

Each ``check_*(case)`` loads one fixture folder (see ``parity_utils``) and asserts; ``CHECKS``
maps the fixture's ``component`` name to its check for the lead's dispatcher.
"""
from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from fluxflow_jax.interop.discriminator import disc_from_torch, disc_to_torch
from fluxflow_jax.interop.text import text_from_torch, text_to_torch
from fluxflow_jax.models.discriminator import PatchDiscriminator
from fluxflow_jax.models.text import BertTextEncoder
from parity_utils import assert_close_ref, load_case, nchw_to_nhwc, nhwc_to_nchw

AFTER = "after_train_step."


def _assert_same_state_dict(ours: dict, ref: dict, what: str) -> None:
    assert set(ours) == set(ref), (f"{what}: missing {sorted(set(ref) - set(ours))}, "
                                   f"extra {sorted(set(ours) - set(ref))}")
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=f"{what}: {k}")


def check_discriminator(case: Path) -> None:
    """Eval logits (stored u/v), logits without ctx, pooled features, one train-mode forward."""
    cfg, io, weights = load_case(case)
    variables, config = disc_from_torch(weights)
    assert config == cfg["kwargs"], f"inferred {config} vs fixture kwargs {cfg['kwargs']}"
    _assert_same_state_dict(disc_to_torch(variables, config), weights, "discriminator export")

    model = PatchDiscriminator(**cfg["kwargs"])
    x, ctx = jnp.asarray(nchw_to_nhwc(io["image"])), jnp.asarray(io["ctx"])
    logits, mutated = model.apply(variables, x, ctx, mutable=["spectral"])
    assert_close_ref(nhwc_to_nchw(logits), io["logits"], "logits")
    _assert_same_state_dict(disc_to_torch({**variables, **mutated}), weights,
                            "eval mode must not change u/v")
    assert_close_ref(nhwc_to_nchw(model.apply(variables, x)), io["logits_no_ctx"],
                     "logits_no_ctx")
    feats, logits_f = model.apply(variables, x, ctx, return_feats=True)
    assert_close_ref(feats, io["feats"], "feats")
    assert_close_ref(nhwc_to_nchw(logits_f), io["logits"], "logits (return_feats)")

    logits_t, mutated = model.apply(variables, x, ctx, train=True, mutable=["spectral"])
    assert_close_ref(nhwc_to_nchw(logits_t), io["logits_train_mode"], "logits_train_mode")
    after = disc_to_torch({"params": variables["params"], "spectral": mutated["spectral"]})
    ref_uv = {k[len(AFTER):]: v for k, v in io.items() if k.startswith(AFTER)}
    assert ref_uv, f"{case}: no {AFTER}* tensors"
    for k, ref in ref_uv.items():
        assert_close_ref(after[k], ref, AFTER + k)


def check_text_encoder(case: Path) -> None:
    """Shrunken-DistilBERT BertTextEncoder on a padded batch with attention mask, eval mode."""
    cfg, io, weights = load_case(case)
    kw = dict(cfg["kwargs"])
    config = {"embed_dim": kw.pop("embed_dim"), **kw.pop("distilbert", {}), **kw}
    variables, full = text_from_torch(weights, config)
    _assert_same_state_dict(text_to_torch(variables, full), weights, "text encoder export")
    model = BertTextEncoder(**full)
    out = model.apply(variables, jnp.asarray(io["input_ids"]), jnp.asarray(io["attention_mask"]))
    assert_close_ref(out, io["out"], "out")


CHECKS = {
    "PatchDiscriminator": check_discriminator,
    "BertTextEncoder": check_text_encoder,
}
