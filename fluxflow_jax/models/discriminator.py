"""Spectral-normalised PatchGAN discriminator with projection conditioning (reference §1.4).

Spectral norm follows ``torch.nn.utils.spectral_norm`` (one power iteration, eps 1e-12, dim 0)
exactly, because the discriminator's outputs depend on the power-iteration state and a resumed
GAN run must continue from the same ``u``/``v``:

* ``params``: ``kernel`` (torch ``weight_orig``, in our layout: HWIO or ``[in, out]``) and ``bias``.
* ``spectral`` (a separate, non-trainable collection): ``u [out]`` and ``v [in*kh*kw]``, with
  ``v`` flattened in torch's ``(in, kh, kw)`` order so checkpoints map one-to-one.
* ``train=True`` (call ``apply(..., mutable=['spectral'])``): one power iteration under
  ``stop_gradient`` (``v = n(W^T u)``, ``u = n(W v)``, ``n(x) = x / max(|x|, 1e-12)``),
  written back;
  ``sigma = u . (W v)`` with ``u``, ``v`` constant, so the gradient flows through ``W`` only.
  The reference keeps the discriminator in train mode for every call of a VAE step, so every
  call advances the iteration.
* ``train=False``: the stored ``u``, ``v`` are used as they are.
* ``passes=n`` (train mode): ``x`` is ``n`` equal batch chunks that the reference would push
  through D in ``n`` successive calls (the D step's real then fake). Each layer runs ``n`` power
  iterations, convolves the whole batch once with the raw kernel and scales chunk ``i``'s output
  by ``1 / sigma_i`` before the bias: ``conv(x, W / s) = conv(x, W) / s``, so the logits and
  the stored ``u``/``v`` are those of the ``n`` calls (up to rounding) at one call's kernel count
  and a larger batch per convolution.
* Init: ``u``, ``v`` = normalised N(0, 1) draws and no iteration (also when ``init`` is called
  with ``train=True``), as torch does when the hook is attached.
"""
from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
import flax.linen as nn

from fluxflow_jax.models.layers import Dtype, _bias_init, _kernel_init, conv_stride1

SN_EPS = 1e-12
LRELU_SLOPE = 0.2
_HI = jax.lax.Precision.HIGHEST


def l2_normalize(x: jax.Array, eps: float = SN_EPS) -> jax.Array:
    """``x / max(||x||, eps)``, as ``torch.nn.functional.normalize`` (not ``x / (||x|| + eps)``)."""
    return x / jnp.maximum(jnp.linalg.norm(x), eps)


def _leaky_relu(x: jax.Array) -> jax.Array:
    return jax.nn.leaky_relu(x, LRELU_SLOPE)


def spectral_sigma(mdl: nn.Module, w_mat: jax.Array, train: bool, passes: int = 1) -> jax.Array:
    """Largest-singular-value estimates ``[passes]`` of ``w_mat [out, in*k*k]`` with ``mdl``'s u/v.

    Creates/reads ``spectral/u`` and ``spectral/v`` on ``mdl``. In train mode (outside ``init``)
    performs one power iteration per pass (estimate ``i`` uses the vectors after iteration ``i``,
    as ``passes`` successive torch calls would) and stores the last vectors, which needs the
    ``spectral`` collection to be mutable. Outside train mode every pass uses the stored vectors.
    """
    n_out, n_in = w_mat.shape
    if not mdl.is_initializing() and not mdl.has_variable("spectral", "u"):
        raise ValueError(f"spectral-norm layer {'/'.join(mdl.path)!r}: variables['spectral'] "
                         "has no u/v; pass the 'spectral' collection returned by init (or by "
                         "disc_from_torch) together with 'params'")
    u_var = mdl.variable("spectral", "u", lambda: l2_normalize(
        jax.random.normal(mdl.make_rng("params"), (n_out,), jnp.float32)))
    v_var = mdl.variable("spectral", "v", lambda: l2_normalize(
        jax.random.normal(mdl.make_rng("params"), (n_in,), jnp.float32)))
    u, v = u_var.value, v_var.value
    iterate = train and not mdl.is_initializing()
    if iterate and not mdl.is_mutable_collection("spectral"):
        raise ValueError(f"spectral-norm layer {'/'.join(mdl.path)!r} in train mode needs "
                         "apply(..., mutable=['spectral']) to store its power iteration")
    w_ng = jax.lax.stop_gradient(w_mat)
    sigmas = []
    for _ in range(passes):
        if iterate:
            v = l2_normalize(jnp.dot(w_ng.T, u, precision=_HI))
            u = l2_normalize(jnp.dot(w_ng, v, precision=_HI))
        u_c, v_c = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
        sigmas.append(jnp.dot(u_c, jnp.dot(w_mat, v_c, precision=_HI), precision=_HI))
    if iterate:
        u_var.value, v_var.value = u, v
    return jnp.stack(sigmas)


