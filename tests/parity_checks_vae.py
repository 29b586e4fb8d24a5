"""Parity checks for the VAE (components FluxCompressor and FluxExpander).

Weights go through the interop layer (config inferred from the checkpoint, heads from the case's
kwargs since weights cannot reveal them; without them the import is refused), so a wrong key map or layout fails here as well.
"""
from pathlib import Path

import jax
import jax.numpy as jnp
from parity_utils import assert_close_ref, load_case, nchw_to_nhwc, nhwc_to_nchw

from fluxflow_jax.interop import vae as iv
from fluxflow_jax.models.vae import FluxCompressor, FluxExpander


def _inferred_matches_kwargs(cfg: dict, kwargs: dict, case: Path) -> None:
    ours = iv.config_from_reference_kwargs(kwargs)
    for k, v in ours.items():
        if k in cfg:
            assert cfg[k] == v, f"{case.name}: inferred {k}={cfg[k]}, case kwargs say {v}"


def check_compressor(case: Path) -> None:
    cfg, io, weights = load_case(case)
    kwargs = cfg["kwargs"]
    if kwargs.get("attn_layers"):  # heads are not in the weights: refused, never guessed
        try:
            iv.compressor_from_torch(weights)
        except iv.InteropError as e:
            assert "heads" in str(e) and "--config" in str(e), str(e)
        else:
            raise AssertionError(f"{case.name}: heads were guessed instead of asked for")
    conf = iv.infer_compressor_config(weights, overrides={"attn_heads": kwargs["attn_heads"]})
    variables, conf = iv.compressor_from_torch(weights, conf)
    _inferred_matches_kwargs(conf, kwargs, case)
    model = FluxCompressor(**conf)
    # The fixture zeroed the reparameterisation noise, i.e. z = mu: sample=False.
    img = jnp.asarray(nchw_to_nhwc(io["image"]))
    packed, mu, logvar = jax.jit(lambda v, x: model.apply(v, x, sample=False))(variables, img)
    assert_close_ref(nhwc_to_nchw(mu), io["mu"], f"{case.name}/mu")
    assert_close_ref(nhwc_to_nchw(logvar), io["logvar"], f"{case.name}/logvar")
    assert_close_ref(packed, io["packed"], f"{case.name}/packed")


def check_expander(case: Path) -> None:
    cfg, io, weights = load_case(case)
    variables, conf = iv.expander_from_torch(weights)
    _inferred_matches_kwargs(conf, cfg["kwargs"], case)
    model = FluxExpander(**conf)
    packed = jnp.asarray(io["packed"])  # the compressor case's packed output, HW token included
    for use_context, key in ((True, "image"), (False, "image_no_context")):
        # Eager: the latent grid is read from the HW token, as the reference does.
        img = model.apply(variables, packed, use_context=use_context)
        assert_close_ref(nhwc_to_nchw(img), io[key], f"{case.name}/{key}")
    # Jitted with a static grid: the form training uses.
    s = 2 ** conf["upscales"]
    hw = (io["image"].shape[2] // s, io["image"].shape[3] // s)
    img = jax.jit(lambda v, p: model.apply(v, p, hw=hw))(variables, packed)
    assert_close_ref(nhwc_to_nchw(img), io["image"], f"{case.name}/image (jit, hw={hw})")


CHECKS = {"FluxCompressor": check_compressor, "FluxExpander": check_expander}
