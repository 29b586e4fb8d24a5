"""Latent / text-embedding cache: run the frozen encoders once, train flow stages from disk.

``build_latent_cache`` passes every usable sample of a map-style dataset once (center crop, no
flip, bucket by bucket) through ``encode_image_fn(images [B, H, W, 3] float32 in [-1, 1])`` and
``encode_text_fn(input_ids, attention_mask)`` (each returns an array or a dict of arrays with
leading dim B) and writes the results as safetensors shards plus ``manifest.json`` - no pickle.

The cache is keyed by a fingerprint of (dataset content config + source files, encoder
parameters): ``find_latent_cache`` returns it only when both match, so a changed dataset or a
retrained VAE can never silently feed stale latents. ``make_loader({'type': 'cache', 'path': ...})``
reads it with the same deterministic, resumable, host-split batching as images: batches carry the
stored arrays plus ``input_ids``/``attention_mask``.

A cache cannot represent random crops or flips; those augmentations are off in cached stages.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from fluxflow_jax.data.config import (MAP_TYPES, content_fingerprint, dataset_name, resolve,
                                      to_plain)
from fluxflow_jax.data.errors import BadSample, DataError, format_counts
from fluxflow_jax.data.map_loader import MapLoader, PlannedLoader, make_map_loader
from fluxflow_jax.data.sources import make_source
from fluxflow_jax.data.tokenizer import tokenize
from fluxflow_jax.data.transforms import to_float

log = logging.getLogger("fluxflow_jax.data")
MANIFEST = "manifest.json"
CACHE_VERSION = 1
_RESERVED = ("input_ids", "attention_mask", "index")


def params_fingerprint(tree: Any) -> str:
    """Hash of a parameter pytree (paths, dtypes, shapes, values): the encoder half of a cache
    key."""
    import jax

    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _combine(content_fp: str, encoder_fp: str) -> str:
    return hashlib.sha256(f"{content_fp}|{encoder_fp}".encode()).hexdigest()[:16]


def cache_fingerprint(ds_cfg: Mapping, encoder_fingerprint: str, *, name: str = "train") -> str:
    """Cache key of a dataset config (its content and source files) and encoder parameters."""
    cfg = resolve(ds_cfg, name)
    source = make_source(cfg, name)
    return _combine(content_fingerprint(cfg, source.fingerprint()), encoder_fingerprint)


def _as_dict(out: Any, default: str, n: int, what: str) -> dict[str, np.ndarray]:
    d = dict(out) if isinstance(out, Mapping) else {default: out}
    res = {}
    for k, v in d.items():
        a = np.asarray(v)
        if k in _RESERVED:
            raise ValueError(f"{what} output name {k!r} is reserved ({_RESERVED})")
        if a.ndim == 0 or a.shape[0] != n:
            raise ValueError(f"{what} output {k!r} has shape {a.shape}, expected leading dim {n}")
        res[k] = a
    return res


def build_latent_cache(loader_or_source, encode_image_fn: Callable, encode_text_fn: Callable,
                       path: str | os.PathLike, *, encoder_fingerprint: str, tokenizer=None,
                       batch_size: int = 32, shard_size: int = 2048, name: str = "train",
                       overwrite: bool = False) -> Path:
    """Encode every usable sample once and write the cache at ``path``; returns ``path``.

    ``loader_or_source``: a loader from ``make_loader`` over a map-style dataset, or a dataset
    config (then ``tokenizer`` is required). An existing cache with the same fingerprint is kept
    as is (idempotent); a different one is an error unless ``overwrite``. Written to a temporary
    directory and renamed at the end, so an interrupted build never looks complete.
    """
    loader = loader_or_source
    if isinstance(loader_or_source, Mapping) or hasattr(loader_or_source, "to_dict"):
        if tokenizer is None:
            raise ValueError("build_latent_cache: a dataset config needs tokenizer=")
        name = dataset_name(name)
        cfg = resolve(to_plain(loader_or_source), name)
        if cfg["type"] not in MAP_TYPES:
            raise TypeError("build_latent_cache: needs a map-style dataset (folder, jsonl, tfds, "
                            f"shapes), got type {cfg['type']!r}; pack streams with tfds_pack "
                            "first")
        loader = make_map_loader(cfg, name=name, global_batch_size=1, seed=0,
                                 tokenizer=tokenizer, process_index=0, process_count=1)
    if not isinstance(loader, MapLoader):
        raise TypeError("build_latent_cache: needs a map-style dataset (folder, jsonl, tfds, "
                        f"shapes), got {type(loader).__name__}; pack streams with tfds_pack first")
    fp = _combine(loader.fingerprint, encoder_fingerprint)
    path = Path(path)
    if (path / MANIFEST).is_file():
        old = json.loads((path / MANIFEST).read_text())
        if old.get("fingerprint") == fp:
            log.info("latent cache %s is up to date (fingerprint %s)", path, fp)
            return path
        if not overwrite:
            raise DataError(f"latent cache {path} exists with fingerprint {old.get('fingerprint')}"
                            f", expected {fp} (dataset or encoders changed); pass overwrite=True")
    if loader.cfg["crop"] == "random" or loader.cfg["flip"]:
        log.warning("datasets.%s: the latent cache stores center crops without flips; random "
                    "crop/flip are not applied to cached stages", loader.name)
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    max_length = loader.cfg["max_length"]
    skipped: Counter = Counter(loader.skipped())
    shards, n_total, arrays_meta = [], 0, {}

    def load(i: int, hw):
        try:
            return i, loader.load_sample(i, 0, hw, deterministic=True)
        except BadSample as e:
            return i, e

    def flush(hw, rows: dict[str, list]) -> None:
        nonlocal n_total
        from safetensors.numpy import save_file

        tensors = {k: np.ascontiguousarray(np.concatenate(v)) for k, v in rows.items()}
        count = int(tensors["index"].shape[0])
        fname = f"b{hw[0]}x{hw[1]}-{len(shards):05d}.safetensors"
        save_file(tensors, str(tmp / fname))
        shards.append({"file": fname, "bucket": [int(hw[0]), int(hw[1])], "count": count})
        for k, v in tensors.items():
            arrays_meta.setdefault(k, {"dtype": str(v.dtype), "shapes": {}})
            arrays_meta[k]["shapes"][f"{hw[0]}x{hw[1]}"] = list(v.shape[1:])
        n_total += count

    workers = max(1, loader.cfg["workers"])
    with ThreadPoolExecutor(workers) as ex:
        for hw, members in zip(loader.bucket_sizes, loader.members):
            rows: dict[str, list] = {}
            n_rows = 0
            for lo in range(0, len(members), batch_size):
                chunk = members[lo:lo + batch_size]
                got = list(ex.map(load, [int(i) for i in chunk], [hw] * len(chunk)))
                ok = [(i, r) for i, r in got if not isinstance(r, BadSample)]
                for i, r in got:
                    if isinstance(r, BadSample):
                        skipped[r.reason] += 1
                        log.warning("datasets.%s: skipped %s: %s", loader.name, loader.where(i),
                                    r.reason)
                if not ok:
                    continue
                images = to_float(np.stack([r[0] for _, r in ok]))
                ids, mask = tokenize(loader.tokenizer, [r[1] for _, r in ok], max_length)
                n = len(ok)
                outs = {**_as_dict(encode_image_fn(images), "latent", n, "encode_image_fn"),
                        **_as_dict(encode_text_fn(ids, mask), "text_embedding", n,
                                   "encode_text_fn")}
                outs.update(input_ids=ids, attention_mask=mask,
                            index=np.asarray([i for i, _ in ok], np.int64))
                for k, v in outs.items():
                    rows.setdefault(k, []).append(v)
                n_rows += n
                if n_rows >= shard_size:
                    flush(hw, rows)
                    rows, n_rows = {}, 0
            if n_rows:
                flush(hw, rows)
    if n_total == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"datasets.{loader.name} ({loader.description}): no usable sample to "
                        f"cache (skipped: {format_counts(skipped)})")
    manifest = {"version": CACHE_VERSION, "fingerprint": fp,
                "content_fingerprint": loader.fingerprint,
                "encoder_fingerprint": encoder_fingerprint, "dataset": loader.name,
                "description": loader.description, "max_length": max_length,
                "num_samples": n_total, "skipped": dict(sorted(skipped.items())),
                "arrays": arrays_meta, "shards": shards}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    log.info("latent cache %s: %d samples in %d shard(s), skipped: %s", path, n_total,
             len(shards), format_counts(skipped))
    return path


def open_latent_cache(path: str | os.PathLike, expected_fingerprint: str | None = None) -> dict:
    """The manifest of a complete cache; raises DataError if missing or the fingerprint differs."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise DataError(f"latent cache {path}: no {MANIFEST} (not built, or the build was "
                        "interrupted)")
    manifest = json.loads(mpath.read_text())
    if manifest.get("version") != CACHE_VERSION:
        raise DataError(f"latent cache {path}: version {manifest.get('version')} != "
                        f"{CACHE_VERSION}")
    if expected_fingerprint is not None and manifest["fingerprint"] != expected_fingerprint:
        raise DataError(f"latent cache {path}: fingerprint {manifest['fingerprint']} does not "
                        f"match the dataset and encoders ({expected_fingerprint}); rebuild it")
    return manifest