def _sn_apply(op, x: jax.Array, kernel: jax.Array, sigmas: jax.Array, bias: jax.Array,
              dtype) -> jax.Array:
    """``op(x, kernel / sigma) + bias``; with several sigmas, chunk ``i`` of the batch scaled by
    ``1 / sigma_i`` after one ``op`` over the whole batch (``op`` is linear in the kernel)."""
    if sigmas.shape[0] == 1:
        return op(x.astype(dtype), (kernel / sigmas[0]).astype(dtype)) + bias.astype(dtype)
    n, b = sigmas.shape[0], x.shape[0]
    if b % n:
        raise ValueError(f"spectral-norm layer: batch {b} does not split into passes={n} chunks")
    y = op(x.astype(dtype), kernel.astype(dtype))
    scale = jnp.repeat(1.0 / sigmas, b // n).reshape((b,) + (1,) * (y.ndim - 1))
    return y * scale.astype(dtype) + bias.astype(dtype)


class SNConv(nn.Module):
    """Spectral-normalised ``Conv2d`` (stride 1, symmetric padding) on NHWC, torch init."""

    features: int
    kernel_size: int = 3
    padding: int = 1
    dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, passes: int = 1) -> jax.Array:
        k, cin = self.kernel_size, x.shape[-1]
        fan_in, fan_out = cin * k * k, self.features * k * k
        kernel = self.param("kernel", _kernel_init("torch", fan_in, fan_out),
                            (k, k, cin, self.features), jnp.float32)
        bias = self.param("bias", _bias_init("torch", fan_in), (self.features,), jnp.float32)
        # torch's weight.reshape(out, -1) flattens (in, kh, kw): OIHW order.
        w_mat = kernel.transpose(3, 2, 0, 1).reshape(self.features, -1)
        p = self.padding

        def conv(a, w):  # gradients in library layouts, also inside the R1 lax.cond
            return conv_stride1(a, w, (p, p))
        return _sn_apply(conv, x, kernel, spectral_sigma(self, w_mat, train, passes), bias,
                         self.dtype or x.dtype)


class SNDense(nn.Module):
    """Spectral-normalised ``Linear`` (kernel ``[in, out]``), torch init."""

    features: int
    dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, passes: int = 1) -> jax.Array:
        fan_in = x.shape[-1]
        kernel = self.param("kernel", _kernel_init("torch", fan_in, self.features),
                            (fan_in, self.features), jnp.float32)
        bias = self.param("bias", _bias_init("torch", fan_in), (self.features,), jnp.float32)
        return _sn_apply(jnp.dot, x, kernel, spectral_sigma(self, kernel.T, train, passes), bias,
                         self.dtype or x.dtype)


