"""Our bridge-tower params -> an HF BridgeTower state dict + config (safetensors on disk).

    state_dict, hf_config = export(variables['params'], model_cfg)

Backbone keys are those of `BridgeTowerModel`; with heads they carry the `bridgetower.` prefix
of the task models (`BridgeTowerForMaskedLM` for mlm, `...ForImageAndTextRetrieval` for itm).
HF's unused text pooler is not part of our model and is absent from the export (load with
`strict=False`; the pooler never enters BridgeTowerModel's outputs).

Heads HF cannot take back are refused unless `drop_heads=True` exports the rest without them:
the ITC head (its image projection was composed with the image transform at import, which
has no inverse) and the task heads HF BridgeTower has no class for (vqa, snli_ve, nlvr2).
"""
from __future__ import annotations

import json
import os

import ml_collections
import numpy as np

from mtower_jax.convert.hf_bridgetower import PREFIX, rules
from mtower_jax.convert.keymap import to_state_dict
from mtower_jax.models import layer_stack


def hf_config(model_cfg: ml_collections.ConfigDict) -> dict:
    """A BridgeTowerConfig dict for `model_cfg` (the inverse of model_config_from_hf)."""
    c = model_cfg
    if c.tower != "bridge":
        raise ValueError(f"HF BridgeTower holds only the bridge tower; this model is {c.tower!r}")
    if c.cross.hidden_size != c.text.hidden_size or c.cross.mlp_dim != c.text.mlp_dim:
        raise ValueError("HF builds its cross-modal layers from text_config: cross.hidden_size and "
                         "cross.mlp_dim must equal the text encoder's")
    if c.vision.num_heads != c.vision.hidden_size // 64:
        raise ValueError("HF BridgeTower uses hidden_size // 64 vision heads")
    return dict(
        model_type="bridgetower", hidden_size=c.cross.hidden_size,
        num_hidden_layers=c.cross.num_layers, num_attention_heads=c.cross.num_heads,
        layer_norm_eps=c.bridge.layer_norm_eps, link_tower_type=c.bridge.type,
        share_cross_modal_transformer_layers=c.share_transform, share_link_tower_layers=False,
        hidden_act="gelu", tie_word_embeddings=False,
        text_config=dict(
            vocab_size=c.text.vocab_size, hidden_size=c.text.hidden_size,
            num_hidden_layers=c.text.num_layers, num_attention_heads=c.text.num_heads,
            intermediate_size=c.text.mlp_dim, max_position_embeddings=c.text.max_position_embeddings,
            pad_token_id=c.text.pad_token_id, layer_norm_eps=c.text.layer_norm_eps,
            hidden_dropout_prob=c.text.dropout, attention_probs_dropout_prob=c.text.attention_dropout,
            hidden_act="gelu", type_vocab_size=c.text.type_vocab_size),
        vision_config=dict(
            hidden_size=c.vision.hidden_size, num_hidden_layers=c.vision.num_layers,
            patch_size=c.vision.patch_size, image_size=c.vision.image_size,
            layer_norm_eps=c.vision.layer_norm_eps))


EXPORTED_HEADS = ("mlm", "itm")  # BridgeTowerForMaskedLM's, ...ForImageAndTextRetrieval's


def export(params, model_cfg: ml_collections.ConfigDict, drop_heads: bool = False
           ) -> tuple[dict[str, np.ndarray], dict]:
    """(state dict, BridgeTowerConfig dict) of our params, in either layer layout.
    Raises ValueError for a head outside EXPORTED_HEADS unless drop_heads (then left out)."""
    config = hf_config(model_cfg)
    others = [h for h in model_cfg.heads if h not in EXPORTED_HEADS]
    if others and not drop_heads:
        raise ValueError(
            f"the model has heads HF BridgeTower cannot take back: {others} ('itc': its image "
            f"projection was composed with the image transform at import and has no inverse; "
            f"the task heads have no HF class). Export only {list(EXPORTED_HEADS)} and the "
            f"backbone with drop_heads=True")
    heads = [h for h in model_cfg.heads if h in EXPORTED_HEADS]
    state_dict = to_state_dict(layer_stack.unstack_layers(params),
                               rules(model_cfg, PREFIX if heads else ""))
    return state_dict, config


def save(params, model_cfg: ml_collections.ConfigDict, out_dir: str, drop_heads: bool = False
         ) -> None:
    """Writes model.safetensors and config.json (HF's file names) into out_dir
    (`drop_heads`: see export)."""
    from safetensors.numpy import save_file

    state_dict, config = export(params, model_cfg, drop_heads)
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: np.asarray(v, np.float32) for k, v in state_dict.items()},
              os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
