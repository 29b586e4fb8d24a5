"""Thread-side logic of the WebDataset loader: shard reading, sample decoding, the worker loop
and the merging pipeline. Kept apart from the loader object so the threads never hold a reference
to it: dropping a loader stops its threads (``weakref.finalize`` sets the stop event).

Message protocol from a worker (each message is one round-robin turn and carries the cursor the
worker would restart from after it - which is what makes resumption exact):
  ("ok", cursor, uint8 image, caption, ref)   ref = [worker, epoch, slot, offset]
  ("bad", cursor, reason, detail, where, sample_id)   sample_id = [url index, offset or -1 for
                                                       the shard itself]: counted once per run
  ("end_shard", cursor) / ("end_epoch", cursor, epoch) / ("error", exception)
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import queue
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from typing import Any, Iterator, Mapping

import numpy as np

from fluxflow_jax.data.errors import BadSample, BadSampleLog, DataError, format_counts
from fluxflow_jax.data.plan import epoch_rng
from fluxflow_jax.data.secrets import resolve_headers
from fluxflow_jax.data.tokenizer import tokenize
from fluxflow_jax.data.transforms import (assign_bucket, check_min_size, decode_caption,
                                          normalize_caption, open_image, resize_crop, to_float)

DONE = -1                 # cursor offset: the shard was cut short by an error, go to the next
SHUFFLE_SALT = 0x53485546
_SAMPLE_SALT = 0x57445331
RETRY_DELAY_S = 1.0        # first back-off before re-opening a remote shard (then doubled)
REMOTE = ("http://", "https://", "pipe:", "gs://", "s3://", "sftp://", "scp://", "ftps://")


def expand_urls(urls: list[str]) -> list[str]:
    """Expand brace ranges and ``::`` lists (webdataset's rules); local globs (``*``) too."""
    from webdataset.shardlists import expand_urls as wds_expand

    out: list[str] = []
    for u in urls:
        for x in wds_expand(u):
            if x.startswith(REMOTE):
                out.append(x)
            elif any(c in x for c in "*?["):
                out.extend(sorted(glob.glob(os.path.expanduser(x))))
            else:
                out.append(os.path.expanduser(x))
    return out


class _NoCredentialsAcrossHosts(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but send the configured headers to the first host only: a hub that
    redirects to a CDN (with a signed URL) must not hand the CDN our token. urllib alone
    would copy every header to whatever host the redirect names."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and (urllib.parse.urlsplit(newurl).netloc
                                != urllib.parse.urlsplit(req.full_url).netloc):
            for k in list(new.headers):
                new.remove_header(k)
        return new


_OPENER = urllib.request.build_opener(_NoCredentialsAcrossHosts)


def _http_samples(url: str, headers: Mapping[str, str], handler):
    """Samples of an http(s) shard fetched with ``headers`` (webdataset's own opener, curl,
    cannot be given headers without putting them on a command line)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    stream = _OPENER.open(urllib.request.Request(url, headers=dict(headers)), timeout=60)
    try:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=handler)
        yield from group_by_keys(files, handler=handler)
    finally:
        stream.close()


def iterate_shard(url: str, headers: Mapping[str, str] | None = None
                  ) -> Iterator[dict | Exception]:
    """Samples of one shard in tar order; a read error ends it with the exception as last item.
    ``headers`` (credentials resolved at open time) are sent with http(s) shards."""
    import webdataset as wds

    errors: list[Exception] = []

    def handler(exn: Exception) -> bool:
        errors.append(exn)
        return False  # stop this shard: a broken tar stream cannot be resynchronised

    if headers and url.startswith(("http://", "https://")):
        ds = _http_samples(url, headers, handler)
    else:
        ds = wds.WebDataset([url], shardshuffle=False, nodesplitter=None, workersplitter=None,
                            handler=handler, empty_check=False)
    try:
        for sample in ds:
            yield sample
    except Exception as e:  # errors outside the handler's reach (opening the stream)
        errors.append(e)
    if errors:
        yield errors[0]


def rng_state(rng: np.random.Generator) -> dict:
    """PCG64 state with its 128-bit integers as strings (portable JSON)."""
    s = rng.bit_generator.state
    return {"state": str(s["state"]["state"]), "inc": str(s["state"]["inc"]),
            "has_uint32": int(s["has_uint32"]), "uinteger": int(s["uinteger"])}


def rng_from_state(d: Mapping) -> np.random.Generator:
    bg = np.random.PCG64()
    bg.state = {"bit_generator": "PCG64",
                "state": {"state": int(d["state"]), "inc": int(d["inc"])},
                "has_uint32": int(d["has_uint32"]), "uinteger": int(d["uinteger"])}
    return np.random.Generator(bg)


def _member(sample: Mapping, keys: list[str]):
    lower = {k.lower(): k for k in sample if not k.startswith("__")}
    for k in keys:
        if k.lower() in lower:
            return sample[lower[k.lower()]]
    return None


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


@dataclasses.dataclass
class StreamSpec:
    """Everything the threads need, and nothing that refers back to the loader."""

    name: str
    cfg: Mapping
    urls: list
    host_shards: list
    sample_split: bool
    process_index: int
    process_count: int
    workers: int
    active: list
    local_batch_size: int
    seed: int
    blist: Any
    tokenizer: Any
    description: str
    log: BadSampleLog

    # -------------------------------------------------------------- shards and samples
    def worker_shards(self, w: int, epoch: int) -> list[int]:
        """Global url indices worker ``w`` reads in ``epoch``, in order."""
        hs = self.host_shards
        order = (epoch_rng(self.seed, epoch, SHUFFLE_SALT).permutation(len(hs))
                 if self.cfg["shuffle"] else np.arange(len(hs)))
        return [hs[int(k)] for k in order[w::self.workers]]

    def decode(self, sample: Mapping, url_index: int, epoch: int, offset: int):
        """``(uint8 [h, w, 3], caption)`` of a raw sample; raises BadSample."""
        cfg = self.cfg
        img_raw = _member(sample, [k for k in cfg["image_key"].split(";") if k])
        if img_raw is None:
            raise BadSample("missing_image", f"none of {cfg['image_key']!r}")
        cap_raw = _member(sample, [k for k in cfg["caption_key"].split(";") if k])
        if cap_raw is None:
            raise BadSample("missing_caption", f"none of {cfg['caption_key']!r}")
        text = decode_caption(cap_raw)
        jkey = cfg["caption_json_key"]
        if jkey:
            try:
                obj = json.loads(text)
            except ValueError as e:
                raise BadSample("bad_json", str(e)) from None
            for part in jkey.split("."):
                obj = obj.get(part) if isinstance(obj, dict) else None
            if not isinstance(obj, str):
                raise BadSample("missing_caption", f"no string field {jkey!r} in the JSON")
            text = obj
        caption = normalize_caption(text, cfg["fixed_prompt_prefix"])
        img = open_image(bytes(img_raw))
        check_min_size(img.size[0], img.size[1], cfg["min_size"])
        hw = assign_bucket(img.size[0], img.size[1], cfg, self.blist)
        random = cfg["crop"] == "random" or cfg["flip"]
        rng = (np.random.default_rng([_SAMPLE_SALT, self.seed % 2**63, epoch, url_index, offset])
               if random else None)
        stretch = cfg["resize_mode"] == "bucket" and cfg["buckets"] == "native"
        return resize_crop(img, hw, stretch=stretch, crop=cfg["crop"], flip=cfg["flip"],
                           rng=rng), caption

    def shard_samples(self, url_index: int, skip: int, stop: threading.Event):
        """``(offset, sample)`` from ``skip`` on, then ``(offset, exception)`` on a read error.
        Remote shards are re-opened (and skipped back to the position) up to twice first."""
        url = self.urls[url_index]
        attempts = 3 if url.startswith(REMOTE) else 1
        for attempt in range(attempts):
            n, err = 0, None
            headers = (resolve_headers(self.cfg["headers"], self.cfg["token_env"], self.name)
                       if url.startswith(("http://", "https://")) else None)
            for item in iterate_shard(url, headers):
                if stop.is_set():
                    return
                if isinstance(item, Exception):
                    err = item
                    break
                if n >= skip:
                    yield n, item
                    skip = n + 1
                n += 1
            if err is None:
                return
            if attempt + 1 < attempts:
                time.sleep(RETRY_DELAY_S * 2**attempt)
        yield skip, err

    def refetch(self, refs: list, stop: threading.Event) -> dict:
        """Decoded samples for references ``[w, e, slot, offset]`` (shuffle buffer and partial
        batches of a restored state): re-reads only the shards they live in."""
        by_shard: dict[tuple, set] = {}
        for w, e, j, n in refs:
            by_shard.setdefault((w, e, j), set()).add(n)
        got: dict[tuple, tuple] = {}
        for (w, e, j), offs in by_shard.items():
            u = self.worker_shards(w, e)[j]
            for n, item in self.shard_samples(u, min(offs), stop):
                if isinstance(item, Exception) or n > max(offs):
                    break
                if n in offs:
                    got[(w, e, j, n)] = self.decode(item, u, e, n)
        missing = [r for r in refs if tuple(r) not in got]
        if missing:
            raise DataError(f"datasets.{self.name}: cannot re-read {len(missing)} buffered "
                            f"sample(s) on resume (first: {missing[0]}); the shards changed "
                            "since the checkpoint")
        return got

    # -------------------------------------------------------------- threads
    def worker(self, w: int, cursor, out: queue.Queue, stop: threading.Event) -> None:
        """Read worker ``w``'s shards forever from ``cursor`` = (epoch, slot, offset)."""
        try:
            e, j, off = cursor
            while not stop.is_set():
                shards = self.worker_shards(w, e)
                while j < len(shards):
                    u = shards[j]
                    for n, item in (self.shard_samples(u, off, stop) if off != DONE else ()):
                        if isinstance(item, Exception):
                            if not _put(out, ("bad", (e, j, DONE), "shard_error", str(item),
                                              self.urls[u], [u, -1]), stop):
                                return
                            break
                        if self.sample_split and n % self.process_count != self.process_index:
                            continue
                        try:
                            arr, cap = self.decode(item, u, e, n)
                            msg = ("ok", (e, j, n + 1), arr, cap, [w, e, j, n])
                        except BadSample as ex:
                            where = f"{self.urls[u]}:{item.get('__key__', n)}"
                            msg = ("bad", (e, j, n + 1), ex.reason, ex.detail, where, [u, n])
                        if not _put(out, msg, stop):
                            return
                    if stop.is_set() or not _put(out, ("end_shard", (e, j + 1, 0)), stop):
                        return
                    j, off = j + 1, 0
                if not _put(out, ("end_epoch", (e + 1, 0, 0), e), stop):
                    return
                e, j, off = e + 1, 0, 0
        except BaseException as ex:  # surfaced by the pipeline thread, never swallowed
            _put(out, ("error", ex), stop)

    def pipeline(self, st: dict, queues: dict, out: queue.Queue, stop: threading.Event) -> None:
        try:
            self._pipeline(st, queues, out, stop)
        except BaseException as ex:
            _put(out, ("error", ex), stop)

    def _pipeline(self, st: dict, queues: dict, out: queue.Queue, stop: threading.Event) -> None:
        """Merge the workers round-robin (a worker that finished the epoch waits for the others,
        so each epoch is every shard exactly once), shuffle, batch per bucket, emit
        ``("batch", batch, state_after_it)``."""
        B = self.local_batch_size
        got = self.refetch(st["buffer"] + [r for _, _, refs in st["pending"] for r in refs], stop)
        buffer = [(r, *got[tuple(r)]) for r in st["buffer"]]
        pending: dict[tuple, list] = {(h, w): [(r, *got[tuple(r)]) for r in refs]
                                      for h, w, refs in st["pending"]}
        rng = rng_from_state(st["rng"])
        cursors = [list(c) for c in st["cursors"]]
        skipped = Counter(st["skipped"])
        batches, rr, epoch = int(st["batches"]), int(st["rr"]), int(st["epoch"])
        waiting, epoch_good = set(st["waiting"]), int(st["epoch_good"])
        # Bad samples are counted once each (the stream meets them again every epoch): the
        # counters say how much of the data is bad, not how long the run has been going.
        bad_seen = {tuple(x) for x in st.get("bad_seen", [])}
        bad_list = [list(x) for x in st.get("bad_seen", [])]   # in the order met
        size = self.cfg["shuffle_buffer"] if self.cfg["shuffle"] else 0
        cap = st.get("shuffle_size")    # set once the buffer has been found larger than the data
        if cap is not None:
            size = min(size, int(cap))
        active = self.active

        def snapshot() -> dict:
            return {**st, "cursors": [list(c) for c in cursors], "rr": rr, "rng": rng_state(rng),
                    "buffer": [list(x[0]) for x in buffer],
                    "pending": [[h, w, [list(x[0]) for x in items]]
                                for (h, w), items in sorted(pending.items()) if items],
                    "skipped": dict(sorted(skipped.items())), "batches": batches,
                    "epoch": epoch, "waiting": sorted(waiting), "epoch_good": epoch_good,
                    "bad_seen": list(bad_list), "shuffle_size": cap}

        def accept(item) -> None:
            nonlocal batches
            hw = (int(item[1].shape[0]), int(item[1].shape[1]))
            acc = pending.setdefault(hw, [])
            acc.append(item)
            if len(acc) == B:
                pending[hw] = []
                ids, mask = tokenize(self.tokenizer, [x[2] for x in acc], self.cfg["max_length"])
                batch = {"image": to_float(np.stack([x[1] for x in acc])), "input_ids": ids,
                         "attention_mask": mask}
                batches += 1
                _put(out, ("batch", batch, snapshot()), stop)

        while not stop.is_set():
            w = active[rr]
            if w in waiting:
                rr = (rr + 1) % len(active)
                continue
            try:
                msg = queues[w].get(timeout=0.1)
            except queue.Empty:
                continue  # same worker again: the merge order never depends on timing
            rr = (rr + 1) % len(active)
            kind = msg[0]
            if kind == "error":
                raise msg[1]
            cursors[w] = list(msg[1])
            if kind == "bad":
                sid = tuple(msg[5])
                if sid not in bad_seen:
                    bad_seen.add(sid)
                    bad_list.append(list(sid))
                    skipped[msg[2]] += 1
                    self.log(msg[4], msg[2], msg[3])
            elif kind == "end_epoch":
                waiting.add(w)
                if waiting == set(active):
                    if epoch_good == 0:
                        raise DataError(f"datasets.{self.name} ({self.description}): a whole "
                                        f"epoch without one usable sample (skipped: "
                                        f"{format_counts(skipped)})")
                    waiting.clear()
                    if size > len(buffer) and buffer:
                        # The buffer outgrew the data: waiting for it to fill would read
                        # shuffle_buffer / epoch_good passes before the first batch. Shrink it to
                        # one epoch's samples (kept in the state, so a resume agrees).
                        self.log.warn_once(
                            f"shuffle_buffer={size} is larger than the data set ({len(buffer)} "
                            f"usable samples per epoch on this host); using {len(buffer)}")
                        size = cap = len(buffer)
                    epoch, epoch_good = epoch + 1, 0
            elif kind == "ok":
                epoch_good += 1
                item = (msg[4], msg[2], msg[3])
                if size > 1 or buffer:
                    if len(buffer) < size:
                        buffer.append(item)
                        continue
                    k = int(rng.integers(size))
                    item, buffer[k] = buffer[k], item
                accept(item)
