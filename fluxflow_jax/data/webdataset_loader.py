"""Streaming WebDataset tar shards: deterministic, resumable at the exact sample, split per host
and per worker.

Shards (local paths, ``{000..099}`` brace ranges, ``a::b`` lists, local globs, ``pipe:`` commands,
http(s) URLs - everything ``webdataset.gopen`` opens) are read with ``wds.WebDataset`` one shard
at a time (``WebLoader`` needs torch). Unlike the reference (REFERENCE.md section 10 item 22: one
curl pipe for all shards, no splitting), shards are split explicitly:

* hosts: host ``p`` of ``P`` owns shards ``p::P``; with fewer shards than hosts every host reads
  every shard and keeps the samples whose ordinal is ``p mod P``. Disjoint and complete.
* workers: each epoch the host's shards are permuted with ``(seed, epoch)`` and worker ``w`` of
  ``W`` reads ``perm[w::W]`` in its own thread, decoding and resizing as it goes.
* the workers' outputs are merged round-robin; a worker that finished its part of the epoch
  waits for the others, so every epoch is each shard exactly once. Then a seeded shuffle buffer of
  ``shuffle_buffer`` decoded samples, then batches per bucket.

The stream is infinite. The state after a batch is each worker's cursor (epoch, shard slot, sample
offset), the shuffle-buffer and partial-batch contents as sample references, the shuffle generator
state and the counters; resuming re-reads only the shards those references live in (a few
shards), never the epoch.

Bucketed batches on several hosts would need the hosts to agree on each step's bucket; streaming
hosts cannot, so multi-host streaming requires a single batch shape (``resize_mode='fixed'``).
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import weakref
from typing import Any, Mapping

import numpy as np

from fluxflow_jax.data.config import is_fixed_size, split_batch
from fluxflow_jax.data.errors import BadSampleLog, DataError
from fluxflow_jax.data.map_loader import STATE_VERSION, check_state
from fluxflow_jax.data.secrets import redact, resolve_headers
from fluxflow_jax.data.transforms import bucket_list
from fluxflow_jax.data.webdataset_stream import (SHUFFLE_SALT, StreamSpec, expand_urls,
                                                 rng_state)

log = logging.getLogger("fluxflow_jax.data")
__all__ = ["StreamLoader", "expand_urls"]


def _stop_threads(stop: threading.Event, threads: list) -> None:
    stop.set()
    for t in threads:
        if t is not threading.current_thread():
            t.join(timeout=10)


class StreamLoader:
    """Iterator of host-local batches from WebDataset shards (see module docstring)."""

    kind = "stream"

    def __init__(self, cfg: Mapping, *, name: str, global_batch_size: int, seed: int, tokenizer,
                 process_index: int, process_count: int, fingerprint: str):
        self.cfg, self.name, self.tokenizer = cfg, name, tokenizer
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = split_batch(global_batch_size, process_count, name)
        self.process_index, self.process_count = int(process_index), int(process_count)
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"datasets.{name}: process_index {process_index} not in "
                             f"[0, {process_count})")
        self.seed, self.fingerprint = int(seed), fingerprint
        self.urls = expand_urls(cfg["urls"])
        if not self.urls:
            raise DataError(f"datasets.{name}.urls: {redact(cfg['urls'])!r} expands to no shard")
        try:  # fail now on an unset variable; the value itself is read again at each open
            resolve_headers(cfg["headers"], cfg["token_env"], name)
        except LookupError as e:
            raise DataError(str(e.args[0])) from None
        if process_count > 1 and not is_fixed_size(cfg):
            raise ValueError(
                f"datasets.{name}.resize_mode: bucketed batches from a streaming webdataset on "
                f"{process_count} hosts would give the hosts different batch shapes; use "
                "resize_mode='fixed' (or a single bucket), or a map-style source (folder, jsonl, "
                "tfds) whose global batch plan is shared by all hosts")
        if len(self.urls) >= process_count:
            self.host_shards = list(range(process_index, len(self.urls), process_count))
            self.sample_split = False
        else:
            self.host_shards = list(range(len(self.urls)))
            self.sample_split = process_count > 1
        self.workers = max(1, cfg["workers"])
        self.active = [w for w in range(self.workers) if w < len(self.host_shards)]
        n = cfg["num_samples"]
        self.epoch_length = (n // self.global_batch_size) if n else None
        self.description = redact(f"webdataset {self.urls[0]} (+{len(self.urls) - 1} shards)")
        self._log = BadSampleLog(name)
        if cfg["shuffle"] and n and cfg["shuffle_buffer"] > n:
            self._log.warn_once(f"shuffle_buffer={cfg['shuffle_buffer']} is larger than "
                                f"num_samples={n}; it is shrunk to one epoch's samples after "
                                "the first pass")
        self._state = self._initial_state()
        self._threads: list[threading.Thread] = []
        self._stop: threading.Event | None = None
        self._finalizer = None
        self._out: queue.Queue | None = None
        log.info("datasets.%s: %d shards, this host reads %d (%s split) with %d worker(s)", name,
                 len(self.urls), len(self.host_shards),
                 "sample" if self.sample_split else "shard", len(self.active))

    def _spec(self) -> StreamSpec:
        return StreamSpec(name=self.name, cfg=self.cfg, urls=self.urls,
                          host_shards=self.host_shards, sample_split=self.sample_split,
                          process_index=self.process_index, process_count=self.process_count,
                          workers=self.workers, active=self.active,
                          local_batch_size=self.local_batch_size, seed=self.seed,
                          blist=bucket_list(self.cfg), tokenizer=self.tokenizer,
                          description=self.description, log=self._log)

    # ------------------------------------------------------------------ state
    def upcoming_shapes(self, n: int) -> list[dict[str, tuple[int, ...]]] | None:
        """A stream's bucket order is not known ahead (``compile_ahead.py``): None with several
        buckets, none to add with one."""
        return [] if is_fixed_size(self.cfg) else None

    def _initial_state(self) -> dict:
        rng = np.random.Generator(np.random.PCG64(
            np.random.SeedSequence([SHUFFLE_SALT, self.seed % 2**63])))
        return {"version": STATE_VERSION, "kind": self.kind, "name": self.name,
                "fingerprint": self.fingerprint, "seed": self.seed,
                "global_batch_size": self.global_batch_size,
                "process_index": self.process_index, "process_count": self.process_count,
                "workers": self.workers, "num_shards": len(self.urls),
                "cursors": [[0, 0, 0] for _ in range(self.workers)], "rr": 0,
                "rng": rng_state(rng), "buffer": [], "pending": [], "skipped": {},
                "batches": 0, "epoch": 0, "waiting": [], "epoch_good": 0, "bad_seen": [],
                "shuffle_size": None}

    def get_state(self) -> dict[str, Any]:
        """State after the last batch returned (JSON-serialisable)."""
        return json.loads(json.dumps(self._state))

    def set_state(self, state: Mapping) -> None:
        check_state(state, self.kind, self.name, self.fingerprint,
                    {"global_batch_size": self.global_batch_size,
                     "process_index": self.process_index, "process_count": self.process_count,
                     "workers": self.workers, "num_shards": len(self.urls)})
        self._shutdown()
        self.seed = int(state["seed"])
        self._state = json.loads(json.dumps(dict(state)))

    @property
    def epoch(self) -> int:
        """Completed passes over the shards (of the samples consumed into batches)."""
        return int(self._state["epoch"])

    @property
    def position(self) -> int:
        """Batches yielded so far (a stream has no position inside an epoch)."""
        return int(self._state["batches"])

    def stats(self) -> dict[str, int]:
        c = self._state["skipped"]
        out = {f"skipped_{r}": int(v) for r, v in sorted(c.items()) if v}
        out["skipped_total"] = int(sum(c.values()))
        out["epoch"] = self.epoch
        out["batches"] = int(self._state["batches"])
        return out

    # ------------------------------------------------------------------ threads
    def _start(self) -> None:
        self._shutdown()
        spec, st = self._spec(), self._state
        stop = threading.Event()
        out: queue.Queue = queue.Queue(maxsize=self.cfg["prefetch"])
        queues = {w: queue.Queue(maxsize=max(4, self.local_batch_size)) for w in self.active}
        threads = [threading.Thread(target=spec.worker, args=(w, tuple(st["cursors"][w]),
                                                              queues[w], stop),
                                    name=f"fluxflow-wds-{self.name}-{w}", daemon=True)
                   for w in self.active]
        threads.append(threading.Thread(target=spec.pipeline, args=(st, queues, out, stop),
                                        name=f"fluxflow-wds-{self.name}", daemon=True))
        self._stop, self._threads, self._out = stop, threads, out
        # the threads only know `spec`, so an abandoned loader is collected and stops them
        self._finalizer = weakref.finalize(self, _stop_threads, stop, threads)
        for t in threads:
            t.start()

    def _shutdown(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._threads, self._stop, self._finalizer, self._out = [], None, None, None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._out is None:
            self._start()
        msg = self._out.get()
        if msg[0] == "error":
            self._shutdown()
            err = msg[1]
            text = str(err)
            if redact(text) != text:  # a reader's message quoting a URL with its token
                raise DataError(f"datasets.{self.name}: {type(err).__name__}: "
                                f"{redact(text)}") from None
            raise err
        _, batch, snap = msg
        self._state = snap
        return batch

    def close(self) -> None:
        """Stop the worker threads (a later ``next`` restarts them from the current state)."""
        self._shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
