"""One cross-modal (co-attention) layer of one stream: BERT post-LN with a cross-attention block.

    a = LN(x + SelfAttn(x))                   own-stream mask
    b = LN(a + CrossAttn(q=a, kv=other))      other stream's mask
    y = LN(b + FFN(b))

The text and image streams each have their own stack; layer l of both streams reads the
inputs of layer l of both streams (symmetric co-attention), which the backbone arranges.

With `positions` [B, P] the layer is computed for those P tokens only: they are the queries
of both attentions and the only rows of the residuals and FFN, while keys and values still
come from all of x and other. Each output row equals the full layer's row at that position
(the last layer's rows nobody reads, e.g. all but [CLS] for ITM, are then never computed).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mtower_jax.models.attention import MultiHeadAttention
from mtower_jax.models.feedforward import FeedForward
from mtower_jax.models.layers import Dropout, Dtype, LayerNorm
from mtower_jax.models.partitioning import constrain


class CrossModalLayer(nn.Module):
    cfg: ml_collections.FrozenConfigDict  # model.cross
    attention_impl: str = "auto"  # model.attention_impl (attention.py)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, other: jax.Array, mask: jax.Array | None,
                 other_mask: jax.Array | None, train: bool,
                 positions: jax.Array | None = None) -> jax.Array:
        """x [B, L, D], other [B, L', D], masks [B, L] / [B, L'] bool or None, positions
        [B, P] int or None -> [B, L, D] ([B, P, D] with positions)."""
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        drop = Dropout(c.dropout, deterministic=not train)
        queries = x if positions is None else jnp.take_along_axis(x, positions[..., None], 1)
        a = MultiHeadAttention(c.num_heads, c.attention_dropout, self.attention_impl,
                               name="attention", **kw)(
            queries, x, mask, train)
        x = LayerNorm(c.layer_norm_eps, name="attention_norm", **kw)(queries + drop(a))
        a = MultiHeadAttention(c.num_heads, c.attention_dropout, self.attention_impl,
                               name="cross_attention", **kw)(
            x, other, other_mask, train)
        x = LayerNorm(c.layer_norm_eps, name="cross_attention_norm", **kw)(x + drop(a))
        h = FeedForward(c.mlp_dim, c.activation, name="mlp", **kw)(x)
        x = LayerNorm(c.layer_norm_eps, name="mlp_norm", **kw)(x + drop(h))
        return constrain(x, ("act_batch", "act_len", "act_embed"))
