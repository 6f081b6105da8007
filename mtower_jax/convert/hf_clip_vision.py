"""CLIP ViT state dicts -> our vision encoder, in the two layouts users bring:

  openai  OpenAI CLIP / the official ManagerTower & BridgeTower code / HF BridgeTower:
          `visual.conv1`, `visual.class_embedding`, `visual.positional_embedding`,
          `visual.transformer.resblocks.N.attn.in_proj_weight` (q, k, v stacked by rows), ...
          (HF BridgeTower names the three embeddings `embeddings.*`: see `EMBEDDING_NAMES`)
  hf      HF `CLIPVisionModel`: `vision_model.encoder.layers.N.self_attn.q_proj`, ...

    python -m mtower_jax.convert hf_clip_vision clip-vit-base-patch16/model.safetensors OUT
    python -m mtower_jax.convert openai_clip ViT-B-16.pt OUT

The text half of a full CLIP checkpoint and the final projection (`visual.proj`) are dropped.
Position embeddings are resized bicubically when the target image size differs.
"""
from __future__ import annotations

from typing import Mapping

import ml_collections
import numpy as np

from mtower_jax.convert.keymap import (PATCH, SAME, VECTOR, Rule, linear, linear_rules,
                                       norm_rules, rows, to_params)
from mtower_jax.convert.position_embeddings import resize_position_embedding
from mtower_jax.models import layer_stack, model_config, parameter_shapes

ENCODER = "backbone/vision_encoder"

# (conv weight, class embedding, position embedding) key names under the `visual.` prefix.
EMBEDDING_NAMES = {
    "openai": ("conv1.weight", "class_embedding", "positional_embedding"),
    "bridgetower": ("embeddings.patch_embedding.weight", "embeddings.class_embedding",
                    "embeddings.position_embedding.weight"),
}


def _common_rules(path: str, conv: str, cls: str, pos: str) -> list[Rule]:
    return [Rule(conv, f"{path}/patch_embedding/kernel", PATCH),
            Rule(cls, f"{path}/class_embedding", VECTOR),
            Rule(pos, f"{path}/position_embedding", SAME)]


def openai_rules(prefix: str, num_layers: int, names: str = "openai",
                 path: str = ENCODER) -> list[Rule]:
    """OpenAI-layout vision tower whose keys start with `prefix` (e.g. 'visual.')."""
    conv, cls, pos = (prefix + n for n in EMBEDDING_NAMES[names])
    rules = _common_rules(path, conv, cls, pos)
    rules += norm_rules(f"{prefix}ln_pre", f"{path}/ln_pre")
    rules += norm_rules(f"{prefix}ln_post", f"{path}/ln_post")
    for i in range(num_layers):
        block, ours = f"{prefix}transformer.resblocks.{i}.", f"{path}/layer_{i}"
        for j, name in enumerate(("query", "key", "value")):
            rules += [Rule(f"{block}attn.in_proj_weight", f"{ours}/attention/{name}/kernel",
                           rows(j, 3, linear(1))),
                      Rule(f"{block}attn.in_proj_bias", f"{ours}/attention/{name}/bias",
                           rows(j, 3, VECTOR))]
        rules += linear_rules(f"{block}attn.out_proj", f"{ours}/attention/out", n_in=2)
        rules += norm_rules(f"{block}ln_1", f"{ours}/attention_norm")
        rules += linear_rules(f"{block}mlp.c_fc", f"{ours}/mlp/intermediate")
        rules += linear_rules(f"{block}mlp.c_proj", f"{ours}/mlp/output")
        rules += norm_rules(f"{block}ln_2", f"{ours}/mlp_norm")
    return rules


def hf_rules(prefix: str, num_layers: int, path: str = ENCODER) -> list[Rule]:
    """HF CLIPVisionModel layout; `prefix` is 'vision_model.' in a CLIPModel."""
    e = f"{prefix}embeddings."
    rules = _common_rules(path, f"{e}patch_embedding.weight", f"{e}class_embedding",
                          f"{e}position_embedding.weight")
    rules += norm_rules(f"{prefix}pre_layrnorm", f"{path}/ln_pre")  # sic: HF's spelling
    rules += norm_rules(f"{prefix}post_layernorm", f"{path}/ln_post")
    for i in range(num_layers):
        block, ours = f"{prefix}encoder.layers.{i}.", f"{path}/layer_{i}"
        for theirs, name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            rules += linear_rules(f"{block}self_attn.{theirs}", f"{ours}/attention/{name}")
        rules += linear_rules(f"{block}self_attn.out_proj", f"{ours}/attention/out", n_in=2)
        rules += norm_rules(f"{block}layer_norm1", f"{ours}/attention_norm")
        rules += linear_rules(f"{block}mlp.fc1", f"{ours}/mlp/intermediate")
        rules += linear_rules(f"{block}mlp.fc2", f"{ours}/mlp/output")
        rules += norm_rules(f"{block}layer_norm2", f"{ours}/mlp_norm")
    return rules


