"""LPIPS (VGG16 variant) in Flax, NHWC: the perceptual term of the VAE reconstruction loss.

Same computation as ``lpips.LPIPS(net="vgg")`` (version 0.1, eval mode) on inputs in [-1, 1]:
scale the input with lpips' ScalingLayer, take the VGG16 ``relu1_2, relu2_2, relu3_3, relu4_3,
relu5_3`` activations, unit-normalise each over channels (``x / (||x|| + 1e-10)``), square the
difference, weight channels with the five learned 1x1 heads (``lin0..lin4``, no bias), average
over space and sum the five layers.

Weights never come from the network: ``load_lpips_weights`` reads local safetensors files. Make
one from torchvision's ``vgg16-397923af.pth`` and the lpips package's ``weights/v0.1/vgg.pth``
with ``python -m fluxflow_jax.convert lpips --vgg ... --lin ... --out lpips_vgg16.safetensors``
(no torch needed; see ``fluxflow_jax.interop.lpips``). Expected keys
(PyTorch layouts; extra keys such as ``classifier.*`` are ignored):

* ``features.{N}.weight`` ``[O, I, 3, 3]`` and ``features.{N}.bias`` ``[O]`` for the torchvision
  VGG16 conv indices N in 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28 (lpips' own state dict
  names them ``net.slice{k}.{N}.*``, also accepted);
* ``lin{k}.model.1.weight`` ``[1, C_k, 1, 1]`` for k = 0..4 (C = 64, 128, 256, 512, 512).
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

# (torchvision feature index, out channels) per block; a 2x2 max-pool precedes blocks 2..5.
VGG16_BLOCKS = (((0, 64), (2, 64)),
                ((5, 128), (7, 128)),
                ((10, 256), (12, 256), (14, 256)),
                ((17, 512), (19, 512), (21, 512)),
                ((24, 512), (26, 512), (28, 512)))
CHANNELS = tuple(block[-1][1] for block in VGG16_BLOCKS)
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)


class VGG16Features(nn.Module):
    """The five LPIPS taps of torchvision's VGG16 ``features`` (convs named ``features_{N}``)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        taps = []
        for b, block in enumerate(VGG16_BLOCKS):
            if b:
                x = nn.max_pool(x, (2, 2), (2, 2))
            for idx, ch in block:
                x = jax.nn.relu(nn.Conv(ch, (3, 3), padding=1, name=f"features_{idx}")(x))
            taps.append(x)
        return taps


class LPIPS(nn.Module):
    """``LPIPS()(x, y) -> [B]`` distances for NHWC images in [-1, 1]."""

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        vgg = VGG16Features(name="vgg")
        shift, scale = jnp.asarray(_SHIFT), jnp.asarray(_SCALE)
        fx, fy = vgg((x - shift) / scale), vgg((y - shift) / scale)
        total = 0.0
        for k, (a, b) in enumerate(zip(fx, fy)):
            w = self.param(f"lin{k}", nn.initializers.uniform(1.0 / a.shape[-1]), (a.shape[-1],))
            d = jnp.square(_unit(a) - _unit(b))
            total = total + jnp.mean(jnp.sum(d * w, axis=-1), axis=(1, 2))
        return total


def _unit(f: jax.Array) -> jax.Array:
    return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + 1e-10)


def init_lpips(rng: jax.Array) -> dict:
    """Random LPIPS params (He-normal VGG convs, zero biases, nonnegative heads) for tests.

    Built from the known shapes instead of tracing the network (``LPIPS().init`` would run VGG16),
    from one draw each (per-shape draws would compile a sampler per shape).
    """
    convs, cin = [], 3
    for block in VGG16_BLOCKS:
        for idx, ch in block:
            convs.append((idx, cin, ch))
            cin = ch
    k1, k2 = jax.random.split(rng)
    z = np.asarray(jax.random.normal(k1, (sum(9 * i * o for _, i, o in convs),), jnp.float32))
    u = np.asarray(jax.random.uniform(k2, (sum(CHANNELS),), jnp.float32))
    vgg, at = {}, 0
    for idx, i, o in convs:
        w = z[at:at + 9 * i * o].reshape(3, 3, i, o) * np.float32((2.0 / (9 * i)) ** 0.5)
        vgg[f"features_{idx}"] = {"kernel": jnp.asarray(w), "bias": jnp.zeros((o,), jnp.float32)}
        at += 9 * i * o
    params, at = {"vgg": vgg}, 0
    for k, ch in enumerate(CHANNELS):
        params[f"lin{k}"] = jnp.asarray(u[at:at + ch] / ch)
        at += ch
    return params


def lpips_distance(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """Perceptual distance per sample, [B]. Treat ``params`` as frozen (stop_gradient)."""
    return LPIPS().apply({"params": params}, x, y)


def load_lpips_weights(paths: str | Sequence[str]) -> dict:
    """LPIPS params from one or more local safetensors files (keys: see the module docstring)."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    tensors: dict[str, np.ndarray] = {}
    for p in paths:
        for k, v in load_file(str(p)).items():
            m = re.fullmatch(r"net\.slice\d\.(\d+)\.(weight|bias)", k)
            tensors[f"features.{m.group(1)}.{m.group(2)}" if m else k] = v

    def need(key: str, shape: tuple) -> np.ndarray:
        if key not in tensors:
            raise KeyError(f"LPIPS weights: key {key!r} not found in {paths}")
        v = tensors[key]
        if tuple(v.shape) != shape:
            raise ValueError(f"LPIPS weights: {key!r} has shape {v.shape}, expected {shape}")
        return v.astype(np.float32)

    vgg, cin = {}, 3
    for block in VGG16_BLOCKS:
        for idx, ch in block:
            w = need(f"features.{idx}.weight", (ch, cin, 3, 3))
            vgg[f"features_{idx}"] = {"kernel": jnp.asarray(w.transpose(2, 3, 1, 0)),  # OIHW->HWIO
                                      "bias": jnp.asarray(need(f"features.{idx}.bias", (ch,)))}
            cin = ch
    params = {"vgg": vgg}
    for k, ch in enumerate(CHANNELS):
        params[f"lin{k}"] = jnp.asarray(need(f"lin{k}.model.1.weight", (1, ch, 1, 1)).reshape(ch))
    return params
