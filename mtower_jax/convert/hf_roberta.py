"""HF `RobertaModel` (and BridgeTower's RoBERTa clone) -> our text encoder.

    python -m mtower_jax.convert hf_roberta roberta-base/model.safetensors OUT

Used to initialise the text tower of a fresh model before pretraining, as the paper does.
`state_dict` keys are those of `RobertaModel` (a `roberta.` prefix is accepted); the pooler is
dropped, since the cross-modal side has its own.
"""
from __future__ import annotations

from typing import Mapping

import ml_collections

from mtower_jax.convert.keymap import SAME, VECTOR, Rule, linear, linear_rules, norm_rules, to_params
from mtower_jax.models import layer_stack, model_config, parameter_shapes

ENCODER = "backbone/text_encoder"


def text_encoder_rules(prefix: str, num_layers: int, path: str = ENCODER) -> list[Rule]:
    """Rules for a BERT/RoBERTa encoder whose keys start with `prefix` ('text_model.')."""
    rules = [Rule(f"{prefix}embeddings.word_embeddings.weight",
                  f"{path}/word_embeddings/embedding", SAME),
             Rule(f"{prefix}embeddings.position_embeddings.weight",
                  f"{path}/position_embeddings/embedding", SAME),
             Rule(f"{prefix}embeddings.token_type_embeddings.weight",
                  f"{path}/token_type_embeddings/embedding", SAME),
             *norm_rules(f"{prefix}embeddings.LayerNorm", f"{path}/embeddings_norm")]
    for i in range(num_layers):
        rules += bert_layer_rules(f"{prefix}encoder.layer.{i}.", f"{path}/layer_{i}", cross=False)
    return rules


def bert_layer_rules(prefix: str, path: str, cross: bool) -> list[Rule]:
    """A post-LN BERT layer (optionally with BERT's `crossattention` block) -> TextLayer /
    CrossModalLayer at `path`."""
    blocks = [("attention", "attention")] + ([("crossattention", "cross_attention")] if cross else [])
    rules = []
    for theirs, ours in blocks:
        for name in ("query", "key", "value"):
            rules += [Rule(f"{prefix}{theirs}.self.{name}.weight", f"{path}/{ours}/{name}/kernel",
                           linear(1)),
                      Rule(f"{prefix}{theirs}.self.{name}.bias", f"{path}/{ours}/{name}/bias",
                           VECTOR)]
        rules += linear_rules(f"{prefix}{theirs}.output.dense", f"{path}/{ours}/out", n_in=2)
        rules += norm_rules(f"{prefix}{theirs}.output.LayerNorm", f"{path}/{ours}_norm")
    rules += linear_rules(f"{prefix}intermediate.dense", f"{path}/mlp/intermediate")
    rules += linear_rules(f"{prefix}output.dense", f"{path}/mlp/output")
    rules += norm_rules(f"{prefix}output.LayerNorm", f"{path}/mlp_norm")
    return rules


def text_config(hf: Mapping) -> ml_collections.ConfigDict:
    """Our model.text from a RobertaConfig / BridgeTowerTextConfig dict."""
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported (RoBERTa uses gelu)")
    return ml_collections.ConfigDict(dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        mlp_dim=hf["intermediate_size"], max_position_embeddings=hf["max_position_embeddings"],
        pad_token_id=hf.get("pad_token_id", 1), type_vocab_size=hf.get("type_vocab_size", 1),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
        activation="gelu", dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1)))


def convert(state_dict: Mapping, hf_config: Mapping,
            model_cfg: ml_collections.ConfigDict | None = None):
    """RobertaModel state dict -> (model_cfg, {'params': {'backbone': {'text_encoder': ...}}}).

    `model_cfg` (default: the base ManagerTower) gets its `text` part from `hf_config`; with
    its scan_layers the layers come stacked (models/layer_stack.py)."""
    model_cfg = model_cfg.copy_and_resolve_references() if model_cfg else model_config("base")
    model_cfg.text = text_config(hf_config)
    prefix = "roberta." if any(k.startswith("roberta.") for k in state_dict) else ""
    expected = {p: s for p, s in parameter_shapes(layer_stack.unrolled(model_cfg)).items()
                if p.startswith(ENCODER + "/")}
    ignore = [k for k in state_dict if k.startswith(f"{prefix}pooler.")
              or k.endswith(("position_ids", "token_type_ids"))]
    params = to_params(state_dict, text_encoder_rules(prefix, hf_config["num_hidden_layers"]),
                       expected, ignore, what="the RoBERTa state dict")
    return model_cfg, {"params": layer_stack.for_config(params, model_cfg)}
