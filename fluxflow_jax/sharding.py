"""Device mesh, parameter sharding rules and batch placement.

One code path for 1 CPU, 8 GPUs or a TPU pod (DESIGN.md "sharding"): the mesh comes from the config
(``mesh=(('data', -1),)`` by default, optionally ``('fsdp', n)``), every array of the train state
gets a ``NamedSharding`` chosen by regex rules on its '/'-joined path, and batches are placed with
``jax.make_array_from_process_local_data`` so each host hands over only its own rows.

Rules (the big_vision pattern): an ordered list of ``(regex, spec)``; the first regex that
``re.search``-matches the path wins; unmatched arrays are replicated. ``spec`` is one of

* ``'replicate'`` / ``None`` / ``()`` / ``PartitionSpec()``: a full copy on every device;
* ``'fsdp'``: shard the largest dimension divisible by the ``fsdp`` axis size over ``fsdp``
  (replicate when no dimension divides, e.g. scalars, or when the mesh has no ``fsdp`` axis);
* a ``PartitionSpec`` or a tuple/list of axis names (``None`` for an unsharded dim), which must
  have no more entries than the array has dimensions.

The mesh axes are created as ``AxisType.Auto`` (``jax.make_mesh`` now defaults to Explicit,
which would switch every jitted step into sharding-in-types mode).
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXES = ("data", "fsdp")  # mesh axes the batch is split over (FSDP is data parallel too)
KNOWN_AXES = ("data", "fsdp", "model")
MeshConfig = Sequence[Sequence[Any]]
Spec = str | None | P | Sequence[str | None]
Rules = Sequence[tuple[str, Spec]]


# ----------------------------------------------------------------------------------------------
# Mesh


def mesh_shape(mesh_cfg: MeshConfig, n_devices: int, key: str = "mesh") -> tuple[tuple[str, ...],
                                                                                   tuple[int, ...]]:
    """Resolve ``((name, size), ...)`` with at most one ``-1`` into concrete axis sizes.

    Raises ValueError naming ``key`` when the sizes do not multiply to ``n_devices``.
    """
    names, sizes = [], []
    for entry in mesh_cfg:
        if len(entry) != 2:
            raise ValueError(f"config.{key}: each entry must be (axis_name, size), got {entry!r}")
        name, size = str(entry[0]), int(entry[1])
        if name not in KNOWN_AXES:
            raise ValueError(f"config.{key}: unknown mesh axis {name!r}; known: {KNOWN_AXES}")
        if name in names:
            raise ValueError(f"config.{key}: axis {name!r} appears twice")
        if size == 0 or size < -1:
            raise ValueError(f"config.{key}: axis {name!r} has size {size}; use a positive size "
                             "or -1 for 'all remaining devices'")
        names.append(name)
        sizes.append(size)
    if not names:
        raise ValueError(f"config.{key} is empty; the default is (('data', -1),)")
    if sizes.count(-1) > 1:
        raise ValueError(f"config.{key}: at most one axis may have size -1, got {list(mesh_cfg)}")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % fixed:
            raise ValueError(f"config.{key}={list(mesh_cfg)}: the fixed axis sizes ({fixed}) do "
                             f"not divide the {n_devices} devices")
        sizes[sizes.index(-1)] = n_devices // fixed
    if math.prod(sizes) != n_devices:
        raise ValueError(f"config.{key}={list(mesh_cfg)} needs {math.prod(sizes)} devices, "
                         f"{n_devices} are available")
    return tuple(names), tuple(sizes)


def make_mesh(mesh_cfg: MeshConfig = (("data", -1),),
              devices: Sequence[jax.Device] | None = None, key: str = "mesh") -> Mesh:
    """A ``Mesh`` over ``devices`` (default: all global devices) with Auto axis types.

    Uses ``mesh_utils.create_device_mesh`` for the physical layout (ICI-aware on TPU) when all
    devices are used, and a plain reshape for an explicit device subset (tests, benchmarks).
    """
    devs = list(jax.devices() if devices is None else devices)
    names, sizes = mesh_shape(mesh_cfg, len(devs), key)
    if devices is None:
        from jax.experimental import mesh_utils
        arr = mesh_utils.create_device_mesh(sizes, devices=devs)
    else:
        arr = np.asarray(devs, dtype=object).reshape(sizes)
    return Mesh(arr, names, axis_types=(AxisType.Auto,) * len(names))


def data_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch dimension is split over (``data`` and ``fsdp`` where present)."""
    return tuple(a for a in mesh.axis_names if a in DATA_AXES)


