"""The public model: backbone + the configured heads.

    model = build_model(model_cfg)
    out = model.apply(variables, input_ids=ids, attention_mask=mask, pixel_values=pixels,
                      train=False)

`pixel_values` are NHWC float32, CLIP-normalised. `out` holds text_feats [B, L, D],
image_feats [B, 1+P, D], cls_feats [B, 2D], the top uni-modal features, every head's outputs
(mlm_logits, itm_logits, ...), and with `return_manager_weights=True` the expert weights of
every manager ({'text': [layers, B, L, N], 'image': [layers, B, 1+P, N]}). NLVR2 passes the
second image as `pixel_values_2`; the pair's cls features are `cls_feats_pair` [B, 4D].
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from mtower_jax.models import config as model_config_lib
from mtower_jax.models.backbone import Backbone
from mtower_jax.models.heads import HEADS
from mtower_jax.models.inputs import example_inputs


class VisionLanguageModel(nn.Module):
    """Setup-style, so training objectives can call the parts (`backbone`, `head(name)`)
    inside one `apply` (see train/objectives.py: one image encoding serves MLM and ITM)."""
    cfg: ml_collections.FrozenConfigDict  # model

    def setup(self):
        c = self.cfg
        kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
        self.backbone = Backbone(c, **kw)
        for name in c.heads:  # attribute names become the parameter scopes '{name}_head'
            setattr(self, f"{name}_head", HEADS[name](c, **kw))

    def head(self, name: str) -> nn.Module:
        return getattr(self, f"{name}_head")

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, pixel_values: jax.Array,
                 train: bool = False, *, pixel_values_2: jax.Array | None = None,
                 image_token_type_idx: int = 1, return_manager_weights: bool = False) -> dict:
        c, backbone = self.cfg, self.backbone
        text = backbone.encode_text(input_ids, attention_mask, train)
        out = backbone.fuse(text, attention_mask, backbone.encode_image(pixel_values, train), train,
                            image_token_type_idx)
        if pixel_values_2 is not None:  # NLVR2: same text, second image with token type 2
            second = backbone.fuse(text, attention_mask, backbone.encode_image(pixel_values_2, train),
                                   train, image_token_type_idx=2)
            out["cls_feats_pair"] = jnp.concatenate([out["cls_feats"], second["cls_feats"]], -1)
        manager_weights = out.pop("manager_weights", None)
        if return_manager_weights:
            if manager_weights is None:
                raise ValueError(f"return_manager_weights=True, but the {c.tower!r} tower has no "
                                 "managers; set model.tower='manager'")
            out["manager_weights"] = manager_weights
        if "nlvr2" in c.heads and pixel_values_2 is None:
            raise ValueError("the nlvr2 head needs the second image: pass pixel_values_2")
        for name in c.heads:
            out.update(self.head(name)(out, train))
        return out


def build_model(model_cfg: ml_collections.ConfigDict) -> VisionLanguageModel:
    """Validates `model_cfg` (config.model) and returns the Flax module."""
    model_config_lib.validate(model_cfg)
    return VisionLanguageModel(ml_collections.FrozenConfigDict(model_cfg))


def parameter_shapes(model_cfg: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """{'backbone/text_encoder/...': shape} for every parameter, via eval_shape (no allocation)."""
    model = build_model(model_cfg)
    shapes = jax.eval_shape(lambda rng: model.init(rng, **example_inputs(model_cfg, 1)),
                            jax.random.PRNGKey(0))
    flat = traverse_util.flatten_dict(nn.unbox(shapes["params"]), sep="/")
    return {path: leaf.shape for path, leaf in flat.items()}
