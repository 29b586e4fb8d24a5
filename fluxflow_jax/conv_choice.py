"""Which CPU convolution library runs one jitted program faster on this machine: measured once,
then remembered.

Why: a size rule calibrated on one CPU picks the wrong library on another. ``xla.jit`` moves a
program's convolutions from YNNPACK to XLA's own kernels when its largest convolution reaches
``xla.CONV_ELEMENTS_XLA`` - right on the 2-core Intel Xeon it was calibrated on (the VAE at
d=32 / 128 px: 0.90 s a step with XLA's, 1.25 s with YNNPACK's), wrong on a 2-core AMD EPYC for
the same step (1.19 s with XLA's, 1.04-1.07 s with YNNPACK's; ``benchmarks/README.md``, "Kernel
floor"). Below that size YNNPACK was level or faster on both machines, so only programs at or
above it are measured, and only when a caller asks (``xla.jit(..., measure=True)``: the training
steps, which run thousands of times; one-off jits keep the rule, whose second compile would not be
repaid).

How: both programs are compiled and run alternately, twice each, on fresh copies of the array
arguments (a donated argument is consumed by a call; the caller's arrays are never touched); YNNPACK
wins when its faster call is ``MARGIN`` faster than XLA's, else the size rule's XLA stays. The
measurement costs a second compilation and four calls, once per program and machine
(``benchmarks/README.md``, "Convolution library on CPU", has the costs): the decision is kept in
memory for the process and, when JAX's persistent compilation cache is a local folder (the entry
points turn it on by default), in ``DECISIONS_FILE`` there, keyed by this machine, jaxlib,
``XLA_FLAGS`` and the program's lowered text. So a restarted or resumed run compiles the same
program as before, and its numbers stay bit-identical; with the cache off a restart measures again
(the libraries differ only in rounding). While measuring, the process holds one more copy of the
arguments and both programs' temporaries (the caller hands the freed pages back after: ``xla.jit``).
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

DECISIONS_FILE = "fluxflow_conv_library.json"
ROUNDS = 2  # each program's first call also pays first-touch costs; the second is steady
# YNNPACK replaces the size rule's XLA only when it is this much faster: two calls each resolve
# differences of a few percent no better than chance (the base-16 discriminator, 5% faster with
# XLA's in A/B runs of 5 steps, measured 80.2 ms YNNPACK / 80.7 ms XLA's once).
MARGIN = 0.05

_decided: dict[str, dict] = {}  # this process's decisions, by key


CPU_FIELDS = ("model name", "cpu family", "model", "stepping", "flags", "Features")


def cpu_fields(cpuinfo: str | None = None) -> dict[str, str]:
    """The first value of each ``CPU_FIELDS`` key in ``/proc/cpuinfo`` (or in ``cpuinfo`` given
    as its text); {} where there is no such file (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {}
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        k, _, v = line.partition(":")
        if k.strip() in CPU_FIELDS:
            fields.setdefault(k.strip(), v.strip())
    return fields


@functools.cache
def machine_id() -> str:
    """The CPU as performance sees it: model, family/model/stepping, feature flags and the number
    of CPUs this process may use (``/proc/cpuinfo``; the platform string where there is none)."""
    fields = cpu_fields()
    if not fields:  # not Linux
        import platform
        fields["platform"] = platform.processor() or platform.machine()
    try:
        fields["cpus"] = str(len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity API (macOS)
        fields["cpus"] = str(os.cpu_count())
    return json.dumps(fields, sort_keys=True)


def program_key(lowered_text: str) -> str:
    """The key of one program's decision: machine, jaxlib, the user's XLA flags, program text."""
    import jaxlib
    h = hashlib.sha256()
    for part in (machine_id(), jaxlib.__version__, os.environ.get("XLA_FLAGS", ""), lowered_text):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def decisions_path() -> Path | None:
    """``DECISIONS_FILE`` in JAX's persistent compilation cache when that is a local folder."""
    where = jax.config.jax_compilation_cache_dir
    if not where or "://" in where:
        return None
    return Path(os.path.expanduser(where)) / DECISIONS_FILE


def _read(path: Path) -> dict[str, dict]:
    """The decisions in ``path``; {} with a warning naming it when it cannot be read."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not all(isinstance(v, dict) and v.get("library") in
                                                 ("XLA", "YNNPACK") for v in data.values()):
            raise ValueError("not a JSON object of {key: {library: XLA|YNNPACK, ...}}")
        return data
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        logging.warning("fluxflow_jax: ignoring %s (%s); the convolution library is measured "
                        "again and the file rewritten", path, e)
        return {}


def recall(key: str, path: Path | None) -> dict | None:
    """This machine's decision for the program ``key``: this process's, else ``path``'s."""
    if key not in _decided and path is not None:
        found = _read(path).get(key)
        if found is not None:
            _decided[key] = found
    return _decided.get(key)


def remember(key: str, record: dict, path: Path | None) -> None:
    """Keep ``record`` for this process and, atomically, in ``path`` (merged with what another
    process wrote there). A folder that cannot be written costs a warning, never the run."""
    _decided[key] = record
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**_read(path), key: record}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        logging.warning("fluxflow_jax: could not write %s (%s); the convolution library will be "
                        "measured again in the next process", path, e)


def _fresh(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, tree)


def time_calls(fns: Sequence[Callable], args: tuple, kwargs: dict,
               rounds: int = ROUNDS) -> list[float]:
    """The fastest of ``rounds`` calls of each of ``fns``, alternating, in seconds; every call
    gets fresh copies of the array arguments. Compile the functions before: this times calls."""
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            a, kw = _fresh((args, kwargs))
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*a, **kw))
            best[i] = min(best[i], time.perf_counter() - t0)
            del a, kw
    return best


def measure(xla_fn: Callable, ynn_fn: Callable, args: tuple, kwargs: dict) -> dict:
    """Compile both programs, time them (:func:`time_calls`) and return the decision record."""
    for fn in (xla_fn, ynn_fn):
        fn.lower(*args, **kwargs).compile()  # the jitted call reuses this executable
    t_xla, t_ynn = time_calls((xla_fn, ynn_fn), args, kwargs)
    return {"library": "YNNPACK" if t_ynn < (1 - MARGIN) * t_xla else "XLA",
            "seconds": {"XLA": round(t_xla, 6), "YNNPACK": round(t_ynn, 6)},
            "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
