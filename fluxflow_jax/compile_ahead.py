"""A stage's compiles, one per batch shape: timed, reported, and done ahead in background threads.

Why: every batch shape a stage meets (an aspect bucket; a latent grid of the cache) compiles its
jitted steps anew. At ``img_size=512`` the ``auto`` buckets are 23 shapes, and at Phase 1 size a
compile of the VAE + GAN steps takes minutes, so a run that met them one by one stopped for each
in turn, at random steps. A map-style loader knows its batch order (``data/plan.py``), so once the
first shape has compiled (and chosen its convolution library, ``xla.py``), :class:`StageCompiles`
lowers the steps for every other shape the rest of the stage will meet, in the order it meets
them, and compiles them in ``threads`` background threads while the loop trains. XLA compiles
without holding the GIL, and on a GPU or TPU host the CPU cores are otherwise idle.

``jit(f).lower(...).compile()`` fills the same in-memory cache a call fills: the loop's first call
at a shape compiled ahead only traces (checked: :attr:`StageCompiles.recompiled`, which counts
calls that compiled anyway, is 0 in ``tests/test_bucket_shapes.py``). The program is the same one
a call would compile, so the numbers are the same bit for bit (the same test, ahead on and off).

Several processes: each compiles the same programs; GPU autotuning may exchange results between
hosts while compiling, so they compile ahead in one thread each, in the same order. On a GPU,
XLA's autotuner times candidate kernels on the device, here while it trains: the timings are
taken on a busy device and its scratch memory comes on top of the step's. A compile that fails
ahead (out of memory) is reported and done again in the loop; ``compile_ahead=0`` keeps every
compile in the loop, as before.
"""
from __future__ import annotations

import concurrent.futures as cf
import functools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from fluxflow_jax import xla

_compiles_here = threading.local()  # backend compiles run on this thread (the listener's count)


def _count_compile(event: str, duration_secs: float, **_: Any) -> None:
    if event == xla.BACKEND_COMPILE_EVENT:
        _compiles_here.n = getattr(_compiles_here, "n", 0) + 1


@functools.cache
def _install_counter() -> None:
    jax.monitoring.register_event_duration_secs_listener(_count_compile)


