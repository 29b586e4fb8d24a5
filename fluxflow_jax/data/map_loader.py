"""Deterministic, resumable, multi-host loader over a map-style source, decoded in grain threads.

Batch ``k`` (counted from the start of training) is a pure function of ``(seed, k)``: epoch and
position are ``divmod(k, epoch_length)``, the epoch's plan (``plan.py``) names the global batch,
the host takes its slice, each sample's random crop/flip comes from a generator seeded by
``(seed, epoch, index)``, and a bad sample is replaced by the next usable one of its bucket in the
epoch's order. Resuming is therefore "start at k": no replay, no hidden iterator state. The only
extra state is the set of bad samples met so far (for the counters); it is checkpointed too.

Decoding runs in ``workers`` threads through ``grain.MapDataset.to_iter_dataset`` with a prefetch
buffer of ``prefetch`` batches (PIL releases the GIL while decoding and resizing). Bad-sample
counts are merged when a batch is *consumed*, so the counters after k batches are identical in an
uninterrupted and a resumed run, whatever the worker threads had already prefetched.
"""
from __future__ import annotations

import logging
import sys
import threading
from collections import Counter
from typing import Any, Mapping

import numpy as np

from fluxflow_jax.data import plan as planlib
from fluxflow_jax.data.config import content_fingerprint, is_fixed_size, split_batch
from fluxflow_jax.data.errors import BadSample, BadSampleLog, DataError, format_counts
from fluxflow_jax.data.sources import MapSource, make_source, scan_sizes
from fluxflow_jax.data.tokenizer import tokenize
from fluxflow_jax.data.transforms import (assign_bucket, bucket_list, check_min_size, resize_crop,
                                          to_float)

log = logging.getLogger("fluxflow_jax.data")
_SAMPLE_SALT = 0x53414D50
STATE_VERSION = 1


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([_SAMPLE_SALT, int(seed) % 2**63, int(epoch), int(index)])


class _BatchDataset:
    """Lazily built grain MapDataset view ``j -> load(start + j)`` (infinite)."""

    @staticmethod
    def make(load, start: int):
        import grain

        class _Batches(grain.MapDataset):
            def __init__(self):
                super().__init__()

            def __len__(self):
                return sys.maxsize - start

            def __getitem__(self, j):
                if isinstance(j, slice):
                    return self.slice(j)
                return load(start + int(j))

        return _Batches()