class SNPair(nn.Module):
    """The reference's ``snconv``/``snlinear``: SN layer -> LeakyReLU(0.2) -> SN layer.

    Children ``sn0``/``sn1`` are the reference's Sequential indices 0 and 2.
    """

    features: int
    linear: bool = False
    dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, passes: int = 1) -> jax.Array:
        layer = (lambda name: SNDense(self.features, self.dtype, name=name)) if self.linear \
            else (lambda name: SNConv(self.features, 3, 1, self.dtype, name=name))
        x = layer("sn0")(x, train, passes)
        return layer("sn1")(_leaky_relu(x), train, passes)


class DBlock(nn.Module):
    """``LReLU(snconv(c->o)) -> LReLU(snconv(o->o)) -> AvgPool(2)`` (floor on odd sizes)."""

    features: int
    dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, passes: int = 1) -> jax.Array:
        h = _leaky_relu(SNPair(self.features, dtype=self.dtype, name="conv1")(x, train, passes))
        h = _leaky_relu(SNPair(self.features, dtype=self.dtype, name="conv2")(h, train, passes))
        return nn.avg_pool(h, (2, 2), strides=(2, 2), padding="VALID")


DiscOut = Union[jax.Array, tuple[jax.Array, jax.Array]]


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator: ``[B, H, W, C] -> logits [B, H/2^depth, W/2^depth, 1]``.

    Architecture (names in brackets are ours -> reference):
    stem snconv(C -> base) [``stem`` -> ``backbone.0``], LReLU, then ``depth`` DBlocks doubling
    the width [``block_i`` -> ``backbone.{i+2}``], head SN conv3x3 -> 1 [``head``]. With
    ``ctx_dim > 0`` a Miyato projection term ``<avgpool(h), ctx_proj(ctx)>`` is added to every
    patch logit, ``ctx_proj`` = snlinear(ctx_dim -> width) [``ctx_proj`` -> ``ctx_proj.{0,2}``].
    ``ctx_proj`` is created at ``init`` even when no context is passed, as torch always builds it.
    """

    in_channels: int = 3
    base_ch: int = 64
    depth: int = 4
    ctx_dim: int = 0
    dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: jax.Array, ctx: Optional[jax.Array] = None, return_feats: bool = False,
                 train: bool = False, passes: int = 1) -> DiscOut:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"PatchDiscriminator expects NHWC images with in_channels="
                             f"{self.in_channels}, got shape {tuple(x.shape)}")
        if ctx is not None:
            if not self.ctx_dim:
                raise ValueError("PatchDiscriminator got a context vector but ctx_dim=0 "
                                 "(no projection head); build it with ctx_dim > 0")
            if ctx.ndim != 2 or ctx.shape != (x.shape[0], self.ctx_dim):
                raise ValueError(f"PatchDiscriminator ctx must be [B={x.shape[0]}, ctx_dim="
                                 f"{self.ctx_dim}], got {tuple(ctx.shape)}")
        if passes < 1 or x.shape[0] % passes:
            raise ValueError(f"PatchDiscriminator passes={passes} must be >= 1 and divide the "
                             f"batch {x.shape[0]} (equal chunks, one per reference call)")
        h = _leaky_relu(SNPair(self.base_ch, dtype=self.dtype, name="stem")(x, train, passes))
        c = self.base_ch
        for i in range(self.depth):
            c *= 2
            h = DBlock(c, self.dtype, name=f"block_{i}")(h, train, passes)
        logits = SNConv(1, 3, 1, self.dtype, name="head")(h, train, passes)
        pooled = jnp.mean(h, axis=(1, 2))
        if self.ctx_dim:
            proj = SNPair(c, linear=True, dtype=self.dtype, name="ctx_proj")
            if ctx is not None:
                term = jnp.sum(pooled * proj(ctx, train, passes), axis=-1)
                logits = logits + term[:, None, None, None].astype(logits.dtype)
            elif self.is_initializing():
                proj(jnp.zeros((x.shape[0], self.ctx_dim), x.dtype), train)
        if return_feats:
            return pooled, logits
        return logits
