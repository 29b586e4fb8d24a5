"""Run checkpoints: a thin wrapper over ``orbax.checkpoint.CheckpointManager``.

One checkpoint step holds three items (``ocp.args.Composite``):

* ``state`` - the run's pytree (params, optimizer states, EMA, step, RNG key data) via ``StandardSave``;
* ``data``  - the data-iterator state (JSON), so the input pipeline resumes where it stopped; on
  multi-host runs whose hosts have different states, every host's (each restores its own);
* ``meta``  - run metadata (JSON): stage name, epoch, config hash, ...

Why these choices:

* Orbax writes every step into ``<step>.orbax-checkpoint-tmp-*`` and renames it into place only when
  all items are written, so a crash mid-save leaves the last good step intact; leftover tmp dirs are
  removed when the next ``Checkpointer`` opens the directory.
* Restoring against the *abstract* state (``jax.eval_shape`` / ``ShapeDtypeStruct`` with shardings)
  gives back optax namedtuples instead of plain dicts, and places every array directly on the current
  device/sharding layout, so a run can resume on a different device count.
* Orbax's own shape error does not say *which* leaf mismatched; we compare the target with the
  checkpoint's metadata first and name every mis-shaped, missing and unexpected leaf at once.
* Typed PRNG keys cannot be serialised; the loop stores ``jax.random.key_data(key)``. A typed key that
  reaches ``save`` anyway is stored as its key data, and re-wrapped on restore when the target leaf is
  a typed key, so either convention round-trips.
* Replicated leaves smaller than ``MIN_REPLICA_SLICE_BYTES`` a replica are written whole by one
  replica (``_write_small_replicated_leaves_whole``), not split across the replicas as orbax does
  by default off GPUs: each split is an eager slice that compiles once per leaf shape.

No pickle is involved anywhere: arrays go to tensorstore/zarr, the rest to JSON.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from jax.experimental import multihost_utils

from fluxflow_jax.sharding import path_str

PyTree = Any


class CheckpointError(RuntimeError):
    """No intact checkpoint can be restored (the message names the directory and the way out)."""


class CheckpointMismatchError(ValueError):
    """The restore target does not fit the stored checkpoint; the message lists every leaf at fault."""


# Orbax's replica-parallel save (its default except on GPUs) cuts every replicated array into one
# slice per replica, so that replicas on several hosts share the write. Each cut is an eager jax
# slice, compiled once per leaf shape: 344 compiles (11.7 s) in a 15-step run of the test-size
# demo on 8 CPU devices, for leaves of a few KB whose whole write takes microseconds. Below this
# size a slice, one replica writes the leaf whole; large leaves on a pod still share the write.
MIN_REPLICA_SLICE_BYTES = 8 << 20


def _write_small_replicated_leaves_whole() -> None:
    """Registers orbax's ``jax.Array`` handler with ``MIN_REPLICA_SLICE_BYTES`` (once a process).

    The new handler keeps the registered one's array-metadata store (orbax takes it as an argument
    and exposes no public getter), so only the replica-parallel threshold changes.
    """
    current = ocp.type_handlers.get_type_handler(jax.Array)
    if getattr(current, "_min_slice_bytes_for_replica_parallel", None) == MIN_REPLICA_SLICE_BYTES:
        return
    handler = ocp.type_handlers.ArrayHandler(
        array_metadata_store=getattr(current, "_array_metadata_store", None),
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax warns of every override; this one is ours
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_logging.set_verbosity(level)


# ----------------------------------------------------------------------------------------------------
# pytree helpers
# ----------------------------------------------------------------------------------------------------


def _is_typed_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _encode_keys(state: PyTree) -> PyTree:
    """Typed PRNG key leaves -> their uint32 key data (the only form that can be serialised)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, state)