def threads_for(setting: int, process_count: int, cpu_count: int | None) -> int:
    """Background compile threads for ``config.compile_ahead``: -1 is one per 4 CPU cores (1 to
    8), 0 is off, any other count is taken as given; several processes use at most one."""
    n = max(1, min(8, (cpu_count or 1) // 4)) if setting == -1 else int(setting)
    return min(n, 1) if process_count > 1 else n


def shape_name(batch: Mapping[str, Any]) -> str:
    """The shape that decides a step's compilation, as printed: the images' or the latents'."""
    key = next((k for k in ("image", "latent") if k in batch), min(batch))
    return f"{key} " + "x".join(str(n) for n in batch[key].shape)


def batch_specs(first: Mapping[str, jax.Array], local_shapes: Mapping[str, Sequence[int]]
                ) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch of another shape, as shapes: ``first`` (a batch on the mesh) with the
    host-local ``local_shapes`` of the arrays that change (rows x the process count, as
    ``sharding.put_batch`` places them); every other entry, its dtype and sharding as in
    ``first``."""
    unknown = sorted(set(local_shapes) - set(first))
    assert not unknown, f"compile ahead: the loader's shapes name {unknown}, not in the batch"
    out = {}
    for k, a in first.items():
        shape = tuple(a.shape)
        if k in local_shapes:
            local = tuple(int(n) for n in local_shapes[k])
            shape = (local[0] * jax.process_count(),) + local[1:]
        out[k] = jax.ShapeDtypeStruct(shape, a.dtype, sharding=a.sharding)
    return out


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding,
                                                       weak_type=x.weak_type), tree)


class StageCompiles:
    """The compiles of one stage's steps per batch shape (module doc). The loop calls
    :meth:`begin` before a step's calls (True: a shape not met before; it waits for that shape's
    ahead compile), :meth:`end` after them, and :meth:`close` when the stage stops."""

    def __init__(self, name: str, kinds: Sequence[str], step_fns: Mapping[str, Callable],
                 threads: int):
        self.name, self.kinds, self.step_fns, self.threads = name, tuple(kinds), step_fns, threads
        self.compile_s: dict[str, float] = {}  # per shape: seconds its compile took
        self.wait_s = 0.0  # seconds the loop stopped for compiles (the first shape's included)
        self.recompiled = 0  # shapes compiled ahead whose first call compiled anyway
        self._ahead: dict[str, cf.Future] = {}
        self._pool: cf.ThreadPoolExecutor | None = None
        self._open: tuple[float, float | None, int] | None = None
        _install_counter()

    def begin(self, shape: str, step: int, write: Callable[[str], None]) -> bool:
        """Before the calls of ``step`` (1-based) on a batch of ``shape``: True for a shape not
        met before, after its compile ahead (if any) has finished."""
        if shape in self.compile_s:
            return False
        t0 = time.monotonic()
        fut = self._ahead.pop(shape, None)
        done = None
        if self.compile_s and (fut is None or not fut.done()):  # a pause: say why, now
            write(f"[{self.name}] step {step}: new batch shape {shape}: "
                  + ("compiling ..." if fut is None else "waiting for its compile ahead ..."))
        if fut is not None:
            try:
                done = fut.result()
            except Exception as e:  # noqa: BLE001 - the call below compiles it (or fails) itself
                print(f"[{self.name}] compiling {shape} ahead failed ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200]}); compiling it now", flush=True)
        self._open = (t0, done, getattr(_compiles_here, "n", 0))
        return True

    def end(self, shape: str, step: int, metrics: Any, write: Callable[[str], None]) -> None:
        """After the calls of a shape's first step: time, count and report its compile."""
        jax.block_until_ready(metrics)
        t0, done, n0 = self._open
        waited = time.monotonic() - t0
        self.wait_s += waited
        again = done is not None and getattr(_compiles_here, "n", 0) > n0
        self.recompiled += again
        self.compile_s[shape] = waited if done is None or again else done
        steps = "+".join(self.kinds)
        if len(self.compile_s) == 1:  # the convolution library is chosen here, for all shapes
            libs = {k: xla.convolution_choice(getattr(self.step_fns[k], "jitted", None))
                    for k in self.kinds}
            conv = ", ".join(f"{k} {v}" for k, v in libs.items() if v)
            print(f"[{self.name}] compiled {steps} in {waited:.1f} s"
                  + (f" (CPU convolutions: {conv})" if conv else ""), flush=True)
            return
        how = (f"compiled {steps} in {waited:.1f} s" if done is None else
               f"compiled {steps} ahead in {done:.1f} s, waited {waited:.1f} s"
               + (" (and compiled again here: the ahead program was not reused)" if again
                  else ""))
        write(f"[{self.name}] step {step}: new batch shape {shape}: {how} (shape "
              f"{len(self.compile_s)}, {sum(self.compile_s.values()):.0f} s compiling in this "
              "stage)")

    def ahead(self, state: Any, rng: jax.Array, first: Mapping[str, jax.Array],
              upcoming: Sequence[Mapping[str, Sequence[int]]] | None) -> None:
        """Start compiling the shapes of ``upcoming`` (the loader's host-local shapes of the
        batches still to come, in order; None: not known) not met yet."""
        if self.threads <= 0:
            return
        if upcoming is None:
            print(f"[{self.name}] compile ahead: this loader cannot tell its batch shapes "
                  "ahead (a stream of several buckets); each new shape compiles when met",
                  flush=True)
            return
        specs = {}
        for local in upcoming:
            spec = batch_specs(first, local)
            specs.setdefault(shape_name(spec), spec)
        todo = {s: b for s, b in specs.items() if s not in self.compile_s}
        if not todo:
            return
        n = min(self.threads, len(todo))
        print(f"[{self.name}] compiling {len(todo)} more batch shape(s) ahead in {n} "
              f"thread(s): {', '.join(todo)}", flush=True)
        abstract = _abstract(state)
        self._pool = cf.ThreadPoolExecutor(n, thread_name_prefix=f"compile-{self.name}")
        for shape, spec in todo.items():
            self._ahead[shape] = self._pool.submit(self._compile, abstract, spec, rng)

    def _compile(self, state: Any, batch: Mapping, rng: jax.Array) -> float:
        """Seconds it took to compile the steps for ``batch``'s shapes (in a pool thread)."""
        t0 = time.monotonic()
        for k in self.kinds:
            self.step_fns[k].lower(state, batch, rng).compile()
        return time.monotonic() - t0

    def extras(self) -> dict[str, float]:
        """What the metrics JSONL records of them."""
        return {"batch_shapes": len(self.compile_s),
                "compile_s": round(sum(self.compile_s.values()), 2),
                "compile_wait_s": round(self.wait_s, 2)}

    def close(self) -> None:
        """Drop the compiles not started; wait for those running (they cannot be stopped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._ahead.clear()

