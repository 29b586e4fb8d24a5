"""``jit`` with the XLA compile options this codebase's convolutional steps need.

Why: on CPU, jaxlib 0.10 hands every convolution to YNNPACK (a library fusion). Its kernel
gradient ("backprop filter") is 3.2x slower than XLA's own convolution on the discriminator's and
the VAE's shapes (3x3, 128 -> 128 at 128 px, batch 2: 187 ms vs 59 ms, 52 vs 165 GFLOP/s; the
forward and input gradient are level or 10% faster without it). Whole training steps, measured in
one session on a 2-core Intel Xeon (``benchmarks/README.md``): the discriminator at base 64 /
128 px 6.5 s -> 3.4 s, the VAE at d=32 / 128 px 1.26 s -> 0.93 s; the flow transformer and the
text encoder (no convolution in their hot paths) unchanged. So every jit that runs our
convolutional models keeps YNNPACK's other fusions (dots, reductions: the flag's default set
minus ``INDIVIDUAL_CONVOLUTION``) and leaves convolutions to XLA.

The options are per compilation (``jax.jit(..., compiler_options=...)``), so nothing global is
changed for a program that imports this package, and they are part of the persistent compilation
cache's key. A user who sets ``--xla_cpu_experimental_ynn_fusion_type`` in ``XLA_FLAGS`` keeps
their choice. On GPU and TPU nothing is passed.
"""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import jax

YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
# jaxlib 0.10's default YNN fusion set without INDIVIDUAL_CONVOLUTION (checked on the compiled
# HLO of the flow step: the same fusions as the default, less the convolutions).
CPU_YNN_FUSIONS = ("LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
                   "LIBRARY_FUSION_TYPE_REDUCE")


def options_for(backend: str, xla_flags: str) -> dict[str, str] | None:
    """The compile options for ``backend`` given the user's ``XLA_FLAGS`` (pure; see module doc)."""
    if backend != "cpu" or YNN_FUSION_FLAG in xla_flags:
        return None
    return {YNN_FUSION_FLAG: CPU_YNN_FUSIONS}


@functools.cache
def compiler_options() -> dict[str, str] | None:
    """This process's compile options for convolutional jits, checked once against jaxlib.

    A jaxlib that no longer knows the flag would reject every compilation; then the options are
    dropped with a warning (a speed difference only, never a numerical one).
    """
    opts = options_for(jax.default_backend(), os.environ.get("XLA_FLAGS", ""))
    if opts is None:
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=opts).lower(1.0).compile()
    except Exception as e:  # noqa: BLE001 - any rejection means: compile without the option
        logging.warning("fluxflow_jax: this jaxlib rejects --%s (%s); convolutions stay on "
                        "its default backend (slower kernel gradients on CPU)",
                        YNN_FUSION_FLAG, str(e).splitlines()[0][:200])
        return None
    return opts


def jit(fn: Callable, **kwargs: Any) -> Any:
    """``jax.jit(fn, **kwargs)`` with :func:`compiler_options`."""
    return jax.jit(fn, compiler_options=compiler_options(), **kwargs)