def find_latent_cache(path: str | os.PathLike | None, ds_cfg: Mapping, encoder_fingerprint: str,
                      *, name: str = "train") -> str | None:
    """``path`` if a complete cache for exactly this dataset and these encoders is there, else
    None (with the reason logged) - the training loop's "use the cache automatically" test."""
    if not path or not (Path(path) / MANIFEST).is_file():
        return None
    want = cache_fingerprint(ds_cfg, encoder_fingerprint, name=name)
    have = json.loads((Path(path) / MANIFEST).read_text()).get("fingerprint")
    if have != want:
        log.warning("latent cache %s does not match datasets.%s and the current encoders "
                    "(%s != %s); not using it", path, name, have, want)
        return None
    return str(path)


class CacheLoader(PlannedLoader):
    """Deterministic resumable batches of cached arrays (the 'cache' dataset type)."""

    kind = "cache"

    def __init__(self, cfg: Mapping, *, name: str, global_batch_size: int, seed: int,
                 process_index: int, process_count: int):
        self.cfg = cfg
        self.path = Path(cfg["path"])
        self.manifest = open_latent_cache(self.path, cfg["fingerprint"])
        self.shards = self.manifest["shards"]
        starts = np.cumsum([0] + [s["count"] for s in self.shards])
        self._starts = starts
        # A manifest is data too (copied, downloaded): its file names must stay in the cache
        # folder, symlinks included; a shard that leads out is skipped, never opened.
        root = self.path.resolve()
        self._files: list[Path | None] = []
        skipped: Counter = Counter()
        by_bucket: dict[tuple, list] = {}
        for k, s in enumerate(self.shards):
            f = (self.path / str(s["file"])).resolve()
            if not f.is_relative_to(root):
                self._files.append(None)
                skipped["outside_folder"] += int(s["count"])
                log.warning("datasets.%s: skipped latent cache shard %r: outside_folder (it "
                            "resolves outside %s)", name, s["file"], self.path)
                continue
            self._files.append(f)
            by_bucket.setdefault(tuple(s["bucket"]), []).append(
                np.arange(starts[k], starts[k + 1], dtype=np.int64))
        bucket_sizes = sorted(by_bucket)
        members = [np.concatenate(by_bucket[b]) for b in bucket_sizes]
        n = int(starts[-1])
        if cfg["num_samples"] is not None:
            members = [m[m < cfg["num_samples"]] for m in members]
        self._handles = threading.local()
        self._setup(name=name, description=f"latent cache {self.path}", members=members,
                    bucket_sizes=bucket_sizes, global_batch_size=global_batch_size, seed=seed,
                    process_index=process_index, process_count=process_count,
                    fingerprint=self.manifest["fingerprint"], shuffle=cfg["shuffle"],
                    workers=cfg["workers"], prefetch=cfg["prefetch"], listed=n,
                    base_counts=skipped)

    def _shard(self, k: int):
        from safetensors import safe_open

        cache = getattr(self._handles, "files", None)
        if cache is None:
            cache = self._handles.files = {}
        f = cache.get(k)
        if f is None:
            f = cache[k] = safe_open(str(self._files[k]), framework="numpy")
        return f

    def _bucket_shapes(self, b: int) -> dict[str, tuple[int, ...]]:
        hw = list(self.bucket_sizes[b])
        k = next(i for i, s in enumerate(self.shards)
                 if list(s["bucket"]) == hw and self._files[i] is not None)
        f = self._shard(k)
        names = [key for key in list(f.keys()) if key != "index"]
        return {key: (self.local_batch_size, *f.get_slice(key).get_shape()[1:]) for key in names}

    def _load_batch(self, k: int) -> dict:
        _, _, _, local = self._local_indices(k)
        shard_ids = np.searchsorted(self._starts, local, side="right") - 1
        cols: dict[str, list] = {}
        for i, s in zip(local, shard_ids):
            f = self._shard(int(s))
            row = int(i - self._starts[s])
            for key in f.keys():
                if key != "index":
                    cols.setdefault(key, []).append(f.get_slice(key)[row:row + 1])
        out = {key: np.concatenate(v) for key, v in cols.items()}
        out.update(_k=k, _bad=[])
        return out
