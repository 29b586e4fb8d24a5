"""``jit`` that picks, per jitted function, which library runs its convolutions on CPU, and
``jit_once`` for jits that run once (parameter init), compiled more cheaply.

Why: on CPU, jaxlib 0.10 hands every convolution to YNNPACK (a library fusion). On large
convolutions its kernel gradient ("backprop filter") is 2-3x slower than XLA's own convolution;
on small ones YNNPACK is 10-25% faster. Measured on a 2-core Intel Xeon (3x3 same-width conv,
forward + both gradients, YNNPACK / XLA time; ``benchmarks/README.md`` has the commands):

* batch 2: 128 px x 128 ch 281 / 132 ms, 64 px x 64 ch 16.7 / 10.8 ms, 32 px x 32 ch 1.20 / 1.62 ms;
* batch 8: 32 px x 64 ch 17.4 / 8.4 ms, 16 px x 32 ch 1.09 / 1.70 ms.

The crossover is at about ``2**19`` elements (``N*H*W*C``) in a convolution's input or output:
below, the two are level or YNNPACK is ahead; above, XLA's wins, more the larger it is. Whole
training steps (``benchmarks/conv_backends.py``): the discriminator at base 64 / 128 px 7.0 s ->
3.5 s and the VAE at d=32 / 128 px 1.25 s -> 0.90 s with XLA's convolutions, while the
discriminator at base 16 / 64 px is 67 ms with YNNPACK and 82 ms without. So :func:`jit`
traces the function at its first call (or ``.lower``), finds its largest convolution, and
compiles it with YNNPACK's default fusion set minus ``INDIVIDUAL_CONVOLUTION`` when that
convolution reaches ``CONV_ELEMENTS_XLA``. That rule was calibrated on the Intel machine; on a
2-core AMD EPYC the d=32 VAE step at 128 px is faster with YNNPACK (1.04-1.07 s against 1.19 s),
so no size rule fits every CPU. ``jit(..., measure=True)`` (the training steps) therefore times
both programs at the first call of one that reaches the threshold and keeps YNNPACK's if it is
clearly (``conv_choice.MARGIN``) faster, measured once per machine and program
(:mod:`fluxflow_jax.conv_choice`). The choice holds for the jitted function's later calls (a
training stage keeps its shapes; aspect buckets change them little), and it only ever changes
speed, never the numbers beyond rounding.

The options are per compilation (``jax.jit(..., compiler_options=...)``), so nothing global
changes for a program that imports this package, and they are part of the persistent
compilation cache's key. A user who sets ``--xla_cpu_experimental_ynn_fusion_type`` in
``XLA_FLAGS`` keeps their choice. Off CPU nothing is passed.

Memory: XLA's compiler frees its working memory when a compilation ends, but glibc's allocator
keeps the freed pages in the process (the VAE step at d=64 / 128 px: 1602 MB resident after
compiling, 939 MB after ``malloc_trim``), and the step's own buffers then come on top, so the
process peaks at compiler heap + step. The first :func:`jit` or :func:`jit_once` therefore
registers a ``jax.monitoring`` listener that hands those pages back (``malloc_trim(0)``) after
every backend compilation of at least ``TRIM_AFTER_COMPILE_S``, before the executable first
runs (``benchmarks/README.md``, "Peak memory"). It frees only memory nothing holds; where the C
library has no ``malloc_trim`` (not glibc) nothing is done.

Host runtime: :func:`configure_cpu_host`, which the entry points call before JAX starts, runs
single-device CPU computations on the calling thread and keeps glibc's main heap mapped, so a
step's temporaries reuse the last step's pages instead of being mapped and zero-filled anew
(the Phase 1 flow step 1.33x faster on 2 cores; its docstring has the why).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax

from fluxflow_jax import conv_choice

YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
# jaxlib 0.10's default YNN fusion set without INDIVIDUAL_CONVOLUTION (checked on the compiled
# HLO of the flow step: the same fusions as the default, less the convolutions).
CPU_YNN_FUSIONS = ("LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
                   "LIBRARY_FUSION_TYPE_REDUCE")
CONV_ELEMENTS_XLA = 2 ** 19


def options_for(backend: str, xla_flags: str) -> dict[str, str] | None:
    """The options that move convolutions to XLA on ``backend``, given the user's ``XLA_FLAGS``."""
    if backend != "cpu" or YNN_FUSION_FLAG in xla_flags:
        return None
    return {YNN_FUSION_FLAG: CPU_YNN_FUSIONS}


