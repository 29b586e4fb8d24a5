"""The FluxFlow VAE: ``FluxCompressor`` (image -> packed latent tokens) and ``FluxExpander``.

Weight for weight the reference's ``fluxflow.models.vae`` (REFERENCE.md 1.1-1.2), in NHWC:

* compressor: coordinate channels, ``downscales`` stages of (conv3 -> Bz_ss -> conv8/s2 -> Bz_ss),
  latent/mu/logvar heads, per-channel TrainableBezier on mu/logvar, reparameterisation, sin-cos +
  content positional encoding, pre-LN token self-attention, and the HW token (``h/max_hw``,
  ``w/max_hw`` in channels 0 and 1 of the last token);
* expander: ``upscales`` SPADE-modulated residual upsampling blocks (ConvTranspose k16/s2/p7 and a
  dilated conv, both followed by Bz_ss), a to-RGB head and a per-channel RGB TrainableBezier.

Two deliberate differences from the reference code (not from its numbers):

* ``sample=False`` gives ``z = mu``; the reference always samples, even at inference
  (REFERENCE.md section 10 item 23), which makes decoding stochastic.
* The transposed convolution is computed as four stride-1 convolutions interleaved depth-to-space
  (:func:`conv_transpose_2x`): ``lax.conv_transpose`` is a 60x cliff on XLA:CPU (DESIGN.md,
  measured facts) and gives the same numbers.

Submodule names mirror the reference's state-dict keys so ``interop/vae.py`` stays a short table.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fluxflow_jax.models.bezier import act_width, apply_act, check_activation, head_site
from fluxflow_jax.models.conditioning import (
    ContextAttentionMixer,
    dot_product_attention,
    merge_heads,
    split_heads,
)
from fluxflow_jax.models.layers import Conv, Dense, coord_channels, group_norm, layer_norm

Dtype = Any

MU_INIT = (-2.0, -0.5, 0.5, 2.0)
LOGVAR_INIT = (-3.0, -1.0, 1.0, 3.0)
RGB_INIT = (-1.0, 0.25, 0.75, 1.0)
SPADE_HIDDEN = 128  # fixed in the reference, whatever d_model is


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------

def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace`` in float32 as its scalar CPU kernel computes it (first half from
    ``start``, second half from ``end``; outputs shorter than a SIMD vector, i.e. any sane
    ``downscales``, take that path), so rounding gives the reference's stage channels."""
    if steps == 1:
        return np.array([start], np.float32)
    start32, end32 = np.float32(start), np.float32(end)
    step = (end32 - start32) / np.float32(steps - 1)
    half = steps // 2
    out = [start32 + step * np.float32(i) if i < half else end32 - step * np.float32(steps - i - 1)
           for i in range(steps)]
    return np.array(out, np.float32)


def stage_channels(in_channels: int, d_model: int, downscales: int) -> list[int]:
    """Encoder widths: ``round(linspace(in+2, max(d, 8), downscales+1))`` with half-to-even
    rounding, e.g. ``[5, 36, 66, 97, 128]`` for d=128 (66.5 -> 66)."""
    vals = torch_linspace_f32(in_channels + 2, max(d_model, 8), downscales + 1)
    return [round(float(v)) for v in vals]


