"""RoBERTa text encoder: token + position + type embeddings, then post-LN transformer layers.

    x_0 = LN(E_tok[ids] + E_pos[pos] + E_type[0]),   pos = pad + cumsum(ids != pad) (pad tokens keep pos = pad)
    x_l = LN(y + FFN(y)),  y = LN(x_{l-1} + SelfAttn(x_{l-1}))          (BERT-style post-LN)

The layers are `layer_{i}` modules, or with `scan_layers` (model.scan_layers) one nn.scan
over a module `layers` whose parameters are stacked [num_layers, ...] (models/layer_stack.py);
both give the same outputs.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mtower_jax.models.attention import MultiHeadAttention
from mtower_jax.models.feedforward import FeedForward
from mtower_jax.models.layer_stack import STACKED, layer_outputs, scanned
from mtower_jax.models.layers import Dropout, Dtype, Embed, LayerNorm
from mtower_jax.models.partitioning import constrain

ACT = ("act_batch", "act_len", "act_embed")


class TextLayer(nn.Module):
    cfg: ml_collections.FrozenConfigDict  # model.text
    attention_impl: str = "auto"  # model.attention_impl (attention.py)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
        """x [B, L, D], mask [B, L] bool -> [B, L, D]."""
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        drop = Dropout(c.dropout, deterministic=not train)
        a = MultiHeadAttention(c.num_heads, c.attention_dropout, self.attention_impl,
                               name="attention", **kw)(
            x, x, mask, train)
        x = LayerNorm(c.layer_norm_eps, name="attention_norm", **kw)(x + drop(a))
        h = FeedForward(c.mlp_dim, c.activation, name="mlp", **kw)(x)
        x = LayerNorm(c.layer_norm_eps, name="mlp_norm", **kw)(x + drop(h))
        return constrain(x, ACT)


class TextEncoder(nn.Module):
    cfg: ml_collections.FrozenConfigDict  # model.text
    remat: bool = False
    scan_layers: bool = False
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, train: bool,
                 num_outputs: int) -> dict:
        """input_ids, attention_mask [B, L] -> {'hidden_states': num_layers x [B, L, D],
        'outputs': [num_outputs, B, L, D] (the top layers, sent to the cross-modal side)}."""
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        not_pad = (input_ids != c.pad_token_id).astype(jnp.int32)
        position_ids = jnp.cumsum(not_pad, axis=1) * not_pad + c.pad_token_id
        x = (Embed(c.vocab_size, c.hidden_size, "vocab", name="word_embeddings", **kw)(input_ids)
             + Embed(c.max_position_embeddings, c.hidden_size, "pos", name="position_embeddings",
                     **kw)(position_ids)
             + Embed(c.type_vocab_size, c.hidden_size, "types", name="token_type_embeddings",
                     **kw).table()[0])
        x = LayerNorm(c.layer_norm_eps, name="embeddings_norm", **kw)(x)
        x = constrain(Dropout(c.dropout, deterministic=not train)(x), ACT)

        mask = attention_mask.astype(bool)
        if self.scan_layers:  # one nn.scan over `layers` (layer_stack.py)
            layer = scanned(TextLayer, c.num_layers, 2, self.remat)
            _, ys = layer(c, self.attention_impl, name=STACKED, **kw)(x, mask, train)
            return {"hidden_states": layer_outputs(ys), "outputs": ys[c.num_layers - num_outputs:]}
        layer = nn.remat(TextLayer, static_argnums=(3,)) if self.remat else TextLayer
        hidden_states = []
        for i in range(c.num_layers):
            x = layer(c, self.attention_impl, name=f"layer_{i}", **kw)(x, mask, train)
            hidden_states.append(x)
        return {"hidden_states": tuple(hidden_states),
                "outputs": jnp.stack(hidden_states[c.num_layers - num_outputs:])}
