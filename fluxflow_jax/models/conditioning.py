"""Conditioning blocks shared by the VAE expander and the flow processor."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from fluxflow_jax.models.layers import Dense, layer_norm


def split_heads(x: jax.Array, n_head: int) -> jax.Array:
    """``[B, S, H*Dh] -> [B, H, S, Dh]`` with head-major channel order, as ``view(B,S,H,Dh)``."""
    b, s, d = x.shape
    return x.reshape(b, s, n_head, d // n_head).transpose(0, 2, 1, 3)


def merge_heads(x: jax.Array) -> jax.Array:
    b, h, s, dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, s, h * dh)


@jax.custom_vjp
def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Unmasked softmax attention on ``[B, H, S, Dh]`` heads (softmax in fp32).

    The forward is the plain one (the same values as ``jax.nn.softmax``). The backward is
    written out because autodiff of the softmax costs passes over the ``[S, S]`` weights that
    the identity ``rowsum(dP * P) = rowsum(dO * O)`` (as in FlashAttention) replaces by one over
    ``[S, Dh]``. The flow step at 512 px (1024 tokens) went 2457 -> 2247 ms on 2 CPU cores, at
    256 px 272 -> 251 ms (``benchmarks/README.md``, "Attention backward").
    """
    return _attention_fwd(q, k, v)[0]


def _materialised_swap(a: jax.Array) -> jax.Array:
    """``a [B, H, X, Y]`` as ``[B, H, Y, X]``, on CPU written out behind an optimization barrier
    so XLA cannot fold it back into the dot that reads it (see :func:`_attention_fwd`)."""
    t = jnp.swapaxes(a, 2, 3)
    return jax.lax.optimization_barrier(t) if jax.default_backend() == "cpu" else t


def _attention_fwd(q: jax.Array, k: jax.Array, v: jax.Array):
    """Forward, and the residuals of the backward: the weights are kept transposed.

    Why transposed: ``dV = P^T dO`` and ``dK = dS^T Q`` contract over the query axis. Folded
    into a dot as a transposed left operand, that is not a form the CPU's dot library (YNNPACK)
    takes, and XLA's own kernel runs it at a quarter of the speed (1.55 ms against 0.37 ms at
    ``[2, 8, 256, 256] x [.., 16]`` on 2 cores). Keeping ``P^T`` (one written-out transpose of
    the weights, 0.21 ms there) and forming ``dS^T`` directly from it puts both products, and
    ``dQ`` after one more transpose, in the library's form, at the memory of keeping ``P``.
    """
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) * scale
    w = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", w, v, preferred_element_type=jnp.float32)
    return out.astype(v.dtype), (q, k, v, _materialised_swap(w), out)


def _attention_bwd(res, d_out: jax.Array):
    q, k, v, w_t, out = res  # w_t: the weights as [B, H, K, Q]
    scale = q.shape[-1] ** -0.5
    dv = jnp.einsum("bhkq,bhqd->bhkd", w_t, d_out)
    dw_t = jnp.einsum("bhkd,bhqd->bhkq", v, d_out, preferred_element_type=jnp.float32)
    row = jnp.sum(d_out.astype(jnp.float32) * out, -1)  # out kept in fp32; [B, H, Q]
    d_logits_t = (w_t.astype(jnp.float32) * (dw_t - row[:, :, None, :]) * scale).astype(q.dtype)
    dk = jnp.einsum("bhkq,bhqd->bhkd", d_logits_t, q)
    dq = jnp.einsum("bhqk,bhkd->bhqd", _materialised_swap(d_logits_t), k)
    return dq, dk, dv


dot_product_attention.defvjp(_attention_fwd, _attention_bwd)


class ContextAttentionMixer(nn.Module):
    """Self-attention over a few context tokens with an optional learned CLS pooling token.

    ``x [B, K, D] -> (pooled [B, D], tokens [B, K, D])``. Params: ``cls [1,1,D]`` (zeros),
    ``q_proj/k_proj/v_proj/out_proj`` (xavier, zero bias), ``norm_in/norm_out``.
    """

    d_model: int
    n_head: int = 4
    use_cls: bool = True
    dtype: Optional[jnp.dtype] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.d_model % self.n_head:
            raise ValueError(f"ContextAttentionMixer: d_model {self.d_model} not divisible by "
                             f"n_head {self.n_head}")
        b = x.shape[0]
        y = layer_norm("norm_in")(x)
        if self.use_cls:
            cls = self.param("cls", nn.initializers.zeros, (1, 1, self.d_model), jnp.float32)
            y = jnp.concatenate([jnp.broadcast_to(cls.astype(y.dtype), (b, 1, self.d_model)), y], 1)
        dense = lambda name: Dense(self.d_model, init="xavier", dtype=self.dtype, name=name)
        q = split_heads(dense("q_proj")(y), self.n_head)
        k = split_heads(dense("k_proj")(y), self.n_head)
        v = split_heads(dense("v_proj")(y), self.n_head)
        out = merge_heads(dot_product_attention(q, k, v))
        out = layer_norm("norm_out")(dense("out_proj")(out))
        if self.use_cls:
            return out[:, 0], out[:, 1:]
        return out.mean(axis=1), out


def mixer_rule(path: tuple) -> Optional[tuple[str, str]]:
    """Interop rule for a ContextAttentionMixer's own sub-path (after its module name)."""
    if path == ("cls",):
        return "cls", "plain"
    mod, leaf = path[0], path[-1]
    if mod.startswith("norm"):
        return f"{mod}.{'weight' if leaf == 'scale' else 'bias'}", "plain"
    kind = "linear" if leaf == "kernel" else "plain"
    return f"{mod}.{'weight' if leaf == 'kernel' else 'bias'}", kind


class GatedContextInjection(nn.Module):
    """``x * sigmoid(gate(c)) + bias(c)``: a pooled context vector modulates every token.

    ``x [B, T, D]``, ``context [B, C] -> [B, T, D]``. Submodules ``gate`` and ``bias`` are plain
    Linears with torch's default init (the reference does not xavier-initialise this module).
    """

    target_dim: int
    dtype: Optional[jnp.dtype] = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        g = jax.nn.sigmoid(Dense(self.target_dim, dtype=self.dtype, name="gate")(context))
        b = Dense(self.target_dim, dtype=self.dtype, name="bias")(context)
        return x * g[:, None, :] + b[:, None, :]
