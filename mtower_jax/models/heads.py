"""Task heads. Each reads the backbone's output dict and returns its own entries; the backbone
does not know which heads exist (`model.heads` in the config chooses them).

  mlm:     logits = LN(gelu(text_feats W_1 + b_1)) W_dec + b_dec               [B, L, vocab]
           (or, given labels, their cross-entropy without the whole logits)
  itm:     logits = cls_feats W + b                                             [B, 2]
  itc:     t = normalize(unimodal_text_cls W_t), i = normalize(unimodal_image_cls W_i)   [B, itc_dim]
           temperature tau (init 0.07), clamped to [0.001, 0.5]
  vqa / snli_ve:  MLP(cls_feats):   Linear(2D -> 2D*s) -> LN -> GELU -> Linear(-> classes)
  nlvr2:   MLP(cls_feats_pair):     Linear(4D -> 2D*s) -> LN -> GELU -> Linear(-> 2)
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mtower_jax.models.layers import ACTIVATIONS, Dense, Dtype, LayerNorm
from mtower_jax.models.partitioning import logical
from mtower_jax.models.vocab_decoder import VocabDecoder

ITC_TEMPERATURE_RANGE = (0.001, 0.5)


class _Head(nn.Module):
    """A head of the model config `cfg`: __call__(backbone outputs, train) -> its outputs."""
    cfg: ml_collections.FrozenConfigDict  # model
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32


class MLMHead(_Head):
    """mlm_logits [B, L, vocab]; or, given features['mlm_labels'] [B, L] (int in [0, vocab)),
    mlm_cross_entropy [B, L] and mlm_correct [B, L] computed without the whole logits
    (vocab_decoder.py: `model.mlm_vocab_chunks` blocks of the vocabulary)."""

    @nn.compact
    def __call__(self, features: dict, train: bool) -> dict:
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = features["text_feats"]
        x = Dense(x.shape[-1], ("embed", "mlp"), name="transform", **kw)(x)
        x = LayerNorm(c.cross.layer_norm_eps, name="transform_norm", **kw)(
            ACTIVATIONS[c.cross.activation](x))
        decoder = VocabDecoder(x.shape[-1], c.text.vocab_size, c.get("mlm_vocab_chunks", 1),
                               name="decoder", **kw)
        if "mlm_labels" not in features:
            return {"mlm_logits": decoder(x)}
        ce, correct = decoder.cross_entropy(x, features["mlm_labels"])
        return {"mlm_cross_entropy": ce, "mlm_correct": correct}


class ITMHead(_Head):
    @nn.compact
    def __call__(self, features: dict, train: bool) -> dict:
        return {"itm_logits": Dense(2, ("embed", "classes"), name="fc", dtype=self.dtype,
                                    param_dtype=self.param_dtype)(features["cls_feats"])}


class ITCHead(_Head):
    @nn.compact
    def __call__(self, features: dict, train: bool) -> dict:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def project(name: str, x: jax.Array) -> jax.Array:
            y = Dense(self.cfg.itc_dim, ("embed", "classes"), name=name, **kw)(x[:, 0])
            y = y.astype(jnp.float32)
            return y / jnp.maximum(jnp.linalg.norm(y, axis=-1, keepdims=True), 1e-12)

        tau = self.param("temperature", logical(nn.initializers.constant(self.cfg.itc_temperature),
                                                ()), (), self.param_dtype)
        return {"itc_text_embeds": project("text_proj", features["unimodal_text_feats"]),
                "itc_image_embeds": project("image_proj", features["unimodal_image_feats"]),
                "itc_temperature": jnp.clip(tau, *ITC_TEMPERATURE_RANGE)}


class ClassifierHead(nn.Module):
    """Linear -> LN -> GELU -> Linear on one feature vector, as the reference task heads."""
    num_classes: int
    hidden_dim: int
    input_key: str
    output_key: str
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: dict, train: bool) -> dict:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Dense(self.hidden_dim, ("embed", "mlp"), name="hidden", **kw)(features[self.input_key])
        x = ACTIVATIONS["gelu"](LayerNorm(self.layer_norm_eps, name="norm", **kw)(x))
        # The mlp axis is the input here, so the kernel is named ("mlp", "classes").
        logits = Dense(self.num_classes, ("mlp", "classes"), name="out", **kw)(x)
        return {self.output_key: logits}


def _classifier(num_classes: int | str, input_key: str, output_key: str):
    """A ClassifierHead factory; `num_classes` is a count or the model-config key holding it."""
    def make(cfg: ml_collections.FrozenConfigDict, **kw) -> ClassifierHead:
        n = num_classes if isinstance(num_classes, int) else cfg[num_classes]
        hidden = int(2 * cfg.cross.hidden_size * cfg.head_hidden_scale)
        return ClassifierHead(n, hidden, input_key, output_key, **kw)
    return make


HEADS = {
    "mlm": MLMHead,
    "itm": ITMHead,
    "itc": ITCHead,
    "vqa": _classifier("vqa_num_answers", "cls_feats", "vqa_logits"),
    "snli_ve": _classifier(3, "cls_feats", "snli_ve_logits"),
    "nlvr2": _classifier(2, "cls_feats_pair", "nlvr2_logits"),
}