def vision_config(hf: Mapping, image_size: int | None = None) -> ml_collections.ConfigDict:
    """Our model.vision from a CLIPVisionConfig / BridgeTowerVisionConfig dict. Heads are
    hidden // 64 unless the config names them (HF BridgeTower always derives them)."""
    hidden = hf["hidden_size"]
    act = hf.get("hidden_act", "quick_gelu")
    if act != "quick_gelu":
        raise ValueError(f"hidden_act={act!r} is not supported (CLIP uses quick_gelu)")
    return ml_collections.ConfigDict(dict(
        hidden_size=hidden, num_layers=hf["num_hidden_layers"],
        num_heads=hf.get("num_attention_heads") or hidden // 64,
        mlp_dim=hf.get("intermediate_size") or 4 * hidden,
        image_size=image_size or hf["image_size"], patch_size=hf["patch_size"],
        layer_norm_eps=hf.get("layer_norm_eps", 1e-5), activation="quick_gelu",
        dropout=0.0, attention_dropout=hf.get("attention_dropout", 0.0)))


def openai_vision_config(state_dict: Mapping, prefix: str = "visual.",
                         image_size: int | None = None) -> ml_collections.ConfigDict:
    """An OpenAI CLIP checkpoint carries no config: read the sizes off its tensors."""
    conv = np.asarray(state_dict[f"{prefix}conv1.weight"])
    hidden, _, patch, _ = conv.shape
    layers = len({k.split(".")[3] for k in state_dict
                  if k.startswith(f"{prefix}transformer.resblocks.")})
    grid = int(round((np.asarray(state_dict[f"{prefix}positional_embedding"]).shape[0] - 1) ** 0.5))
    return vision_config(dict(hidden_size=hidden, num_hidden_layers=layers, patch_size=patch,
                              image_size=grid * patch), image_size)


def convert(state_dict: Mapping, hf_config: Mapping | None,
            model_cfg: ml_collections.ConfigDict | None = None, image_size: int | None = None):
    """CLIP state dict (HF CLIPVisionModel / CLIPModel, or OpenAI layout when `hf_config` is
    None) -> (model_cfg, {'params': {'backbone': {'vision_encoder': ...}}}).

    `model_cfg` (default: the base ManagerTower) gets its `vision` part from the checkpoint;
    `image_size` (default: the model's) resizes the position embeddings bicubically. With
    model_cfg.scan_layers the layers come stacked (models/layer_stack.py)."""
    model_cfg = model_cfg.copy_and_resolve_references() if model_cfg else model_config("base")
    target_size = image_size or model_cfg.vision.image_size
    if hf_config is None:
        vision = openai_vision_config(state_dict)
        rules = openai_rules("visual.", vision.num_layers)
        drop = lambda k: not k.startswith("visual.") or k == "visual.proj"  # noqa: E731
        pos_key = "visual.positional_embedding"
    else:
        hf_config = hf_config.get("vision_config", hf_config)  # a full CLIPConfig is fine too
        vision = vision_config(hf_config)
        # CLIPModel (and transformers 4's CLIPVisionModel) prefix the tower; v5's does not.
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in state_dict) else ""
        rules = hf_rules(prefix, vision.num_layers)
        drop = lambda k: not k.startswith(prefix) or k.endswith("position_ids")  # noqa: E731
        pos_key = f"{prefix}embeddings.position_embedding.weight"
    state_dict = resize_position_embedding(state_dict, pos_key, vision.patch_size, target_size)
    vision.image_size = target_size
    model_cfg.vision = vision
    expected = {p: s for p, s in parameter_shapes(layer_stack.unrolled(model_cfg)).items()
                if p.startswith(ENCODER + "/")}
    params = to_params(state_dict, rules, expected, [k for k in state_dict if drop(k)],
                       what="the CLIP state dict")
    return model_cfg, {"params": layer_stack.for_config(params, model_cfg)}
