"""The engine that maps Flax variable trees to PyTorch state dicts and back.

Each model describes itself with one *rule*: a function from a Flax variable path
``(collection, *names)`` to ``(torch_key, kind)`` (or ``None`` for a leaf the reference does not
have). The same rule drives export and import, so the two cannot drift apart. Import fills a
template (``jax.eval_shape`` of the model's ``init``) and reports *every* missing, unexpected and
mis-shaped key at once.

Kinds (torch layout -> ours):
  plain   identity
  linear  ``[out, in] -> [in, out]``
  conv    ``OIHW -> HWIO`` (also ConvTranspose ``[in, out, kh, kw] -> [kh, kw, out, in]``)
  c11     ``[C, 1, 1] -> [C]`` (TrainableBezier on NCHW maps)
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np
from flax import traverse_util

Rule = Callable[[tuple], Optional[tuple[str, str]]]
KINDS = ("plain", "linear", "conv", "c11")


class InteropError(ValueError):
    """A checkpoint does not fit the model: lists every missing/unexpected/mis-shaped key."""


def to_torch_layout(x: np.ndarray, kind: str) -> np.ndarray:
    x = np.asarray(x)
    if kind == "plain":
        return x
    if kind == "linear":
        return np.ascontiguousarray(x.T)
    if kind == "conv":
        return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    if kind == "c11":
        return np.ascontiguousarray(x.reshape(-1, 1, 1))
    raise ValueError(f"unknown interop kind {kind!r}")


def from_torch_layout(x: np.ndarray, kind: str, shape: tuple) -> np.ndarray:
    x = np.asarray(x)
    if kind == "plain":
        y = x
    elif kind == "linear":
        y = x.T if x.ndim == 2 else x
    elif kind == "conv":
        y = x.transpose(2, 3, 1, 0) if x.ndim == 4 else x
    elif kind == "c11":
        y = x.reshape(shape) if x.size == int(np.prod(shape)) else x
    else:
        raise ValueError(f"unknown interop kind {kind!r}")
    return np.ascontiguousarray(y)


def torch_shape(shape: tuple, kind: str) -> tuple:
    """The torch-side shape that a leaf of ``shape`` has under ``kind``."""
    shape = tuple(shape)
    if kind == "linear" and len(shape) == 2:
        return shape[::-1]
    if kind == "conv" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if kind == "c11":
        return (int(np.prod(shape)), 1, 1)
    return shape


def _flat(variables: Mapping) -> dict[tuple, Any]:
    return traverse_util.flatten_dict(_unfreeze(variables))


def _unfreeze(tree):
    if hasattr(tree, "unfreeze"):
        tree = tree.unfreeze()
    if isinstance(tree, Mapping):
        return {k: _unfreeze(v) for k, v in tree.items()}
    return tree


def export_state_dict(variables: Mapping, rule: Rule, prefix: str = "",
                      extra: Optional[Mapping[str, np.ndarray]] = None) -> dict[str, np.ndarray]:
    """Flax variables -> torch-layout ``{prefix + key: float32 array}`` (plus ``extra`` buffers)."""
    out: dict[str, np.ndarray] = {}
    for path, leaf in _flat(variables).items():
        m = rule(path)
        if m is None:
            continue
        key, kind = m
        full = prefix + key
        if full in out:
            raise InteropError(f"two variables map to the same key {full!r}")
        out[full] = to_torch_layout(np.asarray(leaf), kind)
    for k, v in (extra or {}).items():
        out[prefix + k] = np.asarray(v)
    return out


def import_state_dict(state_dict: Mapping[str, np.ndarray], template: Mapping, rule: Rule,
                      prefix: str = "", ignore: Iterable[str] = (), what: str = "checkpoint",
                      strict: bool = True) -> dict:
    """Fill ``template`` (a tree of arrays or ShapeDtypeStructs) from a torch state dict.

    ``ignore`` lists torch keys (without prefix) that are known buffers with no Flax leaf
    (e.g. ``rotary_pe.inv_freq``). With ``strict`` every problem is raised together.
    """
    ignore = set(ignore)
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    flat = _flat(template)
    filled: dict[tuple, np.ndarray] = {}
    missing, mismatched, used = [], [], set()
    for path, leaf in flat.items():
        m = rule(path)
        if m is None:
            filled[path] = leaf
            continue
        key, kind = m
        shape = tuple(leaf.shape)
        want = torch_shape(shape, kind)
        if key not in sd:
            missing.append(f"{prefix}{key} {list(want)}")
            continue
        used.add(key)
        arr = np.asarray(sd[key])
        if tuple(arr.shape) != want:
            mismatched.append(f"{prefix}{key}: checkpoint {list(arr.shape)} vs model {list(want)}")
            continue
        dtype = getattr(leaf, "dtype", np.float32)
        filled[path] = from_torch_layout(arr, kind, shape).astype(dtype)
    unexpected = sorted(f"{prefix}{k}" for k in sd
                        if k not in used and k not in ignore and not _matches_ignore(k, ignore))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}):\n    " + "\n    ".join(missing))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}):\n    " + "\n    ".join(unexpected))
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}):\n    " + "\n    ".join(mismatched))
    if problems and (strict or mismatched or missing):
        raise InteropError(f"{what} does not fit the model:\n  " + "\n  ".join(problems))
    return traverse_util.unflatten_dict(filled)


def _matches_ignore(key: str, ignore: set) -> bool:
    """``ignore`` entries may be suffixes starting with '*' (e.g. '*.rotary_pe.inv_freq')."""
    return any(i.startswith("*") and key.endswith(i[1:]) for i in ignore)


def count_params(variables: Mapping, collection: str = "params") -> int:
    """Number of scalars in one collection of a variable tree."""
    tree = _unfreeze(variables).get(collection, {})
    return int(sum(np.prod(np.shape(x)) for x in traverse_util.flatten_dict(tree).values()))