def _on_any_process(flag: bool) -> bool:
    """Whether ``flag`` holds on any host (a small all-gather in multi-process runs)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


def _default_sharding() -> jax.sharding.Sharding:
    """Where a target leaf without a sharding goes: replicated over all devices (one device -> that one)."""
    devices = np.asarray(jax.devices())
    mesh = jax.sharding.Mesh(devices, ("replica",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _restore_leaf_target(x: Any, default_sharding: jax.sharding.Sharding) -> Any:
    """The Orbax restore target for one leaf of the caller's abstract state.

    jax arrays and ShapeDtypeStructs become ShapeDtypeStructs with a sharding (the caller's, or
    replicated), so they come back as device arrays; numpy arrays and Python scalars are passed on
    as they are, so they come back as numpy arrays / Python scalars.
    """
    if _is_typed_key(x):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
        sharding = getattr(x, "sharding", None) or default_sharding
        if not isinstance(sharding, jax.sharding.NamedSharding) or len(data.shape) > len(x.shape):
            # a key's sharding covers the key shape only; key data has a trailing dim: replicate it.
            sharding = default_sharding
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, jax.ShapeDtypeStruct):
        sharding = x.sharding if x.sharding is not None else default_sharding
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return x


def _wrap_key(restored: Any, target: Any) -> Any:
    if not _is_typed_key(target):
        return restored
    impl = getattr(
        target.dtype, "_impl", None
    )  # the key's PRNG implementation (threefry, rbg, ...)
    return jax.random.wrap_key_data(restored, impl=impl)


def _shape_of(x: Any) -> tuple:
    if hasattr(x, "shape"):
        return tuple(x.shape)
    return ()  # Python scalar


def check_compatible(target: PyTree, stored_metadata: PyTree, *, where: str = "checkpoint") -> None:
    """Raise ``CheckpointMismatchError`` naming every leaf whose path or shape differs.

    ``target`` is the (already key-encoded) restore target, ``stored_metadata`` the Orbax metadata
    tree of the stored item (leaves carry ``.shape``).
    """
    tgt = {path_str(p, "."): _shape_of(v) for p, v in jax.tree_util.tree_flatten_with_path(target)[0]}
    stored_leaves = jax.tree_util.tree_flatten_with_path(
        stored_metadata, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict)
    )[0]
    stored = {path_str(p, "."): tuple(v.shape) if v.shape is not None else () for p, v in stored_leaves}
    missing = sorted(set(tgt) - set(stored))
    unexpected = sorted(set(stored) - set(tgt))
    misshaped = sorted(k for k in set(tgt) & set(stored) if tgt[k] != stored[k])
    if not (missing or unexpected or misshaped):
        return
    lines = [f"restore target does not match {where}:"]
    for k in misshaped:
        lines.append(f"  shape mismatch at '{k}': checkpoint {stored[k]} vs target {tgt[k]}")
    if missing:
        lines.append(f"  missing in checkpoint ({len(missing)}): " + ", ".join(missing[:20]))
    if unexpected:
        lines.append(f"  not in target ({len(unexpected)}): " + ", ".join(unexpected[:20]))
    raise CheckpointMismatchError("\n".join(lines))


def _check_json(obj: Any, name: str) -> None:
    """Fail before any file is written if an item cannot be stored as strict JSON."""
    try:
        json.dumps(obj, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"checkpoint item '{name}' is not JSON-serialisable (strict, no NaN): {e}"
        ) from e


PER_PROCESS = "__per_process__"


def _gather_json(obj: Any) -> list[Any]:
    """Every process's ``obj`` (JSON), in process order. A collective: all processes call it."""
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([raw.size], np.int64))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[: raw.size] = raw
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(r[: int(n)]).decode()) for r, n in zip(rows, np.ravel(sizes))]


def _collect_data_states(data_state: dict) -> dict:
    """The data item to store: the one state when all hosts agree, else every host's state.

    Orbax writes JSON items from process 0 only; host-local iterator states (a webdataset
    loader's shard cursors, its ``process_index``) would otherwise come back as process 0's on
    every host and fail or replay the wrong samples.
    """
    if jax.process_count() == 1:
        return data_state
    states = _gather_json(data_state)
    if all(st == states[0] for st in states):
        return data_state
    return {PER_PROCESS: states}


