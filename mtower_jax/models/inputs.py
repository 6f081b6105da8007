"""The model's input contract, and inputs that follow it for init, eval_shape and smoke tests.

  input_ids       [B, L] int32, RoBERTa ids: <s>=0 first, pad_token_id after the text
  attention_mask  [B, L] int32, 1 for real tokens
  pixel_values    [B, H, W, 3] float32, CLIP-normalised, H = W = model.vision.image_size
  pixel_values_2  the second image of an NLVR2 pair (only with the nlvr2 head)
"""
from __future__ import annotations

import ml_collections
import numpy as np


def example_inputs(model_cfg: ml_collections.ConfigDict, batch_size: int = 2) -> dict:
    """Zero inputs of the right shapes: keyword arguments for `init` and `jax.eval_shape`."""
    size, length = model_cfg.vision.image_size, model_cfg.max_text_len
    pixels = np.zeros((batch_size, size, size, 3), np.float32)
    inputs = dict(input_ids=np.zeros((batch_size, length), np.int32),
                  attention_mask=np.ones((batch_size, length), np.int32),
                  pixel_values=pixels)
    if "nlvr2" in model_cfg.heads:
        inputs["pixel_values_2"] = pixels
    return inputs


def random_inputs(model_cfg: ml_collections.ConfigDict, batch_size: int = 2,
                  seed: int = 0) -> dict:
    """Random ids with right padding (lengths from L/2 to L) and random normalised pixels."""
    rng = np.random.default_rng(seed)
    inputs = example_inputs(model_cfg, batch_size)
    length = model_cfg.max_text_len
    lengths = rng.integers(length // 2, length + 1, size=batch_size)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(3, model_cfg.text.vocab_size, size=(batch_size, length))
    ids[:, 0] = 0  # <s>
    inputs["input_ids"] = np.where(mask == 1, ids, model_cfg.text.pad_token_id).astype(np.int32)
    inputs["attention_mask"] = mask
    for key in ("pixel_values", "pixel_values_2"):
        if key in inputs:
            inputs[key] = rng.standard_normal(inputs[key].shape).astype(np.float32)
    return inputs