def _accepted(opts: dict[str, Any], what: str) -> dict[str, Any] | None:
    """``opts`` if this jaxlib compiles with them, else None with a warning (speed only)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=opts).lower(1.0).compile()
    except Exception as e:  # noqa: BLE001 - any rejection means: compile without the option
        logging.warning("fluxflow_jax: this jaxlib rejects %s (%s); %s", sorted(opts),
                        str(e).splitlines()[0][:200], what)
        return None
    return opts


@functools.cache
def compiler_options() -> dict[str, str] | None:
    """This process's options for large-convolution jits, checked once against jaxlib.

    A jaxlib that no longer knows the flag would reject every compilation; then the options are
    dropped with a warning (a speed difference only, never a numerical one).
    """
    opts = options_for(jax.default_backend(), os.environ.get("XLA_FLAGS", ""))
    if opts is None:
        return None
    return _accepted(opts, "convolutions stay on its default backend (slower kernel gradients "
                           "on CPU)")


# One-time jits (parameter init) on CPU: LLVM at -O1 instead of -O3. Init runs once and is
# compile-bound: every model at the sizes of ``benchmarks/step_times.py --init_ab`` (2-core AMD
# EPYC), tiny 19.6 -> 10.6 s and small 22.9 -> 13.5 s. The values are the same except the
# spectral-norm u/v, whose norm is summed in another order (a few rounding steps;
# tests/test_xla.py).
ONCE_OPTIONS = {"xla_backend_optimization_level": 1}


@functools.cache
def once_options() -> dict[str, Any] | None:
    """Options for a jit that runs once (:func:`jit_once`); None off CPU or when the user's
    ``XLA_FLAGS`` set the level."""
    if jax.default_backend() != "cpu" or "xla_backend_optimization_level" in os.environ.get(
            "XLA_FLAGS", ""):
        return None
    return _accepted(dict(ONCE_OPTIONS), "one-time jits compile at the default level")


TRIM_AFTER_COMPILE_S = 0.5  # shorter compilations leave little heap; a trim costs milliseconds
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax.monitoring


@functools.cache
def _glibc(symbol: str) -> Callable[..., int] | None:
    """``symbol`` of the process's C library when it is glibc's, else None."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), symbol) if name else None
    except (OSError, AttributeError):  # no C library by that name, or not glibc
        return None


def _malloc_trim() -> Callable[[int], int] | None:
    return _glibc("malloc_trim")


def release_compile_heap(event: str, duration_secs: float, **_: Any) -> None:
    """``jax.monitoring`` listener: after a backend compilation of at least
    ``TRIM_AFTER_COMPILE_S``, return the allocator's free pages to the OS (module doc)."""
    trim = _malloc_trim()
    if event == BACKEND_COMPILE_EVENT and duration_secs >= TRIM_AFTER_COMPILE_S and trim:
        trim(0)


@functools.cache
def _install_heap_release() -> None:
    jax.monitoring.register_event_duration_secs_listener(release_compile_heap)


# glibc ``mallopt`` parameters (malloc.h) and the values configure_cpu_host sets.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
KEEP_HEAP_BYTES = 2 ** 31 - 1  # mallopt takes an int: the largest trim threshold it accepts
_ASYNC_DISPATCH = "jax_cpu_enable_async_dispatch"
_USER_ALLOCATOR_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX")


CACHE_ENV = "FLUXFLOW_JAX_CACHE"  # the persistent compilation cache's folder ('none': off)
DEFAULT_CACHE = "~/.cache/fluxflow_jax/xla"
CACHE_MIN_COMPILE_S = 0.5  # JAX's default (1 s) leaves out the eval and sampling programs
_CACHE_MIN_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def cache_path() -> str:
    """The compilation cache folder the entry points use by default: ``$FLUXFLOW_JAX_CACHE``,
    else ``DEFAULT_CACHE``."""
    return os.environ.get(CACHE_ENV, DEFAULT_CACHE)


def enable_compilation_cache(path: str | None = None) -> None:
    """Persist compiled executables across processes in ``path`` (default :func:`cache_path`;
    ``''`` or ``'none'`` turns it off). The same program loads the same executable, so a resumed
    run stays bit-identical to an uninterrupted one and a restart skips recompiling its steps; a
    second ``generate``/``evaluate`` on the same model skips XLA altogether.

    Programs that compile in under ``CACHE_MIN_COMPILE_S`` are not stored, unless the user set
    JAX's own ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``, which then holds.
    """
    path = cache_path() if path is None else path
    if not path or path.lower() == "none":
        return
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    if _CACHE_MIN_ENV not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_S)


