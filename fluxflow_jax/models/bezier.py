"""Cubic Bezier activations, the nonlinearity FluxFlow is built on.

Every group of 5 *consecutive* channels ``(t, p0, p1, p2, p3)`` becomes one output channel
``(1-t)^3 p0 + 3(1-t)^2 t p1 + 3(1-t) t^2 p2 + t^3 p3``. Layers in front of a Bezier site
therefore produce 5x the channels they hand on; the ablation switch (``activation='relu'``
etc.) builds the same site with a standard activation and a 1x layer instead, so "Bezier vs
ReLU at identical config" is one config value (see :func:`act_width` and :func:`apply_act`).

Channels are always the last axis here (NHWC / [..., D]); the reference's NCHW grouping on
axis 1 is the same grouping once the interop layer moves the channel axis last.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

PRE_ACTIVATIONS: dict[Optional[str], Callable[[jax.Array], jax.Array]] = {
    None: lambda x: x,
    "none": lambda x: x,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "silu": jax.nn.silu,
}

STANDARD_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    # torch.nn.GELU defaults to the exact erf form.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}

ACTIVATIONS = ("bezier",) + tuple(STANDARD_ACTIVATIONS)


def _pre(name: Optional[str]) -> Callable[[jax.Array], jax.Array]:
    if name not in PRE_ACTIVATIONS:
        raise ValueError(f"unknown Bezier pre-activation {name!r}; expected one of "
                         f"{sorted(k for k in PRE_ACTIVATIONS if k)}")
    return PRE_ACTIVATIONS[name]


def bezier_curve(t: jax.Array, p0: jax.Array, p1: jax.Array, p2: jax.Array,
                 p3: jax.Array) -> jax.Array:
    """Cubic Bezier in Bernstein form, summed in the reference's order."""
    s = 1.0 - t
    out = (s * s * s) * p0 + (s * s * t) * (3.0 * p1)
    out = out + (s * t * t) * (3.0 * p2)
    return out + (t * t * t) * p3


@functools.partial(jax.checkpoint, static_argnums=(1, 2))
def _bezier_grouped(x: jax.Array, t_pre: Optional[str], p_pre: Optional[str]) -> jax.Array:
    g = x.reshape(x.shape[:-1] + (x.shape[-1] // 5, 5))
    c = [jnp.squeeze(a, -1) for a in jax.lax.split(g, (1,) * 5, axis=g.ndim - 1)]
    tf, pf = _pre(t_pre), _pre(p_pre)
    return bezier_curve(tf(c[0]), pf(c[1]), pf(c[2]), pf(c[3]), pf(c[4]))


def bezier_activation(x: jax.Array, t_pre: Optional[str] = "sigmoid",
                      p_pre: Optional[str] = None) -> jax.Array:
    """Parameter-free Bezier activation on the last axis: ``[..., 5F] -> [..., F]``.

    Channel ``5f + k`` is ``t`` for k=0 and ``p_{k-1}`` otherwise (the reference's grouping).

    The backward pass keeps only ``x`` and recomputes the pre-activations and Bernstein terms
    from it (``jax.checkpoint`` of this element-wise function; same operations, same values).
    Autodiff would otherwise keep several ``[..., F]`` intermediates per site until the
    backward reaches it: on the VAE at d=64 / 128 px that is 1164 -> 940 MB of XLA's live
    memory per step at the same step time (``benchmarks/README.md``, "Peak memory").

    The five stride-5 columns are taken with one ``lax.split``, whose gradient is one
    concatenation. Five slices (``g[..., k]``) give the same values at the site, but their
    gradient is five zero-padded ``[..., F, 5]`` tensors summed, which XLA:CPU writes out one
    by one. A site's forward + backward went 18.2 -> 10.6 ms at the d=32 VAE's
    ``[2, 64, 64, 160]`` on 2 cores, with less live memory; a whole step fuses differently
    and agrees with the sliced form to rounding, not bit for bit ("Bezier columns" in
    ``benchmarks/README.md``).
    """
    c = x.shape[-1]
    if c % 5:
        raise ValueError(f"Bezier activation needs a channel count divisible by 5, got {c} "
                         f"(input shape {tuple(x.shape)})")
    _pre(t_pre), _pre(p_pre)  # unknown names fail here, with the message, not inside the trace
    return _bezier_grouped(x, t_pre, p_pre)


# The two named forms the reference uses.
def bz_ss(x: jax.Array) -> jax.Array:
    """"Bz_ss": sigmoid on t, SiLU on the control points (VAE and discriminator-free sites)."""
    return bezier_activation(x, "sigmoid", "silu")


def bz_s(x: jax.Array) -> jax.Array:
    """"Bz_s": sigmoid on t, control points as they are (flow blocks, text head)."""
    return bezier_activation(x, "sigmoid", None)


def check_activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return name


def act_width(features: int, activation: str) -> int:
    """Width of the layer feeding an activation site: 5x for Bezier, 1x for the ablations."""
    return features * 5 if check_activation(activation) == "bezier" else features


def apply_act(x: jax.Array, activation: str, bezier_form: str = "ss") -> jax.Array:
    """Apply the site's activation: the Bezier form (``'ss'`` or ``'s'``) or a standard one."""
    if check_activation(activation) == "bezier":
        return bz_ss(x) if bezier_form == "ss" else bz_s(x)
    return STANDARD_ACTIVATIONS[activation](x)


HEAD_ACTIVATIONS = ("", "identity") + ACTIVATIONS


def check_head_activation(name: str) -> str:
    if name not in HEAD_ACTIVATIONS:
        raise ValueError(f"head_activation must be one of {HEAD_ACTIVATIONS}, got {name!r}")
    return name


def head_site(shape: Sequence[int], init_values: Sequence[float], activation: str,
              head_activation: str, name: str) -> Callable[[jax.Array], jax.Array]:
    """A VAE output site (latent mean / log-variance, RGB): a :class:`TrainableBezier` as in the
    reference. ``head_activation`` '' follows ``activation`` (an ablation puts its standard
    activation there, clamping e.g. the RGB output to ReLU's [0, inf)); 'identity' makes the site
    linear, as a standard ReLU/SiLU VAE's heads are; a name from ACTIVATIONS sets it explicitly."""
    act = check_head_activation(head_activation) or activation
    if act == "identity":
        return lambda x: x
    return TrainableBezier(tuple(shape), tuple(init_values), act, name=name)


class TrainableBezier(nn.Module):
    """Bezier curve of ``sigmoid(x)`` with learnable control points ``p0..p3``.

    ``shape`` is the parameter shape *in this package's layout*: ``(C,)`` broadcasts over the
    last (channel) axis, which covers both the reference's ``channel_only`` ``(C,)`` form on
    NCHW maps and its ``(C,)``/``expand_as`` form on ``[..., C]`` vectors; the reference's
    ``(C, 1, 1)`` form becomes ``(C,)`` as well once maps are NHWC (the interop layer reshapes).
    With ``activation != 'bezier'`` (ablation) the site applies that activation and owns no
    parameters.
    """

    shape: Sequence[int]
    init_values: Sequence[float] = (1e-8, 0.25, 0.75, 1.0)
    activation: str = "bezier"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if check_activation(self.activation) != "bezier":
            return STANDARD_ACTIVATIONS[self.activation](x)
        ps = [self.param(f"p{i}", nn.initializers.constant(v), tuple(self.shape), jnp.float32)
              for i, v in enumerate(self.init_values)]
        ps = [p.astype(x.dtype) for p in ps]
        return bezier_curve(jax.nn.sigmoid(x), *ps)
