"""The position-wise feed-forward block of every transformer layer: act(x W_1 + b_1) W_2 + b_2."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtower_jax.models.layers import ACTIVATIONS, Dense, Dtype
from mtower_jax.models.partitioning import constrain


class FeedForward(nn.Module):
    mlp_dim: int
    activation: str = "gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, L, D] -> [B, L, D]."""
        h = Dense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype,
                  name="intermediate")(x)
        h = constrain(ACTIVATIONS[self.activation](h), ("act_batch", "act_len", "act_mlp"))
        return Dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype,
                     param_dtype=self.param_dtype, name="output")(h)