def sincos_pe_2d(h: int, w: int, d: int) -> np.ndarray:
    """The compressor's fixed ``[h*w, d]`` position code: the first ``d - d//2`` channels encode
    the row, the last ``d//2`` the column; within each, even channels sin and odd channels cos.
    Computed in float32 numpy like the reference's float32 torch ops (it is a trace-time constant).
    """
    def pe_1d(length: int, c: int) -> np.ndarray:
        pos = np.arange(length, dtype=np.float32)[:, None]
        div = np.exp(np.arange(0, c, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / c))
        pe = np.zeros((length, c), np.float32)
        pe[:, 0::2] = np.sin(pos * div)
        pe[:, 1::2] = np.cos(pos * div)[:, : c // 2]
        return pe

    cx = d // 2
    cy = d - cx
    pe_y = np.broadcast_to(pe_1d(h, cy)[:, None, :], (h, w, cy))
    pe_x = np.broadcast_to(pe_1d(w, cx)[None, :, :], (h, w, cx))
    return np.concatenate([pe_y, pe_x], axis=-1).reshape(h * w, d)


def conv_transpose_2x(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``torch.nn.ConvTranspose2d(stride=2, padding=k/2-1)`` (output exactly 2H x 2W) on NHWC.

    ``kernel`` is ``[k, k, out, in]`` (the torch ``[in, out, k, k]`` weight transposed by the
    interop 'conv' kind). Output pixel ``(2m+a, 2n+b)`` only sees the taps of one parity, so the
    layer is four stride-1 ``k/2 x k/2`` convolutions with the sub-kernels ``wf[1-c_a::2, 1-c_b::2]``
    of the spatially flipped kernel, interleaved into the 2x grid (depth-to-space). Same numbers as
    ``lax.conv_transpose`` (see :func:`conv_transpose_2x_oracle`), ~60x faster to differentiate on
    XLA:CPU (DESIGN.md).
    """
    k = kernel.shape[0]
    if kernel.shape[1] != k or k % 2:
        raise ValueError(f"conv_transpose_2x needs a square even kernel, got {kernel.shape[:2]}")
    p = k // 2 - 1
    wf = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)  # flipped, HWIO [k, k, in, out]
    b, h, w, _ = x.shape
    half = k // 2

    def tap_set(a: int) -> tuple[slice, tuple[int, int]]:
        c = (a + p) % 2                      # parity of the taps that reach output parity a
        hi = (a + p - c) // 2                # input offset of the first tap
        return slice(1 - c, None, 2), (half - 1 - hi, hi)

    rows = []
    for a in (0, 1):
        sa, pad_a = tap_set(a)
        cols = []
        for bb in (0, 1):
            sb, pad_b = tap_set(bb)
            cols.append(jax.lax.conv_general_dilated(
                x, wf[sa, sb], window_strides=(1, 1), padding=(pad_a, pad_b),
                dimension_numbers=("NHWC", "HWIO", "NHWC")))
        rows.append(jnp.stack(cols, axis=3))           # [B, H, W, 2(b), C]
    y = jnp.stack(rows, axis=2)                        # [B, H, 2(a), W, 2(b), C]
    return y.reshape(b, 2 * h, 2 * w, y.shape[-1])


def conv_transpose_2x_oracle(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The same layer through ``lax.conv_transpose``; kept only as the tests' reference."""
    k = kernel.shape[0]
    pad = k - 1 - (k // 2 - 1)
    return jax.lax.conv_transpose(x, kernel, strides=(2, 2), padding=((pad, pad), (pad, pad)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"), transpose_kernel=True)


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def resize_bilinear(x: jax.Array, h: int, w: int) -> jax.Array:
    """Bilinear NHWC resize with half-pixel centres, as ``F.interpolate(align_corners=False)``
    when upsampling (edge samples clamp to the border pixel in both)."""
    return jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), method="bilinear")


def _uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


# ---------------------------------------------------------------------------------------------
# Compressor
# ---------------------------------------------------------------------------------------------

class _EncoderStage(nn.Module):
    """conv3 (no bias) -> act -> conv8/s2/p3 -> act: one halving of H and W."""

    features: int
    activation: str = "bezier"
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = act_width(self.features, self.activation)
        x = Conv(width, 3, padding=1, use_bias=False, dtype=self.dtype, name="first_step")(x)
        x = apply_act(x, self.activation)
        x = Conv(width, 8, strides=2, padding=3, dtype=self.dtype, name="z")(x)
        return apply_act(x, self.activation)


class _MultiheadSelfAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` self-attention (no mask, no dropout). One ``in_proj``
    with 3d outputs whose columns q|k|v are the rows of the reference's ``in_proj_weight``."""

    d_model: int
    n_head: int
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # torch's MHA: xavier_uniform in_proj over the whole [3d, d] matrix, zero biases;
        # out_proj is a Linear whose bias torch zeroes.
        qkv = Dense(3 * self.d_model, init="xavier", dtype=self.dtype, name="in_proj")(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        out = dot_product_attention(split_heads(q, self.n_head), split_heads(k, self.n_head),
                                    split_heads(v, self.n_head))
        return _OutProj(self.d_model, dtype=self.dtype, name="out_proj")(merge_heads(out))


class _OutProj(nn.Module):
    """MHA ``out_proj``: torch's default Linear weight init with a zero bias."""

    features: int
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        kernel = self.param("kernel", _uniform(1.0 / math.sqrt(fan_in)), (fan_in, self.features),
                            jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        dtype = self.dtype or x.dtype
        return jnp.dot(x.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)


class _TokenAttentionBlock(nn.Module):
    """Pre-LN block: ``x += MHA(LN1 x)``; ``x += FF(LN2 x)`` with a Bezier FF."""

    d_model: int
    n_head: int
    ff_mult: int = 2
    activation: str = "bezier"
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = layer_norm("norm1")(x)
        x = x + _MultiheadSelfAttention(self.d_model, self.n_head, self.dtype, name="attn")(h)
        hidden = self.d_model * self.ff_mult
        h = layer_norm("norm2")(x)
        h = Dense(act_width(hidden, self.activation), dtype=self.dtype, name="ff_0")(h)
        h = apply_act(h, self.activation)
        return x + Dense(self.d_model, dtype=self.dtype, name="ff_2")(h)


class FluxCompressor(nn.Module):
    """Image ``[B, H, W, C]`` -> ``(packed [B, h*w+1, d], mu [B,h,w,d], logvar [B,h,w,d])``.

    ``h = H / 2**downscales``. ``sample=True`` draws ``z = mu + eps * exp(logvar/2)`` with
    ``eps`` from the ``'sample'`` rng stream; ``sample=False`` uses ``z = mu`` and needs no rng.
    """

    in_channels: int = 3
    d_model: int = 128
    downscales: int = 4
    max_hw: int = 1024
    attn_layers: int = 4
    attn_heads: int = 8
    attn_ff_mult: int = 2
    activation: str = "bezier"
    head_activation: str = ""  # mu/logvar sites; '' = activation (bezier.head_site)
    remat: bool = False
    dtype: Dtype | None = None

    def _check_input(self, img: jax.Array) -> None:
        check_activation(self.activation)
        if self.d_model % self.attn_heads:
            raise ValueError(f"FluxCompressor: d_model {self.d_model} is not divisible by "
                             f"attn_heads {self.attn_heads}")
        if img.ndim != 4:
            raise ValueError(f"FluxCompressor expects an NHWC image [B, H, W, C], got shape "
                             f"{tuple(img.shape)}")
        _, hh, ww, c = img.shape
        if c != self.in_channels:
            raise ValueError(f"FluxCompressor: image has {c} channels (last axis, NHWC), "
                             f"in_channels is {self.in_channels}; shape {tuple(img.shape)}")
        f = 2 ** self.downscales
        if hh % f or ww % f or hh == 0 or ww == 0:
            raise ValueError(f"FluxCompressor: image size {hh}x{ww} must be a positive multiple "
                             f"of 2**downscales = {f} (downscales={self.downscales})")

    @nn.compact
    def __call__(self, img: jax.Array, sample: bool = True
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        self._check_input(img)
        act, d, dt = self.activation, self.d_model, self.dtype
        b = img.shape[0]
        chans = stage_channels(self.in_channels, d, self.downscales)

        x = jnp.concatenate([img, coord_channels(b, img.shape[1], img.shape[2], img.dtype)], -1)
        stage_cls = nn.remat(_EncoderStage) if self.remat else _EncoderStage
        for i in range(self.downscales):
            x = stage_cls(chans[i + 1], act, dt, name=f"stage_{i}")(x)

        def head(y: jax.Array, name: str) -> jax.Array:
            for j in range(2):
                y = apply_act(Conv(act_width(d, act), 1, dtype=dt, name=f"{name}_{j}")(y), act)
            return y

        latent = head(x, "latent_proj")
        ha = self.head_activation
        mu = head_site((d,), MU_INIT, act, ha, "mu_activation")(head(latent, "mu_proj"))
        logvar = head_site((d,), LOGVAR_INIT, act, ha, "logvar_activation")(
            head(latent, "logvar_proj"))

        if sample:
            eps = jax.random.normal(self.make_rng("sample"), mu.shape, jnp.float32).astype(mu.dtype)
            z = mu + eps * jnp.exp(0.5 * logvar)
        else:
            z = mu

        _, h, w, _ = latent.shape
        pe = jnp.asarray(sincos_pe_2d(h, w, d), z.dtype)
        seq = z.reshape(b, h * w, d) + pe[None] + latent.reshape(b, h * w, d)

        block_cls = nn.remat(_TokenAttentionBlock) if self.remat else _TokenAttentionBlock
        for j in range(self.attn_layers):
            seq = block_cls(d, self.attn_heads, self.attn_ff_mult, act, dt,
                            name=f"token_attn_{j}")(seq)

        return jnp.concatenate([seq, hw_token(b, (h, w), d, self.max_hw, seq.dtype)], 1), mu, logvar


# ---------------------------------------------------------------------------------------------
# Expander
# ---------------------------------------------------------------------------------------------

class _SPADE(nn.Module):
    """``GN(x) * (1 + gamma(ctx)) + beta(ctx)`` with ctx resized bilinearly to x's grid."""

    features: int
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, ctx: jax.Array) -> jax.Array:
        n = group_norm(min(32, self.features), affine=False, name="bn")(x)
        if ctx.shape[1:3] != x.shape[1:3]:
            ctx = resize_bilinear(ctx, x.shape[1], x.shape[2])
        a = jax.nn.relu(Conv(SPADE_HIDDEN, 3, padding=1, dtype=self.dtype, name="mlp_shared")(ctx))
        gamma = Conv(self.features, 3, padding=1, dtype=self.dtype, name="mlp_gamma")(a)
        beta = Conv(self.features, 3, padding=1, dtype=self.dtype, name="mlp_beta")(a)
        return n * (1 + gamma) + beta


class _ConvTranspose2x(nn.Module):
    """ConvTranspose2d(k, stride 2, padding k/2-1) with torch's init; kernel ``[k, k, out, in]``."""

    features: int
    kernel_size: int = 16
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, cin = self.kernel_size, x.shape[-1]
        # torch computes ConvTranspose2d's fan-in from its [in, out, k, k] weight as out*k*k.
        bound = 1.0 / math.sqrt(self.features * k * k)
        kernel = self.param("kernel", _uniform(bound), (k, k, self.features, cin), jnp.float32)
        bias = self.param("bias", _uniform(bound), (self.features,), jnp.float32)
        dtype = self.dtype or x.dtype
        return conv_transpose_2x(x.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)


class _ResidualUpsampleBlock(nn.Module):
    """[SPADE] -> convT(k16,s2) -> act -> conv5(dil 2) -> act, plus 0.1 * nearest-2x(x)."""

    features: int
    activation: str = "bezier"
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, ctx: jax.Array | None) -> jax.Array:
        identity = x
        if ctx is not None:
            x = _SPADE(self.features, self.dtype, name="spade")(x, ctx)
        width = act_width(self.features, self.activation)
        x = apply_act(_ConvTranspose2x(width, 16, self.dtype, name="conv_t")(x), self.activation)
        x = Conv(width, 5, padding=4, dilation=2, dtype=self.dtype, name="conv_d")(x)
        x = apply_act(x, self.activation)
        return x + 0.1 * upsample_nearest_2x(identity)


def hw_token(batch: int, hw: tuple[int, int], dim: int, max_hw: int,
             dtype: Any = jnp.float32) -> jax.Array:
    """The packed latent's last token ``[B, 1, d]``: channel 0 = h/max_hw, channel 1 = w/max_hw
    (latent units). The compressor, the sampler and cached latents all build it here."""
    tok = jnp.zeros((batch, 1, dim), dtype)
    return tok.at[:, 0, 0].set(hw[0] / float(max_hw)).at[:, 0, 1].set(hw[1] / float(max_hw))


def _concrete_hw(packed: jax.Array, max_hw: int) -> tuple[int, int]:
    """Latent grid from the HW token, which must be concrete (not under jit)."""
    try:
        tok = np.asarray(packed[:, -1, :2], dtype=np.float32)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError(
            "FluxExpander: the HW token is traced (the call is under jit/grad/vmap/eval_shape), so "
            "the latent grid cannot be read from it; pass hw=(h, w) as a static argument") from e
    hws = np.maximum(np.round(tok * np.float32(max_hw)), 1).astype(np.int64)
    if not (hws == hws[0]).all():
        raise ValueError(f"FluxExpander: samples in one batch encode different latent sizes "
                         f"{sorted(set(map(tuple, hws.tolist())))}; decode them separately")
    return int(hws[0, 0]), int(hws[0, 1])


class FluxExpander(nn.Module):
    """Packed tokens ``[B, T+1, d]`` -> image ``[B, h*2**upscales, w*2**upscales, 3]``.

    The latent grid ``(h, w)`` is ``hw`` when given (required under jit, where the HW token is
    traced) and otherwise read from the HW token. ``use_context=False`` skips SPADE entirely.
    Owns the reference's never-called ``context_mixer`` parameters so checkpoints round-trip.
    """

    d_model: int = 128
    upscales: int = 4
    max_hw: int = 1024
    ctx_tokens: int = 4
    activation: str = "bezier"
    head_activation: str = ""  # the RGB output site; '' = activation (bezier.head_site)
    remat: bool = False
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, packed: jax.Array, use_context: bool = True,
                 hw: Sequence[int] | None = None) -> jax.Array:
        check_activation(self.activation)
        d, act, dt = self.d_model, self.activation, self.dtype
        if packed.ndim != 3 or packed.shape[-1] != d:
            raise ValueError(f"FluxExpander expects packed tokens [B, T+1, {d}], got shape "
                             f"{tuple(packed.shape)}")
        h, w = (int(hw[0]), int(hw[1])) if hw is not None else _concrete_hw(packed, self.max_hw)
        b, t = packed.shape[0], packed.shape[1] - 1
        if h * w > t:
            raise ValueError(f"FluxExpander: latent grid {h}x{w} needs {h * w} tokens, packed has {t}")
        feat = packed[:, : h * w].reshape(b, h, w, d)

        if self.is_initializing():  # reference parity only: never used in the forward
            # Its parameter shapes do not depend on the head count; fall back to one head where
            # the reference's count does not divide d (the reference never runs it either).
            n_head = max(4, d // 64)
            ContextAttentionMixer(d, n_head=n_head if d % n_head == 0 else 1, dtype=dt,
                                  name="context_mixer")(
                jnp.zeros((1, max(1, min(self.ctx_tokens, t)), d), jnp.float32))

        ctx = feat if use_context else None
        block_cls = nn.remat(_ResidualUpsampleBlock) if self.remat else _ResidualUpsampleBlock
        x = feat
        for i in range(self.upscales):
            x = block_cls(d, act, dt, name=f"upscale_{i}")(x, ctx)

        x = Conv(96, 3, padding=1, dtype=dt, name="to_rgb_0")(x)
        x = jax.nn.silu(group_norm(8, name="to_rgb_1")(x))
        x = Conv(48, 3, padding=1, dtype=dt, name="to_rgb_3")(x)
        x = jax.nn.silu(group_norm(8, name="to_rgb_4")(x))
        x = Conv(3, 1, dtype=dt, name="to_rgb_6")(x)
        return head_site((3,), RGB_INIT, act, self.head_activation, "rgb_activation")(x)
