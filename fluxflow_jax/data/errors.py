"""Bad-input bookkeeping shared by every source.

One unreadable file must never stop a run, and a dataset that is silently half empty must never
train unnoticed: every skipped sample raises :class:`BadSample` with a reason from :data:`REASONS`,
the loaders count them per reason (``Loader.stats()``, the checkpointed state) and log the first
few with the file at fault. A source that ends up with no usable sample raises :class:`DataError`
naming the source instead of yielding an empty epoch.
"""
from __future__ import annotations

import logging
import threading
from typing import Mapping

from fluxflow_jax.data.secrets import redact

log = logging.getLogger("fluxflow_jax.data")

# Why a closed list: metric names are built from these, and a typo would silently fork a counter.
REASONS = (
    "missing_file",       # the file named by a caption line does not exist
    "outside_folder",     # a listed path (caption line, JSONL, cache manifest) resolves outside
                          # its folder (`..`, absolute path, symlink): never opened
    "empty_file",         # zero-byte file
    "unreadable_image",   # PIL cannot identify the format (corrupt header, not an image)
    "truncated_image",    # header fine, pixel data cut short
    "corrupt_image",      # any other decode failure
    "too_large",          # PIL decompression-bomb guard (more than Image.MAX_IMAGE_PIXELS)
    "too_small",          # shorter side below the dataset's `min_size`
    "malformed_line",     # caption line without a tab / invalid JSON / missing fields
    "malformed_caption",  # caption line with more than two tab-separated fields
    "empty_line",         # blank line inside a captions file
    "empty_caption",      # a caption that is empty after whitespace normalisation
    "bad_utf8",           # caption bytes that are not valid UTF-8
    "missing_image",      # WebDataset sample without any of the configured image members
    "missing_caption",    # WebDataset sample without the caption member / JSON field
    "bad_json",           # WebDataset JSON member that does not parse
    "shard_error",        # a tar shard that cannot be opened or read to the end
)


class BadSample(Exception):
    """One sample cannot be used; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown bad-sample reason {reason!r}; add it to REASONS")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class DataError(RuntimeError):
    """A dataset cannot produce batches at all (every sample bad, no full batch, bad state)."""


def format_counts(counts: Mapping[str, int]) -> str:
    """``{'missing_file': 2}`` -> ``'missing_file=2'`` (stable order) for log lines and errors."""
    items = [(k, v) for k, v in sorted(counts.items()) if v]
    return ", ".join(f"{k}={v}" for k, v in items) if items else "none"


class BadSampleLog:
    """Logs bad samples with their file, the first ``limit`` individually, then every 1000th.

    Why rate-limited: a dataset with 5 % broken files would otherwise bury the training log.
    Thread-safe because decode workers report from their own threads. ``where`` and ``detail``
    go through :func:`redact`: a shard URL or a reader's error message may carry a token.
    """

    def __init__(self, name: str, limit: int = 20):
        self.name = name
        self.limit = limit
        self._n = 0
        self._lock = threading.Lock()

    def warn_once(self, message: str) -> None:
        """Log ``message`` for this dataset the first time only (per loader)."""
        with self._lock:
            seen = getattr(self, "_once", set())
            self._once = seen
            if message in seen:
                return
            seen.add(message)
        log.warning("datasets.%s: %s", self.name, redact(message))

    def __call__(self, where: str, reason: str, detail: str = "") -> None:
        with self._lock:
            self._n += 1
            n = self._n
        if n <= self.limit or n % 1000 == 0:
            suffix = f" ({detail})" if detail else ""
            more = " (further bad samples are logged every 1000th)" if n == self.limit else ""
            log.warning("datasets.%s: skipped %s: %s%s%s", self.name, redact(where), reason,
                        redact(suffix), more)