def configure_cpu_host() -> str:
    """Run single-device CPU computations on the calling thread, on heap memory that stays mapped
    between steps. Call before JAX starts its backends (the entry points do, first thing).

    Why: XLA:CPU allocates a step's temporaries as one block per execution, freed at its end. By
    default the execution runs on a runtime thread, whose glibc arena cannot hold a block that
    large, so glibc maps it fresh every step (``mmap``) and unmaps it after: the kernel zeroes
    and faults in every page again - 52 500 page faults and 110-160 ms of system time per Phase 1
    flow step (205 MB of temporaries), a quarter of its CPU time (``perf``, benchmarks/README.md,
    "Host allocator"). Executed on the calling thread, the block comes from glibc's main heap;
    with ``mmap`` off for that heap and its automatic trim raised to ``KEEP_HEAP_BYTES``, the
    next step reuses the same pages. The compiled programs and their numbers do not change.
    Resident memory stays at the step's high-water mark between steps (it reached it during every
    step before); a step with more than ``KEEP_HEAP_BYTES`` of temporaries is still handed back
    to the OS after each call, as before.

    Returns ``'on'``, or why nothing was changed: the backends already started (the dispatch
    mode is fixed when the CPU client is made), the user set the dispatch mode
    (``JAX_CPU_ENABLE_ASYNC_DISPATCH``) or glibc's allocator (``GLIBC_TUNABLES`` malloc keys,
    ``MALLOC_*_`` variables), or the C library is not glibc. Multi-device computations keep
    JAX's asynchronous dispatch whatever this does.
    """
    from jax._src import xla_bridge  # backends_are_initialized has no public name

    if xla_bridge.backends_are_initialized():
        return "skipped: the JAX backends already started"
    if _ASYNC_DISPATCH.upper() in os.environ:
        return f"skipped: {_ASYNC_DISPATCH.upper()} is set"
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(
            k in os.environ for k in _USER_ALLOCATOR_ENV):
        return "skipped: the environment sets glibc's allocator"
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return "skipped: the C library is not glibc"
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, KEEP_HEAP_BYTES)):
        return "skipped: glibc refused the allocator settings"
    jax.config.update(_ASYNC_DISPATCH, False)
    return "on"


def jit_once(fn: Callable, **kwargs: Any) -> Callable:
    """``jax.jit`` for a function called once (parameter init): cheaper to compile on CPU, the
    same values up to rounding (see ``ONCE_OPTIONS``). Called under an outer trace (``jit``,
    ``eval_shape``), where jax refuses compiler options, it is a plain nested ``jax.jit``."""
    _install_heap_release()
    plain = jax.jit(fn, **kwargs)
    opts = once_options()
    cheap = jax.jit(fn, compiler_options=opts, **kwargs) if opts else plain

    def call(*args: Any, **kw: Any) -> Any:
        traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kw)))
        return (plain if traced else cheap)(*args, **kw)
    return call


def _sub_jaxprs(params: dict) -> Iterator[Any]:
    for v in params.values():
        for p in (v if isinstance(v, (tuple, list)) else (v,)):
            if hasattr(p, "eqns"):
                yield p
            elif hasattr(getattr(p, "jaxpr", None), "eqns"):
                yield p.jaxpr


def largest_conv(jaxpr: Any) -> int:
    """Most elements in any convolution's input or output in ``jaxpr`` (sub-jaxprs included).

    Outputs count too: the kernel gradient's output is the kernel, and a large kernel gradient
    is YNNPACK's slow case even on a small map (the flow's 7x7 514 -> 512 head on a 16 x 16 grid:
    1.62 s per step with YNNPACK, 1.45 s with XLA).
    """
    best = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            for v in (eqn.invars[0], *eqn.outvars):
                best = max(best, math.prod(v.aval.shape))
        for sub in _sub_jaxprs(eqn.params):
            best = max(best, largest_conv(sub))
    return best


