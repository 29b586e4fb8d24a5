"""Thin dense/conv layers with PyTorch's initialisers and parameter names ``kernel``/``bias``.

Why not ``nn.Dense``/``nn.Conv`` directly: the reference initialises biases uniformly in
``+-1/sqrt(fan_in)`` (needs the fan-in at init time) and several modules use xavier-uniform with
zero bias; the parity of a model trained from scratch depends on those. Parameters are float32;
``dtype`` is the compute dtype (bf16 training keeps fp32 master weights).

Kernels: Dense ``[in, out]``; Conv ``HWIO``. Activations are NHWC.
"""
from __future__ import annotations

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


class Conv(nn.Module):
    """2-D convolution on NHWC with symmetric integer padding, as ``torch.nn.Conv2d``."""

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
        y = jax.lax.conv_general_dilated(
            x.astype(dtype), kernel.astype(dtype), window_strides=_pair(self.strides),
            padding=((ph, ph), (pw, pw)), rhs_dilation=_pair(self.dilation),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
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
