"""The FluxFlow flow transformer (``FluxFlowProcessor``), weight for weight the PyTorch reference.

Input and output are *packed* latents ``[B, T+1, d]``: ``T = h*w`` image tokens (row-major) and a
last "HW" token whose first two channels are ``h/max_hw, w/max_hw``; the HW token is returned
untouched. The network (REFERENCE.md section 1.3):

1. ``x = vae_to_dmodel(tokens)``; a ContextAttentionMixer pools the first ``ctx_tokens`` tokens
   into a context vector ``ctx``.
2. ``cond = text_emb + time_embed(floor(999 t))`` and ``text_seq = text_proj(cond)[:, None]``.
3. Each block: ``x = context_injection(x, ctx)`` (one module shared by all blocks), the block,
   then ``ctx += mean_T(x)``.
4. ``out = dmodel_to_vae(x)``; the first ``h*w`` tokens as an ``h x w`` map go through
   ``flow_predictor`` and ``context_final`` (with coordinate channels); the spatial mean of that,
   through ``dmodel_to_vae`` again, is added to the first ``min(ctx_tokens, t_valid)`` tokens.

Two quirks of the reference are reproduced on purpose (REFERENCE.md section 10 item 21), because
checkpoints depend on them: RoPE pairs an interleaved frequency layout with a half-split rotation,
and the block's final Bezier activation groups 5 *consecutive* channels of ``cat[x, P0..P3]``.

Timesteps are floats in ``[0, 1]`` (section 10 item 2: the reference's trainer fed integers, which
collapsed every ``t >= 1`` onto embedding 999; this port's trainers pass floats).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fluxflow_jax.models.bezier import STANDARD_ACTIVATIONS, TrainableBezier, bz_s, check_activation
from fluxflow_jax.models.conditioning import (
    ContextAttentionMixer,
    GatedContextInjection,
    dot_product_attention,
    merge_heads,
    split_heads,
)
from fluxflow_jax.models.layers import Conv, Dense, coord_channels, layer_norm

Dtype = Any
N_TIMESTEPS = 1000
PILLAR_DEPTH = 3


# ----------------------------------------------------------------------------------------------
# Pure helpers


def rope_inv_freq(head_dim: int) -> np.ndarray:
    """The reference's ``rotary_pe.inv_freq`` buffer: ``10000^(-j/(dh/2))``, ``j < dh/2``, float32.

    Computed in float32 arithmetic in the reference's order (divide, power, reciprocal) so the
    exported buffer carries the same values.
    """
    half = head_dim // 2
    expo = np.arange(half, dtype=np.float32) / np.float32(half)
    return (np.float32(1.0) / (np.float32(10000.0) ** expo)).astype(np.float32)


def rope_tables(n_pos: int, head_dim: int) -> tuple[jax.Array, jax.Array]:
    """``(sin, cos)`` of shape ``[n_pos, head_dim]`` with the pattern ``[a0, a0, a1, a1, ...]``."""
    ang = jnp.arange(n_pos, dtype=jnp.float32)[:, None] * jnp.asarray(rope_inv_freq(head_dim))[None]
    return jnp.repeat(jnp.sin(ang), 2, axis=-1), jnp.repeat(jnp.cos(ang), 2, axis=-1)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """The reference's rotary map on ``[B, H, S, Dh]``: ``x*cos + cat(-x2, x1)*sin``.

    ``x1, x2`` are the two halves of the head dim while ``sin``/``cos`` are laid out interleaved,
    so this is not a true rotation; it is what the reference's checkpoints were trained with.
    """
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos.astype(x.dtype) + rot * sin.astype(x.dtype)


def time_index(t: jax.Array) -> jax.Array:
    """Embedding index of float ``t`` in ``[0, 1]``: ``trunc(999 t)`` clamped to ``[0, 999]``.

    The product is taken in float32 as in the reference (``(t*999).long()`` truncates toward
    zero), so ``t=0.5 -> 499`` and ``t=1 -> 999``; values outside ``[0, 1]`` clamp.
    """
    s = jnp.trunc(jnp.asarray(t, jnp.float32) * jnp.float32(N_TIMESTEPS - 1))
    return jnp.clip(s, 0, N_TIMESTEPS - 1).astype(jnp.int32)


def grid_from_hw_token(hw_token: Any, max_hw: int) -> list[tuple[int, int]]:
    """Per-sample ``(h, w)`` from the HW token ``[B, d]``: ``round(v * max_hw)``, at least 1.

    Raises a ValueError under tracing (``jit``, ``eval_shape``): the grid decides array shapes,
    so it must then be given statically as ``hw=(h, w)``.
    """
    try:
        v = np.asarray(hw_token, dtype=np.float32)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError) as e:
        raise ValueError(
            "FluxFlowProcessor: the latent grid cannot be read from the HW token inside jit/"
            "eval_shape (it is traced); pass hw=(h, w) as a static argument") from e
    hs = np.maximum(np.round(v[:, 0] * np.float32(max_hw)), 1).astype(int)
    ws = np.maximum(np.round(v[:, 1] * np.float32(max_hw)), 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(hs, ws)]


def valid_grid(h: int, w: int, n_tokens: int) -> tuple[int, int, int]:
    """``(h, w, t_valid)`` of the map the output head sees, given ``n_tokens`` image tokens.

    ``t_valid = min(h*w, T)``. When the HW token promises more tokens than there are, the
    reference shrinks the grid to ``h = floor(sqrt(t_valid))``, ``w = t_valid // h``; its
    rearrange then fails whenever ``h*w != t_valid`` (section 10 item 23). What it evidently
    meant, and what this does: use the largest such ``h x w`` map, i.e. the first ``h*w <=
    t_valid`` tokens. ``t_valid`` itself still bounds how many tokens get the context update.
    """
    t_valid = min(h * w, n_tokens)
    if t_valid < 1:
        raise ValueError(f"FluxFlowProcessor: no image tokens (grid {h}x{w}, {n_tokens} tokens)")
    if t_valid < h * w:
        h = math.isqrt(t_valid)
        w = t_valid // h
    return h, w, t_valid


# ----------------------------------------------------------------------------------------------
# Modules


class ParallelAttention(nn.Module):
    """Attention with queries from ``x_q`` and keys/values from ``x_kv`` (one ``kv_proj``).

    ``kv_proj`` has ``2D`` outputs: k is the first ``D``, v the last ``D``; heads are split
    head-major (``(h d)``). RoPE goes on q and k; no mask. All Linears xavier with zero bias.
    """

    d_model: int
    n_head: int
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x_q: jax.Array, x_kv: jax.Array, rope_q: tuple[jax.Array, jax.Array],
                 rope_k: tuple[jax.Array, jax.Array]) -> jax.Array:
        d = self.d_model
        q_proj = Dense(d, init="xavier", dtype=self.dtype, name="q_proj")
        kv = Dense(2 * d, init="xavier", dtype=self.dtype, name="kv_proj")(x_kv)
        out_proj = Dense(d, init="xavier", dtype=self.dtype, name="out_proj")
        if x_kv.shape[1] == 1:
            # One key (the flow's cross-attention to its one text token): the softmax of one
            # logit is exactly 1, so every query reads that token's v whatever q and k are, and
            # q's gradient is exactly 0. q_proj keeps its parameters (the reference's layout)
            # but runs on zero tokens; out_proj runs once per sample instead of once per token.
            q_proj(x_q[:, :0])
            out = out_proj(kv[..., d:])
            return jnp.broadcast_to(out, (x_q.shape[0], x_q.shape[1], d))
        q = split_heads(q_proj(x_q), self.n_head)
        k = split_heads(kv[..., :d], self.n_head)
        v = split_heads(kv[..., d:], self.n_head)
        q = apply_rope(q, *rope_q)
        k = apply_rope(k, *rope_k)
        return out_proj(merge_heads(dot_product_attention(q, k, v)))


class Pillar(nn.Module):
    """``depth`` x (Linear(D, D) -> SiLU), SiLU after the last layer too (reference pillarLayer)."""

    d_model: int
    depth: int = PILLAR_DEPTH
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.depth):
            x = jax.nn.silu(Dense(self.d_model, init="xavier", dtype=self.dtype, name=f"l{i}")(x))
        return x


class FluxTransformerBlock(nn.Module):
    """Self-attention, cross-attention to text, four gated "pillar" MLPs, FFN, Bezier mixing.

    ``x += SA(LN1 x)``; ``x += CA(LN2 x, LN2 text)`` (the *same* norm2 on both); ``g =
    sigmoid(x)``; ``P_k = pillar_k(g * P_k_prev)`` (``pillar_k(g)`` in the first block);
    ``x += ffn(LN3 x)``; ``x = Bz_s(cat[x, P0, P1, P2, P3])`` with the reference's grouping of 5
    consecutive channels of the concatenation (so t/p roles mix channels of x and the P's).

    Ablation (``activation`` relu/silu/gelu): the Bezier mixing becomes ``act(mean(x, P0..P3))``.
    The Bezier output is a convex (Bernstein-weighted) combination of its control points, so the
    narrow stand-in keeps that scale - an average of the five streams - and, like the Bezier, lets
    every stream reach the next block, with no 5x-wide intermediate. The pillars keep their SiLU
    (they are MLPs, not Bezier sites).
    """

    d_model: int
    n_head: int
    activation: str = "bezier"
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, text_seq: jax.Array, rope_img: tuple[jax.Array, jax.Array],
                 rope_txt: tuple[jax.Array, jax.Array],
                 p_prev: tuple[jax.Array, ...] | None = None
                 ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        d = self.d_model
        norm1 = layer_norm("norm1", dtype=self.dtype)
        norm2 = layer_norm("norm2", dtype=self.dtype)
        norm3 = layer_norm("norm3", dtype=self.dtype)
        h = norm1(x)
        x = x + ParallelAttention(d, self.n_head, self.dtype, name="self_attn")(
            h, h, rope_img, rope_img)
        x = x + ParallelAttention(d, self.n_head, self.dtype, name="cross_attn")(
            norm2(x), norm2(text_seq), rope_img, rope_txt)
        g = jax.nn.sigmoid(x)
        ps = tuple(Pillar(d, dtype=self.dtype, name=f"p{k}")(g if p_prev is None else g * p_prev[k])
                   for k in range(4))
        x = x + Dense(d, init="xavier", dtype=self.dtype, name="ffn")(norm3(x))
        if check_activation(self.activation) == "bezier":
            x = bz_s(jnp.concatenate((x,) + ps, axis=-1))
        else:
            x = STANDARD_ACTIVATIONS[self.activation]((x + ps[0] + ps[1] + ps[2] + ps[3]) / 5.0)
        return x, ps


class FluxFlowProcessor(nn.Module):
    """The flow transformer on packed VAE latents (reference ``FluxFlowProcessor``).

    ``__call__(packed [B, T+1, d], text_emb [B, E], t [B] float in [0, 1], hw=None)`` returns
    ``[B, T+1, d]`` with the HW token copied from the input. ``hw=(h, w)`` is the latent grid, a
    static Python tuple (needed under ``jit``); without it the grid is read concretely from the
    HW token, per sample, as the reference does (samples with different grids then take
    separate output-head passes, like the reference's slow path).

    When the HW token promises more tokens than ``T``, the output head uses the largest full map
    it can (see :func:`valid_grid`) instead of crashing as the reference would.

    ``activation='bezier'`` is the reference; ``'relu'|'silu'|'gelu'`` replace every Bezier and
    TrainableBezier site with that activation and drop the control-point parameters; the
    block's Bezier mixing of ``[x, P0..P3]`` becomes ``act(mean(x, P0, P1, P2, P3))`` (see
    FluxTransformerBlock for why). These variants have no reference checkpoint layout.
    ``remat=True`` recomputes each block in the backward pass (same numbers, less memory).
    Parameters are float32; ``dtype`` is the compute dtype.
    """

    d_model: int = 512
    vae_dim: int = 128
    embedding_size: int = 1024
    n_head: int = 8
    n_layers: int = 10
    max_hw: int = 1024
    ctx_tokens: int = 4
    activation: str = "bezier"
    remat: bool = False
    dtype: Dtype | None = None

    def _check(self) -> None:
        check_activation(self.activation)
        if self.d_model % self.n_head:
            raise ValueError(f"FluxFlowProcessor: d_model {self.d_model} not divisible by "
                             f"n_head {self.n_head}")
        if (self.d_model // self.n_head) % 2:
            raise ValueError(f"FluxFlowProcessor: head dim {self.d_model // self.n_head} must be "
                             "even for RoPE")

    @nn.compact
    def __call__(self, packed: jax.Array, text_emb: jax.Array, t: jax.Array,
                 hw: Sequence[int] | None = None) -> jax.Array:
        self._check()
        d, act = self.d_model, self.activation
        x_v, hw_tok = packed[:, :-1], packed[:, -1]
        b, n_tok, _ = x_v.shape
        if hw is not None:
            if len(hw) != 2 or min(int(hw[0]), int(hw[1])) < 1:
                raise ValueError(f"FluxFlowProcessor: hw must be a (h, w) pair of positive ints, "
                                 f"got {hw!r}")
            grids = [(int(hw[0]), int(hw[1]))] * b
        else:
            grids = grid_from_hw_token(hw_tok, self.max_hw)

        to_d = Dense(d, dtype=self.dtype, name="vae_to_dmodel")
        to_vae = Dense(self.vae_dim, dtype=self.dtype, name="dmodel_to_vae")
        x = to_d(x_v)
        ctx, _ = ContextAttentionMixer(d, n_head=max(1, d // 128), use_cls=True, dtype=self.dtype,
                                       name="ctx_mixer")(x[:, :min(self.ctx_tokens, n_tok)])

        temb = nn.Embed(N_TIMESTEPS, d, embedding_init=nn.initializers.normal(1.0),
                        param_dtype=jnp.float32, name="time_embed_0")(time_index(t))
        temb = layer_norm("time_embed_1", dtype=self.dtype)(temb.astype(x.dtype))
        temb = TrainableBezier((d,), activation=act, name="time_embed_2")(temb)
        temb = Dense(self.embedding_size, dtype=self.dtype, name="time_embed_3")(temb)
        cond = text_emb.astype(temb.dtype) + temb
        text_seq = Dense(d, dtype=self.dtype, name="text_proj")(cond)[:, None, :]

        dh = d // self.n_head
        rope_img = rope_tables(n_tok, dh)
        rope_txt = rope_tables(text_seq.shape[1], dh)
        inject = GatedContextInjection(d, dtype=self.dtype, name="context_injection")
        block_cls = nn.remat(FluxTransformerBlock) if self.remat else FluxTransformerBlock
        ps = None
        for i in range(self.n_layers):
            x = inject(x, ctx)
            x, ps = block_cls(d, self.n_head, act, self.dtype, name=f"transformer_blocks_{i}")(
                x, text_seq, rope_img, rope_txt, ps)
            ctx = ctx + x.mean(axis=1)

        out = to_vae(x)
        fp0 = Conv(d, 5, padding=2, dtype=self.dtype, name="flow_predictor_0")
        fp1 = TrainableBezier((d,), activation=act, name="flow_predictor_1")
        fp2 = Conv(d, 3, padding=1, dtype=self.dtype, name="flow_predictor_2")
        cf0 = Conv(d, 7, padding=3, dtype=self.dtype, name="context_final_0")
        cf1 = TrainableBezier((d,), activation=act, name="context_final_1")

        def ctx_update(xs: jax.Array, h: int, w: int) -> jax.Array:
            feat = xs[:, :h * w].reshape(xs.shape[0], h, w, d)
            f = fp2(fp1(fp0(feat)))
            c = cf1(cf0(jnp.concatenate([f, coord_channels(xs.shape[0], h, w, f.dtype)], -1)))
            return to_vae(c.mean(axis=(1, 2)))

        # One batched head pass per distinct grid (a single pass in the usual case), like the
        # reference's fast path; mixed grids in a batch reproduce its per-sample slow path.
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, (h, w) in enumerate(grids):
            groups.setdefault(valid_grid(h, w, n_tok), []).append(i)
        upd = jnp.zeros((b, self.vae_dim), out.dtype)
        n_upd = np.zeros((b,), np.int32)
        for (h, w, t_valid), idx in groups.items():
            if len(idx) == b:
                upd = ctx_update(x, h, w).astype(out.dtype)
            else:
                sel = np.asarray(idx)
                upd = upd.at[sel].set(ctx_update(x[sel], h, w).astype(out.dtype))
            n_upd[idx] = min(self.ctx_tokens, t_valid)
        first_k = jnp.arange(n_tok)[None, :, None] < jnp.asarray(n_upd)[:, None, None]
        out = out + jnp.where(first_k, upd[:, None, :], jnp.zeros((), out.dtype))
        return jnp.concatenate([out.astype(packed.dtype), hw_tok[:, None, :]], axis=1)