def data_size(mesh: Mesh) -> int:
    """Number of batch shards: the product of the data-parallel axis sizes."""
    return math.prod(mesh.shape[a] for a in data_axes(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel axes, the rest replicated."""
    axes = data_axes(mesh)
    if not axes:
        return replicated(mesh)
    return NamedSharding(mesh, P(axes if len(axes) > 1 else axes[0]))


def to_host(tree: Any) -> Any:
    """Numpy copies of a pytree of (possibly global) arrays.

    Arrays split across processes (``fsdp`` over hosts) have no full copy on any one host; they
    are gathered with ``process_allgather``, a collective, so in a multi-process run every
    process must call this at the same point (the loop does; process 0 then writes the files).
    """
    leaves, treedef = jax.tree.flatten(tree)
    split = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)
             and not x.is_fully_addressable and not x.is_fully_replicated]
    if split:
        gathered = multihost_utils.process_allgather([leaves[i] for i in split], tiled=True)
        for i, x in zip(split, gathered):
            leaves[i] = x
    return jax.tree.unflatten(treedef, [np.asarray(jax.device_get(x)) for x in leaves])


# ----------------------------------------------------------------------------------------------
# Parameter rules


def path_str(path: Sequence[Any], sep: str = "/") -> str:
    """A pytree leaf's key path as ``a/b/0/c`` (dict keys, dataclass fields, sequence indices):
    the spelling sharding rules match (``sep='/'``) and checkpoint messages print (``'.'``)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return sep.join(parts)


def fsdp_spec(shape: Sequence[int], mesh: Mesh, axis: str = "fsdp") -> P:
    """Shard the largest dimension divisible by the ``axis`` size (ties: the last one)."""
    n = mesh.shape.get(axis, 1)
    if n <= 1 or not shape:
        return P()
    best = None
    for i, s in enumerate(shape):
        if s % n == 0 and s >= n and (best is None or s >= shape[best]):
            best = i
    if best is None:
        return P()
    spec = [None] * len(shape)
    spec[best] = axis
    return P(*spec)


def _explicit_spec(spec: Any, shape: Sequence[int], mesh: Mesh, path: str, rule: str) -> P:
    spec = spec if isinstance(spec, P) else P(*spec)
    if len(spec) > len(shape):
        raise ValueError(f"sharding rule {rule!r}: spec {spec} has {len(spec)} entries but "
                         f"{path!r} has shape {tuple(shape)}")
    for dim, entry in enumerate(spec):
        axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        for a in axes:
            if a not in mesh.axis_names:
                raise ValueError(f"sharding rule {rule!r}: axis {a!r} is not in the mesh "
                                 f"{tuple(mesh.axis_names)} (path {path!r})")
        n = math.prod(mesh.shape[a] for a in axes)
        if shape[dim] % n:
            raise ValueError(f"sharding rule {rule!r}: dim {dim} of {path!r} (shape "
                             f"{tuple(shape)}) is not divisible by mesh axes {axes} of size {n}")
    return spec


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, rules: Rules) -> P:
    """The PartitionSpec the first matching rule gives ``path`` (replicate if none matches)."""
    for regex, spec in rules:
        if re.search(regex, path) is None:
            continue
        if spec is None or spec == "replicate" or (not isinstance(spec, str) and len(spec) == 0):
            return P()
        if spec == "fsdp":
            return fsdp_spec(shape, mesh)
        if isinstance(spec, str):
            raise TypeError(f"sharding rule {regex!r}: spec {spec!r} must be 'replicate', "
                             "'fsdp', a PartitionSpec or a tuple of mesh axis names")
        return _explicit_spec(spec, shape, mesh, path, regex)
    return P()


def default_rules(mesh: Mesh) -> list[tuple[str, Spec]]:
    """Replicate everything, or FSDP-shard every array when the mesh has an ``fsdp`` axis > 1."""
    return [(".*", "fsdp")] if mesh.shape.get("fsdp", 1) > 1 else [(".*", "replicate")]


def check_rules(rules: Iterable[Any], key: str = "sharding_rules") -> list[tuple[str, Spec]]:
    """Normalise config rules (tuples from ml_collections) and compile-check every regex."""
    out = []
    for i, rule in enumerate(rules):
        if len(rule) != 2:
            raise ValueError(f"config.{key}[{i}] must be (regex, spec), got {rule!r}")
        regex, spec = rule
        try:
            re.compile(regex)
        except re.error as e:
            raise ValueError(f"config.{key}[{i}]: bad regex {regex!r}: {e}") from e
        out.append((regex, spec))
    return out


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """A pytree of ``NamedSharding`` matching ``tree`` (arrays or ShapeDtypeStructs).

    Paths are '/'-joined from the root of ``tree`` (e.g. ``params/flow/vae_to_dmodel/kernel``,
    ``opt_state/vae/0/mu/compressor/...``), so one FSDP rule also shards optimizer moments.
    Typed PRNG-key leaves and other non-array leaves are replicated.
    """
    rules = default_rules(mesh) if rules is None else check_rules(rules)

    def one(path, leaf):
        shape = getattr(leaf, "shape", ())
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
            return replicated(mesh)
        return NamedSharding(mesh, spec_for(path_str(path), tuple(shape), mesh, rules))

    return jax.tree_util.tree_map_with_path(one, tree)


# ----------------------------------------------------------------------------------------------
# Batches


def put_batch(batch: Mapping[str, Any], mesh: Mesh, *, key: str = "batch_size") -> dict:
    """Place a host-local batch (numpy arrays, leading dim = this host's rows) on the mesh.

    Works for one host and for many: the global batch is ``local rows * process_count`` and each
    host contributes its own rows (``jax.make_array_from_process_local_data``). Raises ValueError
    naming ``key`` when the global batch does not split evenly over the data-parallel axes.
    """
    sharding = batch_sharding(mesh)
    n_shards = data_size(mesh)
    n_proc = jax.process_count()
    out = {}
    rows = None
    for name, local in batch.items():
        local = np.asarray(local) if not isinstance(local, jax.Array) else local
        if local.ndim == 0:
            raise ValueError(f"put_batch: batch[{name!r}] is a scalar; every entry needs a "
                             "leading batch dimension")
        if rows is None:
            rows = local.shape[0]
        elif local.shape[0] != rows:
            raise ValueError(f"put_batch: batch[{name!r}] has {local.shape[0]} rows, other "
                             f"entries have {rows}")
        global_rows = local.shape[0] * n_proc
        if global_rows % n_shards:
            raise ValueError(
                f"config.{key}: the global batch {global_rows} ({local.shape[0]} rows x "
                f"{n_proc} hosts) is not divisible by the {n_shards} data-parallel shards of "
                f"the mesh {dict(mesh.shape)}")
        out[name] = jax.make_array_from_process_local_data(
            sharding, local, (global_rows,) + tuple(local.shape[1:]))
    return out
