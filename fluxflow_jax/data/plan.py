"""Per-epoch batch plans for map-style sources: a pure function of (buckets, seed, epoch).

Every host computes the same *global* plan and takes its own slice of each global batch, so
(1) hosts always agree on the batch shape of a step (one bucket per global batch), (2) the hosts'
slices are disjoint and together are exactly the global batch, and (3) a checkpointed position
(epoch, batch) means the same samples on any number of hosts.

Each bucket's samples are permuted with a generator seeded by ``(seed, epoch)`` and cut into full
global batches; the leftover (< one batch per bucket) is not used this epoch and, because the
permutation changes, is used in other epochs. Batches are never padded with another bucket's
images (the reference mixed sizes and resized them, REFERENCE.md section 10 item 15). The batch
order is then permuted too. Every epoch has the same number of batches, which is what makes the
position arithmetic ``k = epoch * epoch_length + position`` exact.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

_PLAN_SALT = 0x504C414E


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    batches: np.ndarray        # int64 [n_batches, global_batch]: sample indices
    bucket: np.ndarray         # int32 [n_batches]: bucket id of each batch
    perms: tuple               # per bucket id: this epoch's order of its samples (for substitutes)


def epoch_rng(seed: int, epoch: int, salt: int = _PLAN_SALT) -> np.random.Generator:
    """The generator of one epoch; numpy's SeedSequence mixes the three words."""
    return np.random.default_rng([salt, int(seed) % 2**63, int(epoch)])


def batches_per_epoch(members: Sequence[np.ndarray], global_batch: int) -> int:
    return int(sum(len(m) // global_batch for m in members))


def make_plan(members: Sequence[np.ndarray], global_batch: int, seed: int, epoch: int,
              shuffle: bool) -> EpochPlan:
    """The batches of ``epoch``; ``members[b]`` are the (sorted) usable indices of bucket ``b``."""
    rng = epoch_rng(seed, epoch)
    perms, rows, bucket = [], [], []
    for b, m in enumerate(members):
        perm = rng.permutation(m) if shuffle else np.asarray(m)
        perms.append(perm)
        n = len(perm) // global_batch
        if n:
            rows.append(perm[: n * global_batch].reshape(n, global_batch))
            bucket.append(np.full(n, b, np.int32))
    if not rows:
        return EpochPlan(np.zeros((0, global_batch), np.int64), np.zeros(0, np.int32),
                         tuple(perms))
    batches = np.concatenate(rows).astype(np.int64)
    bucket_ids = np.concatenate(bucket)
    if shuffle:
        order = rng.permutation(len(batches))
        batches, bucket_ids = batches[order], bucket_ids[order]
    return EpochPlan(batches, bucket_ids, tuple(perms))


def substitutes(plan: EpochPlan, bucket: int, index: int):
    """Deterministic replacements for a bad sample: the bucket's later samples in this epoch's
    order, wrapping around (so the choice never depends on thread timing)."""
    perm = plan.perms[bucket]
    hits = np.nonzero(perm == index)[0]
    start = int(hits[0]) if len(hits) else 0
    n = len(perm)
    for step in range(1, n):
        yield int(perm[(start + step) % n])
