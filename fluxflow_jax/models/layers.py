"""Thin dense/conv layers with PyTorch's initialisers and parameter names ``kernel``/``bias``.

Why not ``nn.Dense``/``nn.Conv`` directly: the reference initialises biases uniformly in
``+-1/sqrt(fan_in)`` (needs the fan-in at init time) and several modules use xavier-uniform with
zero bias; the parity of a model trained from scratch depends on those. Parameters are float32;
``dtype`` is the compute dtype (bf16 training keeps fp32 master weights).

Kernels: Dense ``[in, out]``; Conv ``HWIO``. Activations are NHWC.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any
INITS = ("torch", "xavier")


def _kernel_init(kind: str, fan_in: int, fan_out: int):
    if kind == "torch":  # kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in))
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    elif kind == "xavier":
        bound = math.sqrt(6.0 / (fan_in + fan_out))
    else:
        raise ValueError(f"init must be one of {INITS}, got {kind!r}")

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def _bias_init(kind: str, fan_in: int):
    if kind == "xavier" or fan_in == 0:
        return nn.initializers.zeros
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class Dense(nn.Module):
    """``y = x @ kernel + bias`` with torch-style (or xavier) initialisation."""

    features: int
    use_bias: bool = True
    init: str = "torch"
    dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        kernel = self.param("kernel", _kernel_init(self.init, fan_in, self.features),
                            (fan_in, self.features), jnp.float32)
        dtype = self.dtype or x.dtype
        y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
        if self.use_bias:
            bias = self.param("bias", _bias_init(self.init, fan_in), (self.features,), jnp.float32)
            y = y + bias.astype(dtype)
        return y


def _pair(v: Union[int, Sequence[int]]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


_NHWC = ("NHWC", "HWIO", "NHWC")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_stride1(x: jax.Array, kernel: jax.Array, padding: tuple[int, int]) -> jax.Array:
    """A stride-1, undilated NHWC x HWIO convolution with symmetric ``padding = (ph, pw)`` whose
    gradients, of any order, are again such convolutions, in XLA's canonical layout.

    Why: XLA:CPU maps a convolution to a library kernel (Eigen, YNNPACK) only in the canonical
    layout, and autodiff's kernel and input gradients are written in other layouts (batch as
    feature, kernel flipped and transposed), which XLA rewrites into the canonical one - but not
    inside a ``lax.cond`` branch, where they are compiled as plain loops: a 3x3 64 -> 64 kernel
    gradient on ``[4, 16, 16, 64]`` took 33.6 ms there against 1.4 ms outside (180x at -O0),
    and the discriminator step with R1 on (its passes run in a ``lax.cond``) 1050 ms against 87
    ms without (benchmarks/README.md, "Convolutions inside lax.cond"). Here the gradients are
    written in the canonical layout by hand, with transposes, as XLA's rewrite would: the same
    products summed in the same order.
    """
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), tuple((p, p) for p in padding),
                                        dimension_numbers=_NHWC)


def _conv_stride1_fwd(x, kernel, padding):
    return conv_stride1(x, kernel, padding), (x, kernel)


def _conv_stride1_bwd(padding, res, g):
    x, kernel = res
    kh, kw = kernel.shape[:2]
    # dx: g against the kernel flipped in space with in/out swapped, padded to give back H x W.
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    dx = conv_stride1(g, flipped, (kh - 1 - padding[0], kw - 1 - padding[1]))
    # dW[i, j, c, o] = sum_{b, y, x} x_pad[b, y+i, x+j, c] g[b, y, x, o]: a convolution with the
    # channels as batch, the batch as feature and g as a Ho x Wo kernel.
    dk = conv_stride1(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), padding)
    return dx, dk.transpose(1, 2, 0, 3)


conv_stride1.defvjp(_conv_stride1_fwd, _conv_stride1_bwd)


class Conv(nn.Module):
    """2-D convolution on NHWC with symmetric integer padding, as ``torch.nn.Conv2d``.

    Stride 1 without dilation goes through ``conv_stride1``, whose gradients are in XLA:CPU's
    library layout also inside a ``lax.cond`` (the flow head's convolutions under the LoRA DoP
    term: ``benchmarks/lora_dop.py``); the same sums, which
    ``tests/test_discriminator.py`` compares with ``lax.conv_general_dilated`` to the bit."""

    features: int
    kernel_size: Union[int, Sequence[int]] = 3
    strides: Union[int, Sequence[int]] = 1
    padding: Union[int, Sequence[int]] = 0
    dilation: Union[int, Sequence[int]] = 1
    use_bias: bool = True
    init: str = "torch"
    dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = _pair(self.kernel_size)
        cin = x.shape[-1]
        fan_in = cin * kh * kw
        fan_out = self.features * kh * kw
        kernel = self.param("kernel", _kernel_init(self.init, fan_in, fan_out),
                            (kh, kw, cin, self.features), jnp.float32)
        dtype = self.dtype or x.dtype
        ph, pw = _pair(self.padding)
        strides, dilation = _pair(self.strides), _pair(self.dilation)
        if strides == (1, 1) and dilation == (1, 1):
            y = conv_stride1(x.astype(dtype), kernel.astype(dtype), (ph, pw))
        else:
            y = jax.lax.conv_general_dilated(
                x.astype(dtype), kernel.astype(dtype), window_strides=strides,
                padding=((ph, ph), (pw, pw)), rhs_dilation=dilation, dimension_numbers=_NHWC)
        if self.use_bias:
            bias = self.param("bias", _bias_init(self.init, fan_in), (self.features,), jnp.float32)
            y = y + bias.astype(dtype)
        return y


def layer_norm(name: Optional[str] = None, eps: float = 1e-5, **kw) -> nn.LayerNorm:
    """LayerNorm with PyTorch's eps and exact (two-pass) variance, params ``scale``/``bias``."""
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name, **kw)


def group_norm(num_groups: int, affine: bool = True, name: Optional[str] = None,
               eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with PyTorch's eps and exact variance."""
    return nn.GroupNorm(num_groups=num_groups, epsilon=eps, use_scale=affine, use_bias=affine,
                        use_fast_variance=False, name=name)


def coord_channels(b: int, h: int, w: int, dtype=jnp.float32) -> jax.Array:
    """``[B, H, W, 2]`` of (x, y) coordinates in ``linspace(-1, 1)``: x varies along W, y along H."""
    xs = jnp.linspace(-1.0, 1.0, w, dtype=dtype)
    ys = jnp.linspace(-1.0, 1.0, h, dtype=dtype)
    xx = jnp.broadcast_to(xs[None, None, :, None], (b, h, w, 1))
    yy = jnp.broadcast_to(ys[None, :, None, None], (b, h, w, 1))
    return jnp.concatenate([xx, yy], axis=-1)
