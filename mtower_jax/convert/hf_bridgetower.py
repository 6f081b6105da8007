"""HF BridgeTower (`BridgeTowerModel`, `...ForMaskedLM`, `...ForImageAndTextRetrieval`,
`...ForContrastiveLearning`) <-> ours.

    model_cfg, variables = convert(state_dict, hf_config)   # hf_config = BridgeTowerConfig.to_dict()
    out = build_model(model_cfg).apply(variables, ...)

Keys may carry the `bridgetower.` prefix of the task models. The MLM (`mlm_score.*`), ITM
(`itm_score.*`) and ITC heads are converted when present. HF's unused text pooler and the vision
tower's `ln_separate` norms (only used outside BridgeTowerModel's forward) are dropped.
`rules(model_cfg)` is the single mapping both directions use (see to_hf_bridgetower), in the
unrolled layer layout (`layer_{i}`; `convert(..., scan_layers=True)` stacks the result); the
cross-modal part of it (`interface_rules`, `bridge_rules`, `head_rules`) is also the layout of
the official BridgeTower / ManagerTower checkpoints (official_ckpt), from which HF took its names.

ITC (`BridgeTowerForContrastiveLearning`), import only:
  itc_text_head.fc        text top layer [:, 0]              -> itc_head/text_proj (as is)
  itc_image_head.fc       on W_img(ln_post(vision top)) + E_type[1], [:, 0]: a linear map of our
                          image feature ln_post(vision top)[:, 0], so it is folded into
                          itc_head/image_proj:  W = W_fc W_img,  b = W_fc (b_img + E_type[1]) + b_fc
  logit_scale             logits = exp(s) t.i  -> itc_head/temperature = exp(-s)
  itc_cross_modal_head    normalize(fc(pooler_output)): our ITC head has no cross-modal
                          embedding, so this head is reported as unexpected unless the caller
                          drops it explicitly (`drop_itc_cross_modal_head=True`).
"""
from __future__ import annotations

from typing import Mapping

import ml_collections
import numpy as np

from mtower_jax.convert import hf_clip_vision, hf_roberta
from mtower_jax.convert.keymap import (SAME, SCALAR, Layout, Rule, linear_rules, norm_rules,
                                       to_params)
from mtower_jax.models import layer_stack, model_config, parameter_shapes

PREFIX = "bridgetower."
HEAD_KEYS = {"mlm": "mlm_score.", "itm": "itm_score.", "itc": "itc_text_head."}
ITC_CROSS_MODAL_HEAD = "itc_cross_modal_head."
ITC_TEMPERATURE_RANGE = (0.001, 0.5)  # heads.ITC_TEMPERATURE_RANGE: ours clamps, HF does not


def interface_rules(model_cfg: ml_collections.ConfigDict, prefix: str = "") -> list[Rule]:
    """Uni-modal -> cross-modal transforms, token types, cross-modal layers and poolers."""
    c, out = model_cfg, []
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
        for i in range(c.cross.num_layers):
            out += hf_roberta.bert_layer_rules(f"{prefix}cross_modal_{stream}_layers.{i}.",
                                               f"backbone/{stream}_cross_layers_{i}", cross=True)
        out += linear_rules(f"{prefix}cross_modal_{stream}_pooler.dense",
                            f"backbone/{stream}_pooler/dense")
    return out


def bridge_rules(model_cfg: ml_collections.ConfigDict, prefix: str = "") -> list[Rule]:
    """The first-layer LayerNorms and the link towers of the bridge tower."""
    c, out = model_cfg, []
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
    return out


def head_rules(model_cfg: ml_collections.ConfigDict) -> list[Rule]:
    """The MLM and ITM heads, where model_cfg.heads has them."""
    out = []
    if "mlm" in model_cfg.heads:
        out += linear_rules("mlm_score.transform.dense", "mlm_head/transform")
        out += norm_rules("mlm_score.transform.LayerNorm", "mlm_head/transform_norm")
        out += linear_rules("mlm_score.decoder", "mlm_head/decoder", bias=False)
        out.append(Rule("mlm_score.bias", "mlm_head/decoder/bias", SAME))
    if "itm" in model_cfg.heads:
        out += linear_rules("itm_score.fc", "itm_head/fc")
    return out


def rules(model_cfg: ml_collections.ConfigDict, prefix: str = "") -> list[Rule]:
    """The HF key <-> our path mapping of a bridge-tower model (heads: mlm / itm of model_cfg)."""
    c = model_cfg
    out = hf_roberta.text_encoder_rules(f"{prefix}text_model.", c.text.num_layers)
    out += hf_clip_vision.openai_rules(f"{prefix}vision_model.visual.", c.vision.num_layers,
                                       names="bridgetower")
    return out + interface_rules(c, prefix) + bridge_rules(c, prefix) + head_rules(c)