class PlannedLoader:
    """Shared machinery of map-style loaders: the per-epoch plan, grain threads, host slicing,
    bad-sample bookkeeping and the (epoch, position) state. Subclasses set up ``members``
    (usable sample indices per bucket) and implement ``_load_batch(k)``."""

    kind = "map"

    def _setup(self, *, name: str, description: str, members: list, bucket_sizes: list,
               global_batch_size: int, seed: int, process_index: int, process_count: int,
               fingerprint: str, shuffle: bool, workers: int, prefetch: int, listed: int,
               base_counts: Counter) -> None:
        self.name, self.description = name, description
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = split_batch(global_batch_size, process_count, name)
        self.process_index, self.process_count = int(process_index), int(process_count)
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"datasets.{name}: process_index {process_index} not in "
                             f"[0, {process_count})")
        self.seed, self.fingerprint = int(seed), fingerprint
        self.shuffle, self.workers, self.prefetch = shuffle, int(workers), int(prefetch)
        self.members, self.bucket_sizes = members, bucket_sizes
        self._base_counts = base_counts
        self._bad: dict[int, str] = {}      # found while decoding, merged when consumed
        self._log = BadSampleLog(name)
        usable = int(sum(len(m) for m in members))
        where = f"datasets.{name} ({description})"
        if usable == 0:
            raise DataError(f"{where}: no usable sample out of {listed} listed "
                            f"(skipped: {format_counts(base_counts)})")
        self.epoch_length = planlib.batches_per_epoch(members, self.global_batch_size)
        if self.epoch_length == 0:
            sizes_txt = {f"{h}x{w}": len(m) for (h, w), m in zip(bucket_sizes, members)}
            raise DataError(f"{where}: no bucket holds a full global batch of "
                            f"{self.global_batch_size} samples (samples per bucket: {sizes_txt}); "
                            "lower the batch size or use fewer buckets")
        self.unused_per_epoch = usable - self.epoch_length * self.global_batch_size
        log.info("%s: %d samples usable of %d, %d bucket(s), %d batches/epoch of %d "
                 "(%d per host), %d unused per epoch; skipped: %s", where, usable, listed,
                 len(members), self.epoch_length, self.global_batch_size,
                 self.local_batch_size, self.unused_per_epoch, format_counts(base_counts))
        self._plans: dict[tuple[int, int], planlib.EpochPlan] = {}   # (seed, epoch) -> plan
        self._plan_lock = threading.Lock()
        self._next = 0
        self._it = None

    def _load_batch(self, k: int) -> dict:
        raise NotImplementedError

    def where(self, i: int) -> str:
        return f"{self.description} sample {i}"

    def _local_indices(self, k: int):
        """``(epoch, plan, bucket id, this host's sample indices)`` of global batch ``k``."""
        epoch, pos = divmod(k, self.epoch_length)
        plan = self._plan(epoch)
        lo = self.process_index * self.local_batch_size
        return epoch, plan, int(plan.bucket[pos]), plan.batches[pos][lo:lo + self.local_batch_size]

    def upcoming_buckets(self, n: int) -> list[int]:
        """Bucket ids of the next ``n`` global batches, each once, in the order they first come.

        A plan is a pure function of (seed, epoch): the future ones are made here and not kept
        (the cache holds the epochs the decode threads are reading)."""
        order: list[int] = []
        can_come = sum(len(m) >= self.global_batch_size for m in self.members)
        k, end = self._next, self._next + max(0, int(n))
        while k < end and len(order) < can_come:
            epoch, pos = divmod(k, self.epoch_length)
            plan = planlib.make_plan(self.members, self.global_batch_size, self.seed, epoch,
                                     self.shuffle)
            ids = plan.bucket[pos:pos + end - k]
            _, first = np.unique(ids, return_index=True)
            order += [int(b) for b in ids[np.sort(first)] if int(b) not in order]
            k += len(ids)
        return order

    def upcoming_shapes(self, n: int) -> list[dict[str, tuple[int, ...]]]:
        """For each bucket of the next ``n`` batches, in the order they first come, the
        host-local shapes of the arrays that depend on the bucket (``compile_ahead.py``)."""
        return [self._bucket_shapes(b) for b in self.upcoming_buckets(n)]

    def _bucket_shapes(self, b: int) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def _plan(self, epoch: int) -> planlib.EpochPlan:
        # keyed by the seed too: a thread of an abandoned iterator may still be finishing a
        # batch when set_state installs another seed
        seed = self.seed
        with self._plan_lock:
            p = self._plans.get((seed, epoch))
            if p is None:
                p = planlib.make_plan(self.members, self.global_batch_size, seed, epoch,
                                      self.shuffle)
                self._plans[(seed, epoch)] = p
                for old in [k for k in self._plans if k[1] < epoch - 1 or k[0] != seed]:
                    del self._plans[old]
            return p

    # ------------------------------------------------------------------ iteration
    def _start(self) -> None:
        self._stop()
        if self.workers == 0:
            start = self._next
            self._it = (self._load_batch(k) for k in range(start, sys.maxsize))
            return
        import grain
        ds = _BatchDataset.make(self._load_batch, self._next)
        opts = grain.ReadOptions(num_threads=self.workers, prefetch_buffer_size=self.prefetch)
        self._it = iter(ds.to_iter_dataset(opts))

    def _stop(self) -> None:
        it, self._it = self._it, None
        close = getattr(it, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # closing a half-consumed prefetch iterator is best-effort
                pass

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._start()
        el = next(self._it)
        if el["_k"] != self._next:  # would mean grain reordered elements: never silently accept
            raise RuntimeError(f"datasets.{self.name}: got batch {el['_k']}, expected {self._next}")
        for i, reason, detail in el["_bad"]:
            if i not in self._bad:
                self._bad[i] = reason
                self._log(self.where(i), reason, detail)
        self._next += 1
        return {key: v for key, v in el.items() if not key.startswith("_")}

    def close(self) -> None:
        """Stop the decode threads (a later ``next`` restarts them at the current position)."""
        self._stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _restored_bad(self, bad: dict) -> None:
        """Hook: a subclass may reuse the restored bad-sample table."""

    def __del__(self):
        try:
            self._stop()
        except Exception:
            pass

    # ------------------------------------------------------------------ state
    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self._next // self.epoch_length

    @property
    def position(self) -> int:
        """Index of the next batch within its epoch."""
        return self._next % self.epoch_length

    def skipped(self) -> Counter:
        return self._base_counts + Counter(self._bad.values())

    def stats(self) -> dict[str, int]:
        c = self.skipped()
        out = {f"skipped_{r}": int(v) for r, v in sorted(c.items()) if v}
        out["skipped_total"] = int(sum(c.values()))
        out["unused_per_epoch"] = int(self.unused_per_epoch)
        out["epoch"] = self.epoch
        out["batches"] = self._next
        return out

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: restoring it yields exactly the batches that follow."""
        return {"version": STATE_VERSION, "kind": self.kind, "name": self.name,
                "fingerprint": self.fingerprint, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "epoch": self.epoch,
                "position": self.position, "epoch_length": self.epoch_length,
                "bad": [[int(i), r] for i, r in sorted(self._bad.items())],
                "skipped": {r: int(v) for r, v in sorted(self.skipped().items()) if v}}

    def set_state(self, state: Mapping) -> None:
        check_state(state, self.kind, self.name, self.fingerprint,
                    {"global_batch_size": self.global_batch_size,
                     "epoch_length": self.epoch_length})
        self._stop()
        self.seed = int(state["seed"])
        self._bad = {int(i): str(r) for i, r in state["bad"]}
        self._restored_bad(self._bad)
        self._next = int(state["epoch"]) * self.epoch_length + int(state["position"])


class MapLoader(PlannedLoader):
    """Host-local batches ``{'image', 'input_ids', 'attention_mask'}`` over a map-style image-text
    source; see the module docstring for the determinism contract."""

    def __init__(self, cfg: Mapping, source: MapSource, *, name: str, global_batch_size: int,
                 seed: int, tokenizer, process_index: int, process_count: int,
                 fingerprint: str):
        self.cfg, self.source, self.tokenizer = cfg, source, tokenizer
        self._stretch = cfg["resize_mode"] == "bucket" and cfg["buckets"] == "native"
        self._random = cfg["crop"] == "random" or cfg["flip"]
        logger = BadSampleLog(name)
        n = len(source)
        init_bad: dict[int, str] = {}
        if is_fixed_size(cfg):
            # One shape for every sample: no header scan, bad files are met (and replaced) lazily.
            bucket_sizes = [tuple(bucket_list(cfg)[0])]
            members = [np.arange(n, dtype=np.int64)]
        else:
            blist = bucket_list(cfg)
            sizes = scan_sizes(source, max(1, cfg["workers"]), cfg["scan_cache"])
            ids: dict[tuple[int, int], list[int]] = {}
            for i, s in enumerate(sizes):
                if not isinstance(s, str) and min(s) < cfg["min_size"]:
                    s = "too_small"
                if isinstance(s, str):
                    init_bad[i] = s
                    logger(source.where(i), s)
                else:
                    ids.setdefault(assign_bucket(s[0], s[1], cfg, blist), []).append(i)
            bucket_sizes = sorted(ids)
            members = [np.asarray(ids[b], np.int64) for b in bucket_sizes]
        self._known_bad: dict[int, str] = dict(init_bad)  # shared hint for the decode threads
        self._setup(name=name, description=source.description, members=members,
                    bucket_sizes=bucket_sizes, global_batch_size=global_batch_size, seed=seed,
                    process_index=process_index, process_count=process_count,
                    fingerprint=fingerprint, shuffle=cfg["shuffle"], workers=cfg["workers"],
                    prefetch=cfg["prefetch"], listed=n,
                    base_counts=Counter(source.problems) + Counter(init_bad.values()))

    def where(self, i: int) -> str:
        return self.source.where(i)

    def _restored_bad(self, bad: dict) -> None:
        self._known_bad.update(bad)

    def load_sample(self, i: int, epoch: int, bucket_hw, deterministic: bool = False):
        """Decoded ``(uint8 [h, w, 3], caption)`` of sample ``i``; raises BadSample."""
        img, cap = self.source.read(i)
        check_min_size(img.size[0], img.size[1], self.cfg["min_size"])
        rng = None if deterministic or not self._random else sample_rng(self.seed, epoch, i)
        arr = resize_crop(img, bucket_hw, stretch=self._stretch,
                          crop="center" if deterministic else self.cfg["crop"],
                          flip=False if deterministic else self.cfg["flip"], rng=rng)
        return arr, cap

    def _try(self, j: int, epoch: int, bucket_hw, events: list):
        """Sample ``j`` or None; a bad sample (known or new) is appended to ``events``."""
        reason = self._known_bad.get(j)
        if reason is not None:  # found bad before (maybe by another thread): same outcome
            events.append((j, reason, ""))
            return None
        try:
            return self.load_sample(j, epoch, bucket_hw)
        except BadSample as e:
            events.append((j, e.reason, e.detail))
            self._known_bad[j] = e.reason
            return None

    def _load_or_substitute(self, i: int, b: int, epoch: int, plan, events: list):
        bucket_hw = self.bucket_sizes[b]
        out = self._try(i, epoch, bucket_hw, events)
        if out is not None:
            return out
        for j in planlib.substitutes(plan, b, i):
            out = self._try(j, epoch, bucket_hw, events)
            if out is not None:
                return out
        counts = Counter(r for _, r, _ in events)
        h, w = bucket_hw
        raise DataError(f"datasets.{self.name} ({self.description}): every sample of "
                        f"bucket {h}x{w} is unusable ({format_counts(counts)})")

    def _bucket_shapes(self, b: int) -> dict[str, tuple[int, ...]]:
        h, w = self.bucket_sizes[b]
        return {"image": (self.local_batch_size, int(h), int(w), 3)}

    def _load_batch(self, k: int) -> dict:
        epoch, plan, b, local = self._local_indices(k)
        events: list = []
        images, caps = [], []
        for i in local:
            arr, cap = self._load_or_substitute(int(i), b, epoch, plan, events)
            images.append(arr)
            caps.append(cap)
        ids, mask = tokenize(self.tokenizer, caps, self.cfg["max_length"])
        return {"image": to_float(np.stack(images)), "input_ids": ids, "attention_mask": mask,
                "_k": k, "_bad": events}


def make_map_loader(cfg: Mapping, *, name: str, global_batch_size: int, seed: int, tokenizer,
                    process_index: int, process_count: int) -> MapLoader:
    """MapLoader over the source of a *resolved* map-style config (folder, jsonl, tfds, shapes).

    Lives here rather than in ``loader.py`` because both ``make_loader`` and
    ``build_latent_cache`` (``cache.py``, itself imported by ``loader.py``) build one: this is the
    shared piece that keeps ``cache.py`` from importing ``loader.py``.
    """
    source = make_source(cfg, name)
    fp = content_fingerprint(cfg, source.fingerprint())
    return MapLoader(cfg, source, name=name, global_batch_size=global_batch_size, seed=seed,
                     tokenizer=tokenizer, process_index=process_index,
                     process_count=process_count, fingerprint=fp)


def check_state(state: Mapping, kind: str, name: str, fingerprint: str,
                must_match: Mapping[str, Any]) -> None:
    """Refuse a loader state from another kind of loader, another dataset content, or another
    batch geometry (it would silently resume on different samples)."""
    if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
        got = state.get("version") if isinstance(state, Mapping) else type(state).__name__
        raise DataError(f"datasets.{name}: loader state version {got!r} is not {STATE_VERSION}")
    if state.get("kind") != kind:
        raise DataError(f"datasets.{name}: loader state is for a {state.get('kind')!r} loader, "
                        f"this one is {kind!r}")
    if state.get("fingerprint") != fingerprint:
        raise DataError(f"datasets.{name}: loader state was saved for different dataset content "
                        f"(fingerprint {state.get('fingerprint')} != {fingerprint}); the config "
                        "or the data changed since the checkpoint")
    for key, want in must_match.items():
        if state.get(key) != want:
            raise DataError(f"datasets.{name}: loader state has {key}={state.get(key)!r}, this "
                            f"loader has {want!r}")
