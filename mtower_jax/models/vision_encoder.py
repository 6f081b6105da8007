"""CLIP ViT vision encoder: patch embedding, class token, pre-LN transformer layers.

    x_0 = ln_pre([cls ; patches W_patch] + E_pos)
    x_l = y + MLP(ln_2(y)),  y = x_{l-1} + SelfAttn(ln_1(x_{l-1}))      (pre-LN, QuickGELU)

Every layer output sent to the cross-modal side passes through the one shared `ln_post`.
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
from mtower_jax.models.layers import INIT_STD, Dense, Dropout, Dtype, LayerNorm
from mtower_jax.models.partitioning import constrain, logical

ACT = ("act_batch", "act_len", "act_embed")
STACKED_ACT = (None, *ACT)  # [layers, B, T, D]: the top layers sent across


def patchify(pixel_values: jax.Array, patch_size: int) -> jax.Array:
    """[B, H, W, C] -> [B, (H/P)*(W/P), P*P*C], patches in row-major grid order, each flattened
    as (row, col, channel): the layout of a stride-P conv kernel [P, P, C, D]."""
    b, h, w, c = pixel_values.shape
    p = patch_size
    x = pixel_values.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


class VisionLayer(nn.Module):
    cfg: ml_collections.FrozenConfigDict  # model.vision
    attention_impl: str = "auto"  # model.attention_impl (attention.py)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """x [B, 1+P, D] -> [B, 1+P, D]."""
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        drop = Dropout(c.dropout, deterministic=not train)
        h = LayerNorm(c.layer_norm_eps, name="attention_norm", **kw)(x)
        x = x + drop(MultiHeadAttention(c.num_heads, c.attention_dropout, self.attention_impl,
                                         name="attention", **kw)(h, h, None, train))
        h = LayerNorm(c.layer_norm_eps, name="mlp_norm", **kw)(x)
        x = x + drop(FeedForward(c.mlp_dim, c.activation, name="mlp", **kw)(h))
        return constrain(x, ACT)


class VisionEncoder(nn.Module):
    cfg: ml_collections.FrozenConfigDict  # model.vision
    remat: bool = False
    scan_layers: bool = False
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, train: bool, num_outputs: int) -> dict:
        """pixel_values [B, H, W, 3] (CLIP-normalised) -> {'hidden_states': num_layers x
        [B, 1+P, D] (raw layer outputs), 'outputs': [num_outputs, B, 1+P, D] (the top layers
        after the shared ln_post)}."""
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if pixel_values.shape[1:3] != (c.image_size, c.image_size):
            raise ValueError(f"pixel_values are {pixel_values.shape[1:3]} but the model is built "
                             f"for image_size {c.image_size}; resize the images or set "
                             f"model.vision.image_size")
        patches = Dense(c.hidden_size, ("patch", "embed"), use_bias=False, name="patch_embedding",
                        **kw)(patchify(pixel_values, c.patch_size))
        cls = self.param("class_embedding", logical(nn.initializers.normal(INIT_STD), ("embed",)),
                         (c.hidden_size,), self.param_dtype)
        num_positions = (c.image_size // c.patch_size) ** 2 + 1
        pos = self.param("position_embedding",
                         logical(nn.initializers.normal(INIT_STD), ("pos", "embed")),
                         (num_positions, c.hidden_size), self.param_dtype)
        cls = jnp.broadcast_to(cls.astype(self.dtype), (patches.shape[0], 1, c.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1) + pos.astype(self.dtype)
        x = constrain(LayerNorm(c.layer_norm_eps, name="ln_pre", **kw)(x), ACT)

        if self.scan_layers:  # one nn.scan over `layers` (layer_stack.py)
            layer = scanned(VisionLayer, c.num_layers, 1, self.remat)
            _, ys = layer(c, self.attention_impl, name=STACKED, **kw)(x, train)
            hidden_states, outputs = layer_outputs(ys), ys[c.num_layers - num_outputs:]
        else:
            layer = nn.remat(VisionLayer, static_argnums=(2,)) if self.remat else VisionLayer
            hidden_states = []
            for i in range(c.num_layers):
                x = layer(c, self.attention_impl, name=f"layer_{i}", **kw)(x, train)
                hidden_states.append(x)
            hidden_states = tuple(hidden_states)
            outputs = jnp.stack(hidden_states[c.num_layers - num_outputs:])
        ln_post = LayerNorm(c.layer_norm_eps, name="ln_post", **kw)
        # Pinned before and after: ln_post's scale is split over `fsdp` under the fsdp rules,
        # and left free, XLA's partitioner gathered the whole global batch of these layers
        # onto every device for it (base on a v5e-256: 17.3 -> 9.9 GiB of temporaries per chip,
        # docs/SCALING.md).
        outputs = constrain(ln_post(constrain(outputs, STACKED_ACT)), STACKED_ACT)
        return {"hidden_states": hidden_states, "outputs": outputs}
