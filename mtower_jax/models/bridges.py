"""BridgeTower's bridge ("link tower"): joins uni-modal layer 6+l to the previous cross layer.

    add:         LN(h + C)
    scaled_add:  LN(h * s + C)             s learnable, init 1
    interpolate: LN(h * (1 - b) + C * b)   b learnable, init 0.5

h: the uni-modal layer after transform + token type [B, L, D]; C: previous cross-modal output.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtower_jax.models.layers import Dtype, LayerNorm
from mtower_jax.models.partitioning import logical

BRIDGE_TYPES = ("add", "scaled_add", "interpolate")


class Bridge(nn.Module):
    type: str = "add"
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, cross: jax.Array) -> jax.Array:
        """hidden, cross [B, L, D] -> [B, L, D]."""
        def scalar(name: str, value: float) -> jax.Array:
            return self.param(name, logical(nn.initializers.constant(value), ()), (),
                              self.param_dtype).astype(self.dtype)

        if self.type == "add":
            x = hidden + cross
        elif self.type == "scaled_add":
            x = hidden * scalar("scaled_factor", 1.0) + cross
        elif self.type == "interpolate":
            beta = scalar("beta", 0.5)
            x = hidden * (1 - beta) + cross * beta
        else:
            raise ValueError(f"unknown bridge type {self.type!r}; choose from {BRIDGE_TYPES}")
        return LayerNorm(self.layer_norm_eps, name="norm", dtype=self.dtype,
                         param_dtype=self.param_dtype)(x)