class _Jit:
    """``jax.jit(fn, **kwargs)`` whose CPU convolutions run in the library chosen at the first
    call (or ``lower``): YNNPACK (jaxlib's default) below ``CONV_ELEMENTS_XLA``; at or above it
    XLA's own (:func:`compiler_options`), or, with ``measure``, whichever runs this program faster
    on this machine (:mod:`fluxflow_jax.conv_choice`). Calls, ``lower`` and every other attribute
    of the chosen ``jax.jit`` object pass through."""

    def __init__(self, fn: Callable, kwargs: dict, measure: bool):
        self.__wrapped__ = fn
        self._default = jax.jit(fn, **kwargs)
        self._kwargs = kwargs
        self._measure = measure
        self._chosen: Any = None
        self.uses_xla_convolutions: bool | None = None  # decided at the first call
        self.conv_decision: dict | None = None  # how: {"by": "size"|"measured"|"remembered", ...}

    def _with_xla_convs(self, opts: dict | None) -> Any:
        return jax.jit(self.__wrapped__, compiler_options=opts, **self._kwargs)

    def _fix(self, use_xla: bool, how: dict, opts: dict | None) -> Any:
        self.uses_xla_convolutions, self.conv_decision = use_xla, how
        self._chosen = self._with_xla_convs(opts) if use_xla else self._default
        return self._chosen

    def _choose(self, args: tuple, kwargs: dict) -> Any:
        if self._chosen is not None:
            return self._chosen
        opts = compiler_options()
        big = opts is not None and largest_conv(
            self._default.trace(*args, **kwargs).jaxpr.jaxpr) >= CONV_ELEMENTS_XLA
        if not (big and self._measure and jax.process_count() == 1):
            # Several processes compile one program together: a per-host measurement could
            # differ between hosts, so they keep the rule.
            return self._fix(big, {"by": "size"}, opts)
        key = conv_choice.program_key(self._default.lower(*args, **kwargs).as_text())
        path = conv_choice.decisions_path()
        record = conv_choice.recall(key, path)
        how = "remembered"
        if record is None:
            xla_fn = self._with_xla_convs(opts)
            if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves((args, kwargs))):
                return xla_fn  # ``lower`` from shapes cannot run them: the rule, undecided
            record, how = conv_choice.measure(xla_fn, self._default, args, kwargs), "measured"
            conv_choice.remember(key, record, path)
            # The copies' pages go back (configure_cpu_host's allocator settings would keep
            # them). The losing executable stays in jax's caches: ``clear_cache`` would free it
            # (0.15-0.27 GB) but evicts the function's traces, so the winner compiles once more
            # (benchmarks/README.md, "Convolution library on CPU").
            if trim := _malloc_trim():
                trim(0)
        return self._fix(record["library"] == "XLA", {**record, "by": how, "file": path}, opts)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return (self._chosen or self._choose(args, kwargs))(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        """The chosen program's lowering; with ``measure``, measuring first as a call would
        (given shapes rather than arrays, the size rule's program, leaving the choice open)."""
        return self._choose(args, kwargs).lower(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._chosen or self._default, name)


def convolution_library(jitted: Any) -> str | None:
    """``'XLA'`` or ``'YNNPACK'``: which library runs a :func:`jit` function's CPU convolutions,
    once its first call has chosen; None before that, off CPU, when the user's ``XLA_FLAGS``
    decide, or for anything else."""
    used = getattr(jitted, "uses_xla_convolutions", None)
    if used is None or compiler_options() is None:
        return None
    return "XLA" if used else "YNNPACK"


def convolution_choice(jitted: Any) -> str | None:
    """:func:`convolution_library` and why, as the training loop prints it after compiling:
    ``'YNNPACK (measured: 1.04 s a call, XLA's 1.19 s)'``, ``'XLA (remembered from F)'``, or the
    name alone when the size rule chose."""
    lib = convolution_library(jitted)
    how = getattr(jitted, "conv_decision", None) or {}
    if lib is None or how.get("by") not in ("measured", "remembered"):
        return lib
    other = "XLA" if lib == "YNNPACK" else "YNNPACK"
    secs = how["seconds"]
    timing = f"{secs[lib]:.3g} s a call, {other}'s {secs[other]:.3g} s"
    if how["by"] == "measured":
        return f"{lib} (measured: {timing})"
    return f"{lib} (remembered from {how['file'] or 'this process'}: {timing})"


def jit(fn: Callable, *, measure: bool = False, **kwargs: Any) -> Any:
    """``jax.jit(fn, **kwargs)`` whose convolutions run where they are fastest, handing the
    compiler's freed heap back after compiling (module doc). ``measure``: decide the library of a
    large-convolution program by timing both on this machine (:mod:`fluxflow_jax.conv_choice`;
    worth it for functions called many times, such as training steps)."""
    _install_heap_release()
    return _Jit(fn, kwargs, measure)
