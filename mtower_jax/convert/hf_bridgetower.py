"""HF BridgeTower (`BridgeTowerModel`, `...ForMaskedLM`, `...ForImageAndTextRetrieval`) <-> ours.

    model_cfg, variables = convert(state_dict, hf_config)   # hf_config = BridgeTowerConfig.to_dict()
    out = build_model(model_cfg).apply(variables, ...)

Keys may carry the `bridgetower.` prefix of the task models. The MLM (`mlm_score.*`) and ITM
(`itm_score.*`) heads are converted when present. HF's unused text pooler and the vision
tower's `ln_separate` norms (only used outside BridgeTowerModel's forward) are dropped.
`rules(model_cfg)` is the single mapping both directions use (see to_hf_bridgetower).
"""
from __future__ import annotations

from typing import Mapping

import ml_collections

from mtower_jax.convert import hf_clip_vision, hf_roberta
from mtower_jax.convert.keymap import SAME, SCALAR, Rule, linear_rules, norm_rules, to_params
from mtower_jax.models import model_config, parameter_shapes

PREFIX = "bridgetower."
# Heads converted when present. HF's ITC heads (ForContrastiveLearning) are not: their image
# feature and logit scale differ from ours, so their keys are reported as unexpected.
HEAD_KEYS = {"mlm": "mlm_score.", "itm": "itm_score."}


def rules(model_cfg: ml_collections.ConfigDict, prefix: str = "") -> list[Rule]:
    """The HF key <-> our path mapping of a bridge-tower model (heads: those in model_cfg)."""
    c = model_cfg
    out = hf_roberta.text_encoder_rules(f"{prefix}text_model.", c.text.num_layers)
    out += hf_clip_vision.openai_rules(f"{prefix}vision_model.visual.", c.vision.num_layers,
                                       names="bridgetower")
    for stream in ("text", "image"):
        theirs = f"{prefix}cross_modal_{stream}_transform"
        if c.share_transform:
            out += linear_rules(theirs, f"backbone/{stream}_transform")
        else:
            for i in range(c.cross.num_layers):
                out += linear_rules(f"{theirs}.{i}", f"backbone/{stream}_transforms_{i}")
    out.append(Rule(f"{prefix}token_type_embeddings.weight",
                    "backbone/token_type_embeddings/embedding", SAME))
    for stream in ("text", "image"):
        inputs = f"backbone/{stream}_inputs"
        out += norm_rules(f"{prefix}cross_modal_{stream}_layernorm", f"{inputs}/first_norm")
        for i in range(c.cross.num_layers - 1):
            link = f"{prefix}cross_modal_{stream}_link_tower.{i}."
            out += norm_rules(f"{link}LayerNorm", f"{inputs}/bridges_{i}/norm")
            if c.bridge.type == "scaled_add":
                out.append(Rule(f"{link}scaled_factor", f"{inputs}/bridges_{i}/scaled_factor",
                                SCALAR))
            elif c.bridge.type == "interpolate":
                out.append(Rule(f"{link}beta", f"{inputs}/bridges_{i}/beta", SCALAR))
        for i in range(c.cross.num_layers):
            out += hf_roberta.bert_layer_rules(f"{prefix}cross_modal_{stream}_layers.{i}.",
                                               f"backbone/{stream}_cross_layers_{i}", cross=True)
        out += linear_rules(f"{prefix}cross_modal_{stream}_pooler.dense",
                            f"backbone/{stream}_pooler/dense")
    if "mlm" in c.heads:
        out += linear_rules("mlm_score.transform.dense", "mlm_head/transform")
        out += norm_rules("mlm_score.transform.LayerNorm", "mlm_head/transform_norm")
        out += linear_rules("mlm_score.decoder", "mlm_head/decoder", bias=False)
        out.append(Rule("mlm_score.bias", "mlm_head/decoder/bias", SAME))
    if "itm" in c.heads:
        out += linear_rules("itm_score.fc", "itm_head/fc")
    return out


def model_config_from_hf(hf: Mapping) -> ml_collections.ConfigDict:
    """Our model config reproducing a BridgeTowerConfig dict (sizes, eps, link tower type)."""
    text = hf_roberta.text_config(hf["text_config"])
    if hf.get("share_link_tower_layers", False):
        raise ValueError("share_link_tower_layers=True is not supported (HF's forward indexes "
                         "one link tower per layer)")
    if hf["hidden_size"] != text.hidden_size:
        raise ValueError(f"hidden_size={hf['hidden_size']} differs from the text hidden size "
                         f"{text.hidden_size}; HF builds its cross layers from text_config")
    cfg = model_config("base", "bridge")
    cfg.text = text
    cfg.vision = hf_clip_vision.vision_config(hf["vision_config"])
    # HF builds the cross-modal layers from text_config: same width, heads, FFN, eps, dropout.
    cfg.cross = ml_collections.ConfigDict(dict(
        hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=text.num_heads, mlp_dim=text.mlp_dim, layer_norm_eps=text.layer_norm_eps,
        activation="gelu", dropout=text.dropout, attention_dropout=text.attention_dropout))
    cfg.share_transform = hf.get("share_cross_modal_transformer_layers", True)
    cfg.bridge.type = hf.get("link_tower_type", "add")
    cfg.bridge.layer_norm_eps = hf.get("layer_norm_eps", 1e-5)
    cfg.max_text_len = min(50, text.max_position_embeddings - text.pad_token_id - 1)
    return cfg


def _ignored(state_dict: Mapping) -> list[str]:
    return [k for k in state_dict
            if ".pooler." in k and "text_model" in k or ".ln_separate." in k
            or k.endswith(("position_ids", "token_type_ids"))]


def convert(state_dict: Mapping, hf_config: Mapping):
    """HF state dict (numpy arrays) + BridgeTowerConfig.to_dict() -> (model_cfg, variables)."""
    has_prefix = any(k.startswith(PREFIX) for k in state_dict)
    model_cfg = model_config_from_hf(hf_config)
    model_cfg.heads = tuple(h for h, key in HEAD_KEYS.items()
                            if any(k.startswith(key) for k in state_dict))
    params = to_params(state_dict, rules(model_cfg, PREFIX if has_prefix else ""),
                       parameter_shapes(model_cfg), _ignored(state_dict),
                       what="the BridgeTower state dict",
                       hint="(is it a BridgeTower checkpoint of the config you passed?)")
    return model_cfg, {"params": params}