TEMPERATURE_FROM_LOGIT_SCALE = Layout(
    "exp(-x)", lambda w, shape: np.exp(-np.asarray(w, np.float64)).reshape(shape),
    lambda x: -np.log(np.asarray(x, np.float64)))


def itc_rules() -> list[Rule]:
    """HF's ITC heads, after `fold_itc_image_head` (import only: the fold has no inverse)."""
    return (linear_rules("itc_text_head.fc", "itc_head/text_proj")
            + linear_rules("itc_image_head.fc", "itc_head/image_proj")
            + [Rule("logit_scale", "itc_head/temperature", TEMPERATURE_FROM_LOGIT_SCALE)])


def fold_itc_image_head(state_dict: Mapping, prefix: str) -> dict:
    """A copy whose itc_image_head.fc is composed with the image transform and the image
    token type, so that it reads our ITC image feature (ln_post output) directly."""
    keys = ("itc_image_head.fc.weight", "itc_image_head.fc.bias",
            f"{prefix}cross_modal_image_transform.weight",
            f"{prefix}cross_modal_image_transform.bias", f"{prefix}token_type_embeddings.weight")
    if not all(k in state_dict for k in keys):
        return dict(state_dict)  # to_params reports what is missing
    w_fc, b_fc, w_img, b_img, types = (np.asarray(state_dict[k], np.float64) for k in keys)
    out = dict(state_dict)
    out[keys[0]] = (w_fc @ w_img).astype(np.float32)
    out[keys[1]] = (w_fc @ (b_img + types[1]) + b_fc).astype(np.float32)
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
    cfg.itc_dim = hf.get("contrastive_hidden_size", cfg.itc_dim)
    cfg.itc_temperature = float(np.exp(-hf.get("logit_scale_init_value", -np.log(0.07))))
    return cfg


def _ignored(state_dict: Mapping, drop_itc_cross_modal_head: bool) -> list[str]:
    return [k for k in state_dict
            if ".pooler." in k and "text_model" in k or ".ln_separate." in k
            or k.endswith(("position_ids", "token_type_ids"))
            or drop_itc_cross_modal_head and k.startswith(ITC_CROSS_MODAL_HEAD)]


def _check_itc(state_dict: Mapping, model_cfg: ml_collections.ConfigDict) -> None:
    if not model_cfg.share_transform:
        raise ValueError("ITC heads with share_cross_modal_transformer_layers=False: HF's "
                         "ForContrastiveLearning needs the one shared image transform")
    if "logit_scale" in state_dict:
        tau = float(np.exp(-np.asarray(state_dict["logit_scale"], np.float64).reshape(-1)[0]))
        low, high = ITC_TEMPERATURE_RANGE
        if not low <= tau <= high:
            raise ValueError(f"logit_scale gives the ITC temperature {tau:.4g}, outside the "
                             f"range [{low}, {high}] our ITC head clamps it to")


def convert(state_dict: Mapping, hf_config: Mapping, drop_itc_cross_modal_head: bool = False,
            scan_layers: bool = False):
    """HF state dict (numpy arrays) + BridgeTowerConfig.to_dict() -> (model_cfg, variables).

    `drop_itc_cross_modal_head`: leave out ForContrastiveLearning's `itc_cross_modal_head`,
    which our model has no place for (see the module docstring). `scan_layers`: a model with
    model.scan_layers, its encoder layers stacked (models/layer_stack.py)."""
    prefix = PREFIX if any(k.startswith(PREFIX) for k in state_dict) else ""
    model_cfg = model_config_from_hf(hf_config)
    model_cfg.heads = tuple(h for h, key in HEAD_KEYS.items()
                            if any(k.startswith(key) for k in state_dict))
    mapping = rules(model_cfg, prefix)
    if "itc" in model_cfg.heads:
        _check_itc(state_dict, model_cfg)
        state_dict = fold_itc_image_head(state_dict, prefix)
        mapping += itc_rules()
    hint = "(is it a BridgeTower checkpoint of the config you passed?)"
    cross_head = any(k.startswith(ITC_CROSS_MODAL_HEAD) for k in state_dict)
    if cross_head and not drop_itc_cross_modal_head:
        hint += ("\nitc_cross_modal_head has no counterpart in our ITC head; pass "
                 "drop_itc_cross_modal_head=True (CLI: --drop_itc_cross_modal_head) to leave "
                 "it out")
    params = to_params(state_dict, mapping, parameter_shapes(model_cfg),
                       _ignored(state_dict, drop_itc_cross_modal_head),
                       what="the BridgeTower state dict", hint=hint)
    model_cfg.scan_layers = scan_layers
    return model_cfg, {"params": layer_stack.for_config(params, model_cfg)}
