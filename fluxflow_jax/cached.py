"""Flow stages from cached latents: the frozen VAE (and a frozen text encoder) run once per sample.

A flow stage with ``latent_cache=True`` encodes its dataset with the stage's starting compressor
(posterior mean, so training sees exactly what a deterministic encoder gives) into
``W/cache/<dataset>-<fingerprint>/`` on first use, then trains from it. The fingerprint covers the
dataset's content and the encoder weights (``data.find_latent_cache``), so a changed dataset or
another VAE builds a new cache instead of feeding stale latents. Latents are stored as grids
``[h, w, d]``: the flow step rebuilds the size token from their static shape, so non-square
buckets work. A frozen text encoder's embeddings are cached too (``text_emb``); a trained one
reads the token ids the cache carries.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fluxflow_jax import data as data_lib
from fluxflow_jax import xla
from fluxflow_jax.models.registry import ModelSet


def encoder_fingerprint(params: Mapping[str, Any], module_configs: Mapping[str, Any]) -> str:
    """Hash of the encoders' weights and configs (what the cached values depend on)."""
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(f"{name}:{sorted(module_configs.get(name, {}).items())}".encode())
        for path, x in sorted(jax.tree_util.tree_flatten_with_path(params[name])[0],
                              key=lambda kv: jax.tree_util.keystr(kv[0])):
            a = np.asarray(x)
            h.update(jax.tree_util.keystr(path).encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()[:16]


def encode_fns(models: ModelSet, params: Mapping[str, Any], cache_text: bool):
    """``(encode_image_fn, encode_text_fn)`` for ``data.build_latent_cache``."""
    comp = models.compressor
    pc = params["compressor"]

    @xla.jit
    def _encode(img):
        packed, _, _ = comp.apply({"params": pc}, img, sample=False)
        return packed[:, :-1]

    def encode_image(images: np.ndarray) -> np.ndarray:
        b, hh, ww, _ = images.shape
        f = 2 ** comp.downscales
        return np.asarray(_encode(images)).reshape(b, hh // f, ww // f, -1)

    def encode_text(ids: np.ndarray, mask: np.ndarray) -> dict:
        if not cache_text:
            return {}
        te = models.text_encoder
        emb = jax.jit(lambda i, m: te.apply({"params": params["text_encoder"]}, i, m,
                                            deterministic=True))(ids, mask)
        return {"text_emb": np.asarray(emb, np.float32)}

    return encode_image, encode_text


def cached_dataset(config: Mapping, ds_name: str, models: ModelSet, params: Mapping[str, Any],
                   module_configs: Mapping[str, Any], workdir: Path, *, cache_text: bool,
                   tokenizer: Any) -> dict:
    """The ``{'type': 'cache', 'path': ...}`` dataset config of a stage, building it if needed."""
    # tokenised at the run's length, as the image loader does
    ds_cfg = {**config.datasets[ds_name].to_dict(), "max_length": int(config.max_length)}
    enc = {"compressor": params["compressor"]}
    if cache_text:
        enc["text_encoder"] = params["text_encoder"]
    fp = encoder_fingerprint(enc, module_configs)
    path = Path(workdir) / "cache" / f"{ds_name}-{fp}"
    if data_lib.find_latent_cache(path, ds_cfg, fp, name=ds_name) is None:
        if jax.process_index() == 0:
            print(f"[cache] encoding datasets.{ds_name} with the frozen VAE into {path}",
                  flush=True)
            image_fn, text_fn = encode_fns(models, params, cache_text)
            data_lib.build_latent_cache(ds_cfg, image_fn, text_fn, path, encoder_fingerprint=fp,
                                        tokenizer=tokenizer, name=ds_name, overwrite=True,
                                        batch_size=16)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("latent cache built")
    return {"type": "cache", "path": str(path)}