def _own_data_state(stored: dict, where: str) -> dict:
    """This host's data state from what ``_collect_data_states`` stored."""
    if PER_PROCESS not in stored:
        return stored
    states = stored[PER_PROCESS]
    if len(states) != jax.process_count():
        raise CheckpointMismatchError(
            f"{where}: the data-iterator state was saved by {len(states)} processes, this run has "
            f"{jax.process_count()}; resume with {len(states)} processes (host-local loader "
            "positions cannot be redistributed)")
    return dict(states[jax.process_index()])


# ----------------------------------------------------------------------------------------------------
# Checkpointer
# ----------------------------------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores ``(state, data_state, meta)`` steps under ``directory``.

    Args:
      directory: where the step folders go (created).
      max_to_keep: newest steps kept; older ones are deleted after a successful save.
      save_interval_steps: ``should_save`` is true at positive multiples of this (0/None: never by steps).
        Multiples, not "N steps since the last save", so a resumed run saves at the same steps.
      save_interval_minutes: also true when this many minutes passed since the last save (or since
        opening); on multi-host runs process 0's clock decides for everyone.
      async_save: write in a background thread; ``save`` returns once arrays are copied to host, so
        the caller may donate the state buffers to the next step right away.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        max_to_keep: int = 3,
        save_interval_steps: int = 1000,
        save_interval_minutes: float | None = None,
        async_save: bool = True,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"checkpoint max_to_keep must be >= 1, got {max_to_keep}")
        if save_interval_steps is not None and save_interval_steps < 0:
            raise ValueError(
                f"checkpoint save_interval_steps must be >= 0, got {save_interval_steps}"
            )
        if save_interval_minutes is not None and not save_interval_minutes > 0:
            raise ValueError(
                f"checkpoint save_interval_minutes must be > 0, got {save_interval_minutes}"
            )
        self.directory = Path(directory).expanduser().absolute()
        self.save_interval_steps = int(save_interval_steps or 0)
        self.save_interval_minutes = save_interval_minutes
        _write_small_replicated_leaves_whole()
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=1,  # the interval decision is ours (steps and/or minutes)
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # remove what an interrupted save left behind
            create=True,
        )
        self._manager = self._open_manager()
        self._last_save_time = time.monotonic()

    def _open_manager(self) -> ocp.CheckpointManager:
        # Handlers named up front, so a freshly opened manager can read a step's metadata (for the
        # shape check) before anything was saved or restored through it.
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        return ocp.CheckpointManager(self.directory, options=self._options, item_handlers=handlers)

    @property
    def damaged_dir(self) -> Path:
        """Where damaged steps are moved (beside the step folders, never deleted)."""
        return self.directory.parent / f"{self.directory.name}.damaged"

    def _move_aside(self, step: int) -> Path:
        """Move a step folder aside: process 0 moves it (the folder is shared), all hosts wait."""
        self._manager.close()
        dest = self.damaged_dir / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            self.damaged_dir.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).replace(dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"fluxflow_jax checkpoint {step} moved aside")
        self._manager = self._open_manager()
        return dest

    # -- queries -------------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Finalised steps on disk, ascending (tmp dirs of unfinished saves are not steps)."""
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _time_due(self) -> bool:
        if self.save_interval_minutes is None:
            return False
        due = (time.monotonic() - self._last_save_time) >= 60.0 * self.save_interval_minutes
        if jax.process_count() > 1:  # every host must take the same decision, or the save deadlocks
            from jax.experimental import multihost_utils

            due = bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))
        return due

    def should_save(self, step: int) -> bool:
        """True when ``step`` is due by the step interval or the time interval and not yet saved."""
        step = int(step)
        latest = self.latest_step()
        if step <= 0 or (latest is not None and step <= latest):
            return False
        by_steps = self.save_interval_steps > 0 and step % self.save_interval_steps == 0
        return by_steps or self._time_due()

    # -- save / restore ------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: PyTree,
        data_state: dict | None,
        meta: dict | None,
        *,
        force: bool = False,
    ) -> bool:
        """Save ``step`` if due (or ``force``); returns whether a save was started.

        Saving a step that already exists is a no-op (False) - the loop may force a final save at a
        step an interval save just wrote. A step below the latest one is an error: keep-N would delete
        the newer steps' neighbours and ``latest_step`` would no longer be the run's position.
        """
        step = int(step)
        if not force and not self.should_save(step):
            return False
        latest = self.latest_step()
        if latest is not None and step == latest:
            return False
        if latest is not None and step < latest:
            raise ValueError(
                f"checkpoint step {step} is below the latest saved step {latest} in {self.directory}; "
                "steps must increase (use a fresh directory for a new run)"
            )
        data_state = {} if data_state is None else data_state
        meta = {} if meta is None else meta
        _check_json(data_state, "data")
        _check_json(meta, "meta")
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_encode_keys(state)),
            data=ocp.args.JsonSave(_collect_data_states(data_state)),
            meta=ocp.args.JsonSave(meta),
        )
        started = self._manager.save(step, args=args, force=True)
        if started:
            self._last_save_time = time.monotonic()
        return bool(started)

    def restore(
        self, abstract_state: PyTree, step: int | None = None
    ) -> tuple[PyTree, dict, dict] | None:
        """Restore ``(state, data_state, meta)`` at ``step`` (default: latest); None if there is none.

        ``abstract_state`` gives the structure, shapes, dtypes and shardings of the result: a
        ``jax.eval_shape`` tree (leaves without a sharding are replicated), or a concrete state.
        Without ``step``, a step that cannot be read (truncated files, bad JSON, a half-copied
        folder) is moved to ``damaged_dir`` with a message and the next older step is tried; a
        state of another shape (``CheckpointMismatchError``) is a config change, not damage.
        """
        self.wait_until_finished()  # a save still in flight is part of "what is on disk"
        if step is not None:
            return self._restore_step(abstract_state, int(step))
        moved = []
        while (latest := self.latest_step()) is not None:
            try:
                restored, why = self._restore_step(abstract_state, latest), ""
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - Orbax/TensorStore/JSON errors vary by damage
                restored, why = None, " ".join(str(e).split())[:160] or type(e).__name__
            if not _on_any_process(bool(why)):  # every host falls back together, or none does
                return restored
            why = why or "another host could not read it"
            dest = self._move_aside(latest)
            moved.append(latest)
            print(f"[checkpoint] step {latest} in {self.directory} cannot be read ({why}); "
                  f"moved to {dest}, trying the previous step", flush=True)
        if moved:
            raise CheckpointError(
                f"{self.directory}: no intact checkpoint (damaged steps {moved} moved to "
                f"{self.damaged_dir}); remove {self.directory} to restart this stage from its start")
        return None

    def _restore_step(self, abstract_state: PyTree, step: int) -> tuple[PyTree, dict, dict]:
        if step not in self.all_steps():
            raise FileNotFoundError(
                f"no checkpoint step {step} in {self.directory}; available: {self.all_steps()}"
            )
        default_sharding = _default_sharding()
        target = jax.tree.map(lambda x: _restore_leaf_target(x, default_sharding), abstract_state)
        stored = self._manager.item_metadata(step)["state"]
        if (
            stored is not None
        ):  # None: no metadata readable; Orbax's own (less precise) checks remain
            check_compatible(
                target, getattr(stored, "tree", stored), where=f"{self.directory}/{step}/state"
            )
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        )
        restored = self._manager.restore(step, args=args)
        state = jax.tree.map(_wrap_key, restored["state"], abstract_state)
        data = _own_data_state(dict(restored["data"] or {}), f"{self.directory}/{step}/data")
        return state, data, dict(restored["meta"] or {})

    # -- lifecycle -----------------------------------------------------------------------------------

    def wait_until_finished(self) -> None:
        """Block until a background save has been written and renamed into place (re-raises its error)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and close; on multi-host runs also a barrier.

        Every host leaves ``close`` together, so whatever process 0 wrote before it (the stage's
        param file, exports) is on disk before any host goes on to read it - without the barrier
        host 1 starts the next stage while host 0 is still writing the previous stage's params.
        """
        self._manager.wait_until_finished()
        self._manager.close()
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"fluxflow_jax checkpointer close {self.directory}")

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
