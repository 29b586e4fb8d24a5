"""DistilBERT in Flax and FluxFlow's ``BertTextEncoder`` (reference §1.5).

transformers 5 has no Flax models, so the backbone lives here, written to HF DistilBERT's
semantics: learned position embeddings, post-LN blocks with LayerNorm eps 1e-12, exact (erf)
GELU, keys masked by ``attention_mask == 0`` before the softmax, dropout on embeddings,
attention weights and FFN output. Parameter names mirror HF's module names so the checkpoint
map is one line per layer type (see ``fluxflow_jax.interop.text``).

Initialisation from scratch is the reference's: embeddings N(0, 0.02) with the padding row
zero (HF ``init_weights``), every Linear xavier-uniform with zero bias (the reference's
``apply(xavier_init)``), LayerNorms ones/zeros.

Pretrained weights: ``fluxflow_jax.interop.text`` reads a local HF DistilBERT directory into
these modules (the key map lives with the other checkpoint maps, so this module imports nothing
from ``interop`` and models stay importable alone). The reference re-initialises all pretrained
Linears with xavier after loading (REFERENCE §10 item 12), which throws the pretraining away; the
loader does **not** do that - loaded weights stay as loaded.

Freezing: ``freeze_backbone=True`` stops gradients at the DistilBERT output, so its gradients
are exactly zero. An optimizer with weight decay would still move zero-gradient weights, so
training code must also mask the ``language_model`` subtree out of the optimizer
(``optax.set_to_zero`` on that label), as the reference's ``requires_grad=False`` does.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from fluxflow_jax.models.bezier import act_width, apply_act, check_activation
from fluxflow_jax.models.conditioning import merge_heads, split_heads
from fluxflow_jax.models.layers import Dense, Dtype, layer_norm

BERT_LN_EPS = 1e-12
POOLINGS = ("mean", "masked_mean")
# Constructor kwargs of DistilBert (and what load_hf_distilbert returns as config).
DISTILBERT_KEYS = ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim",
                   "max_position_embeddings", "dropout", "attention_dropout", "pad_token_id")


class Embed(nn.Module):
    """Token/position embedding table ``embedding [num, features]`` (torch ``nn.Embedding``).

    With ``padding_idx`` the row is initialised to zero and receives no gradient, as torch's
    ``padding_idx`` does (HF DistilBERT's word embeddings use ``pad_token_id``).
    """

    num_embeddings: int
    features: int
    padding_idx: Optional[int] = None
    std: float = 0.02

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        def init(key, shape, dtype=jnp.float32):
            table = self.std * jax.random.normal(key, shape, dtype)
            return table if self.padding_idx is None else table.at[self.padding_idx].set(0.0)

        table = self.param("embedding", init, (self.num_embeddings, self.features), jnp.float32)
        out = jnp.take(table, ids, axis=0)
        if self.padding_idx is not None:
            out = jnp.where((ids == self.padding_idx)[..., None], jax.lax.stop_gradient(out), out)
        return out


def _bert_ln(name: str) -> nn.LayerNorm:
    return layer_norm(name, eps=BERT_LN_EPS)


class MultiHeadSelfAttention(nn.Module):
    """HF ``DistilBertSelfAttention``: q/k/v/out Linears; masked keys get ``finfo.min``."""

    dim: int
    n_heads: int
    attention_dropout: float = 0.1
    dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array], deterministic: bool) -> jax.Array:
        dense = lambda name: Dense(self.dim, init="xavier", dtype=self.dtype, name=name)
        q = split_heads(dense("q_lin")(x), self.n_heads)
        k = split_heads(dense("k_lin")(x), self.n_heads)
        v = split_heads(dense("v_lin")(x), self.n_heads)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
        scores = scores * (q.shape[-1] ** -0.5)
        if mask is not None:
            scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        w = jax.nn.softmax(scores, axis=-1)
        w = nn.Dropout(self.attention_dropout)(w, deterministic=deterministic).astype(v.dtype)
        out = merge_heads(jnp.einsum("bhqk,bhkd->bhqd", w, v))
        return dense("out_lin")(out)


class FFN(nn.Module):
    dim: int
    hidden_dim: int
    dropout: float = 0.1
    dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        h = Dense(self.hidden_dim, init="xavier", dtype=self.dtype, name="lin1")(x)
        h = jax.nn.gelu(h, approximate=False)
        h = Dense(self.dim, init="xavier", dtype=self.dtype, name="lin2")(h)
        return nn.Dropout(self.dropout)(h, deterministic=deterministic)


class TransformerBlock(nn.Module):
    """Post-LN block: ``LN(x + attn(x))`` then ``LN(h + ffn(h))``."""

    dim: int
    n_heads: int
    hidden_dim: int
    dropout: float = 0.1
    attention_dropout: float = 0.1
    dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array], deterministic: bool) -> jax.Array:
        a = MultiHeadSelfAttention(self.dim, self.n_heads, self.attention_dropout, self.dtype,
                                   name="attention")(x, mask, deterministic)
        h = _bert_ln("sa_layer_norm")(a + x)
        f = FFN(self.dim, self.hidden_dim, self.dropout, self.dtype, name="ffn")(h, deterministic)
        return _bert_ln("output_layer_norm")(f + h)


class Embeddings(nn.Module):
    """Word + learned position embeddings -> LayerNorm(eps 1e-12) -> dropout."""

    vocab_size: int
    dim: int
    max_position_embeddings: int
    dropout: float = 0.1
    pad_token_id: int = 0

    @nn.compact
    def __call__(self, input_ids: jax.Array, deterministic: bool) -> jax.Array:
        words = Embed(self.vocab_size, self.dim, self.pad_token_id, name="word_embeddings")
        pos = Embed(self.max_position_embeddings, self.dim, name="position_embeddings")
        x = words(input_ids) + pos(jnp.arange(input_ids.shape[1]))[None]
        x = _bert_ln("LayerNorm")(x)
        return nn.Dropout(self.dropout)(x, deterministic=deterministic)


class DistilBert(nn.Module):
    """HF ``DistilBertModel``: ``input_ids [B, L] -> last_hidden_state [B, L, dim]``.

    ``attention_mask`` (1 = token, 0 = padding) hides padded keys from every query; padded
    positions still get outputs, as in HF.
    """

    vocab_size: int = 30522
    dim: int = 768
    n_layers: int = 6
    n_heads: int = 12
    hidden_dim: int = 3072
    max_position_embeddings: int = 512
    dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0
    dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
                 deterministic: bool = True) -> jax.Array:
        if self.dim % self.n_heads:
            raise ValueError(f"DistilBert: n_heads={self.n_heads} must divide dim={self.dim}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
        seq = input_ids.shape[1]
        if seq > self.max_position_embeddings:
            raise ValueError(f"sequence length {seq} exceeds max_position_embeddings="
                             f"{self.max_position_embeddings}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids "
                             f"shape {tuple(input_ids.shape)}")
        x = Embeddings(self.vocab_size, self.dim, self.max_position_embeddings, self.dropout,
                       self.pad_token_id, name="embeddings")(input_ids, deterministic)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        mask = None if attention_mask is None else attention_mask != 0
        for i in range(self.n_layers):
            x = TransformerBlock(self.dim, self.n_heads, self.hidden_dim, self.dropout,
                                 self.attention_dropout, self.dtype,
                                 name=f"layer_{i}")(x, mask, deterministic)
        return x


class BertTextEncoder(nn.Module):
    """FluxFlow's text encoder: DistilBERT -> pooled ``[B, dim]`` -> head -> ``[B, embed_dim]``.

    Head (reference ``ouput_layer``; our ``head/{dense_0, norm_1, dense_3, norm_4}``):
    Linear(dim, 2560) -> LayerNorm -> Bz_s (-> 512) -> Linear(512, 5E) -> LayerNorm -> Bz_s (-> E).
    With ``activation != 'bezier'`` (ablation): Linear(dim, 512) -> LN -> act -> Linear(512, E)
    -> LN -> act. LayerNorms of the head use torch's eps 1e-5.

    ``pooling='mean'`` is the reference's unmasked mean over all positions, padding included
    (what its checkpoints were trained with); ``'masked_mean'`` averages only the positions
    where ``attention_mask == 1``. ``freeze_backbone`` stops gradients at the DistilBERT output
    (see the module docstring for the optimizer side). Dropout needs ``deterministic=False``
    and an rng named ``'dropout'``.
    """

    embed_dim: int = 1024
    vocab_size: int = 30522
    dim: int = 768
    n_layers: int = 6
    n_heads: int = 12
    hidden_dim: int = 3072
    max_position_embeddings: int = 512
    dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0
    pooling: str = "mean"
    freeze_backbone: bool = False
    activation: str = "bezier"
    dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
                 deterministic: bool = True) -> jax.Array:
        if self.pooling not in POOLINGS:
            raise ValueError(f"BertTextEncoder pooling must be one of {POOLINGS}, "
                             f"got {self.pooling!r}")
        check_activation(self.activation)
        h = DistilBert(self.vocab_size, self.dim, self.n_layers, self.n_heads, self.hidden_dim,
                       self.max_position_embeddings, self.dropout, self.attention_dropout,
                       self.pad_token_id, self.dtype, name="language_model")(
                           input_ids, attention_mask, deterministic)
        if self.freeze_backbone:
            h = jax.lax.stop_gradient(h)
        pooled = pool_tokens(h, attention_mask, self.pooling)
        return TextHead(self.embed_dim, self.activation, self.dtype, name="head")(pooled)


class TextHead(nn.Module):
    """The reference's ``ouput_layer``: children ``dense_0, norm_1, dense_3, norm_4`` keep its
    Sequential indices (2 and 5 are the parameter-free Bezier). Width 512 in the middle."""

    embed_dim: int
    activation: str = "bezier"
    dtype: Optional[Dtype] = None
    mid: int = 512

    @nn.compact
    def __call__(self, pooled: jax.Array) -> jax.Array:
        act = check_activation(self.activation)
        x = Dense(act_width(self.mid, act), init="xavier", dtype=self.dtype,
                  name="dense_0")(pooled)
        x = apply_act(layer_norm("norm_1")(x), act, bezier_form="s")
        x = Dense(act_width(self.embed_dim, act), init="xavier", dtype=self.dtype,
                  name="dense_3")(x)
        return apply_act(layer_norm("norm_4")(x), act, bezier_form="s")


def pool_tokens(h: jax.Array, attention_mask: Optional[jax.Array], pooling: str) -> jax.Array:
    """``[B, L, D] -> [B, D]``: plain mean, or mean over ``attention_mask == 1`` positions.

    A row whose mask is all zero pools to zeros under ``'masked_mean'`` (no division by zero).
    """
    if pooling == "mean" or attention_mask is None:
        return jnp.mean(h, axis=1)
    if pooling != "masked_mean":
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    m = (attention_mask != 0).astype(h.dtype)[..., None]
    return jnp.sum(h * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)

