"""The vision-language backbone: two uni-modal encoders, the interface, the cross-modal stacks.

    U^text  = top layers of RoBERTa(input_ids)          -> W_text  U + E_type[0]
    U^image = ln_post(top layers of CLIP-ViT(pixels))   -> W_image U + E_type[image_token_type]
    for l in 1..L:   x_in, y_in = tower inputs (towers.py)
                     C^text_l  = CrossLayer^text_l(x_in, y_in),  C^image_l = CrossLayer^image_l(y_in, x_in)
    cls_feats = [tanh(P_text C^text_L[:, 0]) ; tanh(P_image C^image_L[:, 0])]

It knows nothing of heads. `encode_text`, `encode_image` and `fuse` are separate methods so
callers can reuse one encoding (NLVR2's two images share the text; ITM negatives can reuse
the batch's image encoding).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mtower_jax.models.cross_modal import CrossModalLayer
from mtower_jax.models.layers import Dense, Dtype, Embed
from mtower_jax.models.text_encoder import TextEncoder
from mtower_jax.models.towers import TOWER_INPUTS, num_uni_modal_inputs
from mtower_jax.models.vision_encoder import VisionEncoder


class Pooler(nn.Module):
    """tanh(x[:, 0] W + b): [B, L, D] -> [B, D]."""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.tanh(Dense(x.shape[-1], ("embed", "mlp"), name="dense", dtype=self.dtype,
                              param_dtype=self.param_dtype)(x[:, 0]))


class Backbone(nn.Module):
    cfg: ml_collections.FrozenConfigDict  # model
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = c.cross.hidden_size
        attention = c.get("attention_impl", "auto")
        layers = dict(remat=c.remat, scan_layers=c.get("scan_layers", False),
                      attention_impl=attention)
        self.text_encoder = TextEncoder(c.text, **layers, **kw)
        self.vision_encoder = VisionEncoder(c.vision, **layers, **kw)
        # ("embed", "mlp") rather than ("embed", "embed"): a mesh axis may appear once per spec.
        if c.share_transform:
            self.text_transform = Dense(d, ("embed", "mlp"), **kw)
            self.image_transform = Dense(d, ("embed", "mlp"), **kw)
        else:  # HF BridgeTower's share_cross_modal_transformer_layers=False: one per layer
            self.text_transforms = [Dense(d, ("embed", "mlp"), **kw)
                                    for _ in range(c.cross.num_layers)]
            self.image_transforms = [Dense(d, ("embed", "mlp"), **kw)
                                     for _ in range(c.cross.num_layers)]
        self.token_type_embeddings = Embed(c.num_token_types, d, "types", **kw)
        inputs = TOWER_INPUTS[c.tower]
        self.text_inputs = inputs(c, c.text.num_layers, **kw)
        self.image_inputs = inputs(c, c.vision.num_layers, **kw)
        layer = nn.remat(CrossModalLayer, static_argnums=(5,)) if c.remat else CrossModalLayer
        self.text_cross_layers = [layer(c.cross, attention, **kw)
                                  for _ in range(c.cross.num_layers)]
        self.image_cross_layers = [layer(c.cross, attention, **kw)
                                  for _ in range(c.cross.num_layers)]
        self.text_pooler = Pooler(**kw)
        self.image_pooler = Pooler(**kw)

    def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array, train: bool) -> dict:
        """[B, L] ids and mask -> TextEncoder outputs (top layers in 'outputs')."""
        return self.text_encoder(input_ids, attention_mask, train, num_uni_modal_inputs(self.cfg))

    def encode_image(self, pixel_values: jax.Array, train: bool) -> dict:
        """[B, H, W, 3] -> VisionEncoder outputs (top layers after ln_post in 'outputs')."""
        return self.vision_encoder(pixel_values, train, num_uni_modal_inputs(self.cfg))

    def fuse(self, text: dict, attention_mask: jax.Array, image: dict, train: bool,
             image_token_type_idx: int = 1, *, text_positions: jax.Array | None = None,
             image_positions: jax.Array | None = None) -> dict:
        """Runs the cross-modal stacks on encoded text and image (encode_image's outputs, or
        prepare_image's, whose token type was set there).

        text_positions / image_positions [B, P] int: the tokens of each stream's last
        cross-modal layer that the caller reads (MLM: the masked positions; the poolers:
        [[0]] * B); that layer runs for those queries only, and text_feats / image_feats
        are then [B, P, D], the full layer's rows at those positions. None: every token.
        The poolers read row 0, so cls_feats is [CLS]'s only when both start with 0.

        Returns text_feats [B, L, D], image_feats [B, 1+P, D], cls_feats [B, 2D], the top
        uni-modal features unimodal_text_feats [B, L, D_text] / unimodal_image_feats
        [B, 1+P, D_vision] (after ln_post), each cross-modal layer's outputs
        (cross_text_hidden_states, cross_image_hidden_states), and for the manager tower manager_weights
        {'text': [layers, B, L, N], 'image': [layers, B, 1+P, N]}.
        """
        x_inputs = self._cross_inputs("text", text["outputs"], 0)
        y_inputs = (image["cross_inputs"] if "cross_inputs" in image else
                    self._cross_inputs("image", image["outputs"], image_token_type_idx))
        text_mask, image_mask = attention_mask.astype(bool), None  # every image token is real
        x = y = None
        text_weights, image_weights, text_states, image_states = [], [], [], []
        last = self.cfg.cross.num_layers - 1
        for l in range(self.cfg.cross.num_layers):
            x_in, wx = self.text_inputs(l, x_inputs, x, y, train)
            y_in, wy = self.image_inputs(l, y_inputs, y, x, train)
            x = self.text_cross_layers[l](x_in, y_in, text_mask, image_mask, train,
                                          text_positions if l == last else None)
            y = self.image_cross_layers[l](y_in, x_in, image_mask, text_mask, train,
                                           image_positions if l == last else None)
            text_weights.append(wx)
            image_weights.append(wy)
            text_states.append(x)
            image_states.append(y)
        out = {
            "text_feats": x,
            "image_feats": y,
            "cls_feats": jnp.concatenate([self.text_pooler(x), self.image_pooler(y)], axis=-1),
            "unimodal_text_feats": text["hidden_states"][-1],
            "unimodal_image_feats": image["outputs"][-1],
            # Per-layer outputs (free under jit when unused): parity checks and probing.
            "text_hidden_states": text["hidden_states"],
            "image_hidden_states": image["hidden_states"],
            "cross_text_hidden_states": tuple(text_states),
            "cross_image_hidden_states": tuple(image_states),
        }
        if self.cfg.tower == "manager":
            out["manager_weights"] = {"text": jnp.stack(text_weights),
                                      "image": jnp.stack(image_weights)}
        return out

    def prepare_image(self, image: dict, image_token_type_idx: int = 1) -> dict:
        """encode_image's outputs + 'cross_inputs' (k arrays [B, 1+P, D]), what the image
        stream sends across (transform, token type, the tower's `prepare`), for several
        fusions of one encoding (pretraining's MLM and ITM): taken, and differentiated, once.
        Rows may then be gathered along the batch, as ITM negatives are."""
        return {**image, "cross_inputs": self._cross_inputs("image", image["outputs"],
                                                            image_token_type_idx)}

    def _cross_inputs(self, stream: str, layers: jax.Array,
                      token_type: int) -> tuple[jax.Array, ...]:
        """Uni-modal layers [k, B, T, D_uni] -> the stream's tower inputs, k arrays [B, T, D]:
        the linear uni-modal -> cross-modal map, the token-type embedding, `prepare`."""
        if self.cfg.share_transform:
            x = getattr(self, f"{stream}_transform")(layers)
        else:
            x = jnp.stack([t(u) for t, u in zip(getattr(self, f"{stream}_transforms"), layers)])
        inputs = getattr(self, f"{stream}_inputs")
        return inputs.prepare(x + self.token_type_embeddings.table()[token_type])

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, pixel_values: jax.Array,
                 train: bool = False, image_token_type_idx: int = 1) -> dict:
        text = self.encode_text(input_ids, attention_mask, train)
        image = self.encode_image(pixel_values, train)
        return self.fuse(text, attention_mask, image, train, image_token_type_idx)
