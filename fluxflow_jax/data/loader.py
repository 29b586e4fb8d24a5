"""``make_loader``: one entry point for every dataset type.

The training loop sees a single protocol, whatever the source:

* ``next(loader)`` -> host-local batch ``{'image': float32 [B_local, H, W, 3] in [-1, 1],
  'input_ids': int32 [B_local, L], 'attention_mask': int32 [B_local, L]}`` (a latent cache
  yields its stored arrays instead of 'image'); ``B_local = global_batch_size // process_count``;
  H and W are multiples of 16 and shared by the batch; infinite over epochs.
* ``loader.epoch``, ``loader.position``, ``loader.epoch_length`` (batches per epoch; None for a
  stream without ``num_samples``).
* ``loader.get_state()`` -> JSON-serialisable dict; ``loader.set_state(state)`` makes the loader
  yield exactly the batches an uninterrupted loader would yield next.
* ``loader.stats()`` -> counters for metrics (skipped samples per reason, ...).
* ``loader.close()`` stops the worker threads.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from PIL import ImageFile

from fluxflow_jax.data.cache import CacheLoader
from fluxflow_jax.data.config import (MAP_TYPES, MIN_SIZE, content_fingerprint, dataset_name,
                                      resolve, to_plain)
from fluxflow_jax.data.map_loader import make_map_loader
from fluxflow_jax.data.secrets import redact
from fluxflow_jax.data.webdataset_loader import StreamLoader, expand_urls

log = logging.getLogger("fluxflow_jax.data")


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return int(process_index), int(process_count)


def make_loader(ds_cfg: Mapping, *, global_batch_size: int, seed: int, tokenizer,
                process_index: int | None = None, process_count: int | None = None,
                name: str = "train", max_length: int | None = None,
                min_size: int | None = None):
    """Loader for one dataset config (see the module docstring for the protocol).

    ``process_index``/``process_count`` default to ``jax.process_index()/process_count()``;
    pass them explicitly to simulate hosts. ``name`` is the dataset's name in
    ``config.datasets`` (``'train'`` or ``'datasets.train'``) and appears in every error message
    and log line. ``max_length`` (the run's token length) overrides the dataset's own.
    ``min_size`` (e.g. the model's total downscale factor) raises the dataset's ``min_size``
    floor when larger: an image smaller than that cannot survive the encoder.
    """
    name = dataset_name(name)
    plain = to_plain(ds_cfg)
    if max_length is not None and isinstance(plain, dict):
        plain = {**plain, "max_length": int(max_length)}
    if min_size is not None and isinstance(plain, dict):
        plain = {**plain, "min_size": max(int(min_size), plain.get("min_size", MIN_SIZE))}
    cfg = resolve(plain, name)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # process-global and set by many scripts "to stop PIL errors": it turns damaged files
        # into silently grey-padded training samples instead of counted skips
        log.warning("datasets.%s: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process: "
                    "truncated images are decoded padded with grey instead of being skipped as "
                    "truncated_image; set it to False", name)
    pi, pc = _process_info(process_index, process_count)
    typ = cfg["type"]
    if typ in MAP_TYPES:
        return make_map_loader(cfg, name=name, global_batch_size=global_batch_size, seed=seed,
                               tokenizer=tokenizer, process_index=pi, process_count=pc)
    if typ == "webdataset":
        # redacted: a rotated token (or a different mirror's credentials) is the same data
        fp = content_fingerprint(cfg, [os.path.basename(redact(u).split("?")[0])
                                       for u in expand_urls(cfg["urls"])])
        return StreamLoader(cfg, name=name, global_batch_size=global_batch_size, seed=seed,
                            tokenizer=tokenizer, process_index=pi, process_count=pc,
                            fingerprint=fp)
    if typ == "cache":
        return CacheLoader(cfg, name=name, global_batch_size=global_batch_size, seed=seed,
                           process_index=pi, process_count=pc)
    raise AssertionError(typ)  # resolve() already rejected unknown types
