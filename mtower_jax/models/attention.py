"""Multi-head scaled dot-product attention, used by every encoder and cross-modal layer.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_head) + mask) V,   Q = x_q W_q, K = x_kv W_k, V = x_kv W_v

Projections are [embed, heads, kv] so tensor parallelism can split heads; the output
projection is [heads, kv, embed]. Softmax runs in float32 whatever the compute dtype.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtower_jax.models.layers import Dense, Dropout, Dtype
from mtower_jax.models.partitioning import constrain


class MultiHeadAttention(nn.Module):
    num_heads: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array, kv_mask: jax.Array | None,
                 train: bool) -> jax.Array:
        """inputs_q [B, Lq, D], inputs_kv [B, Lk, D], kv_mask [B, Lk] (True = attend) or None
        -> [B, Lq, D]."""
        width = inputs_q.shape[-1]
        head_dim = width // self.num_heads

        def project(name: str, x: jax.Array) -> jax.Array:
            y = Dense((self.num_heads, head_dim), ("embed", "heads", "kv"), dtype=self.dtype,
                      param_dtype=self.param_dtype, name=name)(x)
            return constrain(y, ("act_batch", "act_len", "act_heads", "act_kv"))

        q = project("query", inputs_q)
        k = project("key", inputs_kv)
        v = project("value", inputs_kv)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
        if kv_mask is not None:
            logits = jnp.where(kv_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        probs = Dropout(self.dropout_rate)(probs, deterministic=not train)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return Dense(width, ("heads", "kv", "embed"), contract_dims=2, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="out")(context)
