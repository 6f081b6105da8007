"""The official ManagerTower / BridgeTower PyTorch Lightning checkpoints (.ckpt) <-> ours.

    state_dict, hparams = checkpoint_files.load_lightning_checkpoint("ManagerTower_pt_base.ckpt")
    model_cfg, variables = convert(state_dict, hparams=hparams)
    python -m mtower_jax.convert official_ckpt ManagerTower_pt_base.ckpt OUT

Key layout (LooperXX/ManagerTower src/modules/mt_module.py + heads.py, microsoft/BridgeTower
src/modules/bt_module.py + heads.py); s = text | image, l = cross-modal layer, D = cross-modal
width, N = managed layers, W = D (vector weights) or 1 (scalar):

  text_transformer.*                        HF RobertaModel layout   -> backbone/text_encoder
  vit_model.visual.*                        OpenAI CLIP layout       -> backbone/vision_encoder
  cross_modal_{s}_transform, token_type_embeddings [2|3, D], cross_modal_{s}_layers.l.*,
  cross_modal_{s}_pooler.dense              HF BridgeTower's names (hf_bridgetower.interface_rules)
 BridgeTower (model_type BT):
  cross_modal_{s}_layernorm                 -> backbone/{s}_inputs/first_norm
  cross_modal_{s}_link_tower.l.LayerNorm    -> backbone/{s}_inputs/bridges_l/norm (the official
                                               LinkTower is `add`; HF-style scaled_factor / beta
                                               keys select scaled_add / interpolate)
 ManagerTower (model_type MT), with M = cross_modal_{s}_manager_tower.l.manager_layer.:
  layer_embeddings_{s}.weight [layers, D]   -> backbone/{s}_inputs/layer_embeddings
  M.layer_scores [1, N(+1), 1, W]           SAUE: rows < N -> expert_weights [N, W];
                                               row N (layers l >= 1) -> cross_weight [W]
  M.layer_scores_cross [1, 1, 1, W]         AAUE: -> cross_weight [W]
  M.LayerNorm.n                             n < N -> row n of expert_norms [N, D];
                                            n = N -> cross_norm
  M.softmax_temperature [1]                 -> temperature
  M.linear_controller [N, 2D]               -> controller (input [a ; c], the same order)
  M.fusion_attention.{q,k}_proj             -> query_proj / key_proj
  M.extra_query_LayerNorm                   -> query_norm
 Heads, those present:
  mlm_score.*, itm_score.fc                 HF BridgeTower's names (hf_bridgetower.head_rules)
  cross_modal_itc_{t,i}_head.fc (MT),       -> itc_head/{text,image}_proj; both read the top
  itc_{t,i}_head.fc (BT)                       uni-modal [CLS] (image: after ln_post), as ours
  temperature []                            -> itc_head/temperature (both clamp to [0.001, 0.5])
  vqa_classifier.{0,1,3}                    -> vqa_head/{hidden,norm,out}; likewise
  snli_classifier, nlvr2_classifier            snli_ve_head, nlvr2_head (task_head_layers=2)

Dropped, as the official forward never reads them: text_transformer.pooler.*, *.position_ids
buffers, the CLIP text side (vit_model.{positional_embedding, ln_final, token_embedding,
transformer.*, text_projection, logit_scale}) and vit_model.visual.proj, every manager's
softmax_temperature_cross, and `temperature` when there is no ITC head. Everything else that does
not map (vit_layernorm_shared=False's visual.ln_separate, the irtr head rank_output, 1-layer task
heads) is reported as unexpected.

Sizes come from the tensors. What they cannot tell comes from the Lightning `hyper_parameters`
(the official config: `num_heads` of the cross-modal layers, `max_text_len`, `drop_rate`,
`temperature`, `manager_softmax_temperature(_learnable)`), else from the official code's
defaults: text heads = hidden // 64 (RoBERTa base / large), vision heads = width // 64 (the
official CLIP builder), cross-modal LayerNorm eps 1e-12 (its RobertaConfig), the rest 1e-5.
`export` is the inverse of `convert`, less the dropped keys.
"""
from __future__ import annotations

from typing import Any, Mapping

import ml_collections
import numpy as np
from flax import traverse_util

from mtower_jax.convert import hf_bridgetower, hf_clip_vision, hf_roberta
from mtower_jax.convert.keymap import (SAME, SCALAR, VECTOR, ConversionError, Layout, Rule,
                                       linear_rules, norm_rules, squeeze, to_params,
                                       to_state_dict)
from mtower_jax.convert.position_embeddings import resize_position_embedding
from mtower_jax.models import layer_stack, model_config, parameter_shapes

TEXT = "text_transformer."
VISION = "vit_model.visual."
POSITIONS = f"{VISION}positional_embedding"
ITC_PREFIX = {"manager": "cross_modal_itc_", "bridge": "itc_"}
CLASSIFIERS = {"vqa": "vqa_classifier", "snli_ve": "snli_classifier", "nlvr2": "nlvr2_classifier"}
DROPPED_PREFIXES = (f"{TEXT}pooler.", "vit_model.ln_final.", "vit_model.token_embedding.",
                    "vit_model.transformer.")
DROPPED_KEYS = ("vit_model.positional_embedding", "vit_model.text_projection",
                "vit_model.logit_scale", f"{VISION}proj")
DROPPED_SUFFIXES = ("position_ids", "token_type_ids", ".softmax_temperature_cross")
# Our [N, D] per-expert LayerNorm parameters, one official LayerNorm per row: the rules address
# row n as '{path}@{n}', and `convert` / `export` stack / split them.
STACKED = ("/expert_norms/scale", "/expert_norms/bias")
HINT = ("(an official ManagerTower / BridgeTower .ckpt? These have no counterpart in our model: "
        "vit_model.visual.ln_separate.* (vit_layernorm_shared=False), the irtr head rank_output, "
        "1-layer task heads (task_head_layers=1))")


def _manager(stream: str, layer: int) -> str:
    return f"cross_modal_{stream}_manager_tower.{layer}.manager_layer."


def _score_rows(start: int, stop: int, total: int) -> Layout:
    """Rows start:stop of a layer_scores tensor [1, total, 1, W] (export: [rows, W], which
    `export` concatenates and reshapes back)."""
    def to_ours(w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if w.ndim != 4 or w.shape[:3] != (1, total, 1):
            raise ValueError(f"layer_scores {w.shape} is not [1, {total}, 1, W]")
        return w[0, start:stop, 0].reshape(shape)
    return Layout(f"layer_scores[{start}:{stop}]", to_ours, lambda x: x.reshape(stop - start, -1))


def _manager_layer_rules(c: ml_collections.ConfigDict, theirs: str, ours: str,
                         layer: int) -> list[Rule]:
    n, first = c.manager.num_layers, layer == 0
    width = c.cross.hidden_size if c.manager.weight_type == "vector" else 1
    out = [Rule(f"{theirs}softmax_temperature", f"{ours}/temperature", squeeze((1,)))]
    for i in range(n):
        out += [Rule(f"{theirs}LayerNorm.{i}.weight", f"{ours}/expert_norms/scale@{i}", VECTOR),
                Rule(f"{theirs}LayerNorm.{i}.bias", f"{ours}/expert_norms/bias@{i}", VECTOR)]
    if not first:
        out += norm_rules(f"{theirs}LayerNorm.{n}", f"{ours}/cross_norm")
    if c.manager.type == "SAUE" or first:
        total = n if first else n + 1
        out.append(Rule(f"{theirs}layer_scores", f"{ours}/expert_weights",
                        _score_rows(0, n, total)))
        if not first:
            out.append(Rule(f"{theirs}layer_scores", f"{ours}/cross_weight",
                            _score_rows(n, n + 1, total)))
        return out
    out.append(Rule(f"{theirs}layer_scores_cross", f"{ours}/cross_weight",
                    squeeze((1, 1, 1, width))))
    out += linear_rules(f"{theirs}linear_controller", f"{ours}/controller")
    out += linear_rules(f"{theirs}fusion_attention.q_proj", f"{ours}/query_proj")
    out += linear_rules(f"{theirs}fusion_attention.k_proj", f"{ours}/key_proj")
    out += norm_rules(f"{theirs}extra_query_LayerNorm", f"{ours}/query_norm")
    return out


def manager_rules(model_cfg: ml_collections.ConfigDict) -> list[Rule]:
    """Layer embeddings and managers of both streams."""
    out = []
    for stream in ("text", "image"):
        ours = f"backbone/{stream}_inputs"
        out.append(Rule(f"layer_embeddings_{stream}.weight", f"{ours}/layer_embeddings/embedding",
                        SAME))
        for layer in range(model_cfg.cross.num_layers):
            out += _manager_layer_rules(model_cfg, _manager(stream, layer),
                                        f"{ours}/managers_{layer}", layer)
    return out


def task_head_rules(model_cfg: ml_collections.ConfigDict) -> list[Rule]:
    """ITC and the classifier heads of model_cfg.heads (MLM / ITM: hf_bridgetower.head_rules)."""
    out = []
    if "itc" in model_cfg.heads:
        itc = ITC_PREFIX[model_cfg.tower]
        out += linear_rules(f"{itc}text_head.fc", "itc_head/text_proj")
        out += linear_rules(f"{itc}image_head.fc", "itc_head/image_proj")
        out.append(Rule("temperature", "itc_head/temperature", SCALAR))
    for head, theirs in CLASSIFIERS.items():
        if head in model_cfg.heads:  # nn.Sequential(Linear, LayerNorm, GELU, Linear)
            out += linear_rules(f"{theirs}.0", f"{head}_head/hidden")
            out += norm_rules(f"{theirs}.1", f"{head}_head/norm")
            out += linear_rules(f"{theirs}.3", f"{head}_head/out")
    return out


def rules(model_cfg: ml_collections.ConfigDict) -> list[Rule]:
    """The official key <-> our path mapping (expert norms addressed by row, see STACKED)."""
    c = model_cfg
    if c.tower not in ("manager", "bridge"):
        raise ValueError(f"official checkpoints hold a manager or bridge tower, not {c.tower!r}")
    out = hf_roberta.text_encoder_rules(TEXT, c.text.num_layers)
    out += hf_clip_vision.openai_rules(VISION, c.vision.num_layers)
    out += hf_bridgetower.interface_rules(c)
    out += manager_rules(c) if c.tower == "manager" else hf_bridgetower.bridge_rules(c)
    return out + hf_bridgetower.head_rules(c) + task_head_rules(c)


# ---- model config from the tensors and the official hyper-parameters ------------------------
def _shape(state_dict: Mapping, key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise ConversionError(f"{key} is missing: the model sizes are read from it (is this an "
                              f"official ManagerTower / BridgeTower checkpoint?)")
    return tuple(np.shape(state_dict[key]))


def _count(state_dict: Mapping, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})


def _tower(state_dict: Mapping) -> str:
    if any(k.startswith("cross_modal_text_manager_tower.") for k in state_dict):
        return "manager"
    if any(k.startswith(("cross_modal_text_link_tower.", "cross_modal_text_layernorm."))
           for k in state_dict):
        return "bridge"
    raise ConversionError("no cross_modal_*_manager_tower.* (ManagerTower) nor "
                          "cross_modal_*_link_tower.* / cross_modal_*_layernorm.* (BridgeTower) "
                          "keys: not an official ManagerTower / BridgeTower checkpoint")


def official_config(hparams: Mapping | None) -> dict[str, Any]:
    """The official config dict inside a Lightning `hyper_parameters` ({'config': {...}}), or
    `hparams` itself when it is that config already."""
    hparams = dict(hparams or {})
    return dict(hparams.get("config", hparams))


def _check_supported(hp: Mapping) -> None:
    if "roberta" not in hp.get("tokenizer", "roberta"):
        raise ValueError(f"tokenizer={hp['tokenizer']!r}: our text encoder is RoBERTa (padding-"
                         f"offset positions); BERT text towers are not supported")
    if "CLIP" not in hp.get("vit", "CLIP"):
        raise ValueError(f"vit={hp['vit']!r}: our vision encoder is CLIP's ViT")


def _manager_config(c: ml_collections.ConfigDict, state_dict: Mapping, hp: Mapping) -> None:
    text, image = (_shape(state_dict, f"{_manager(s, 0)}layer_scores") for s in ("text", "image"))
    for stream, shape in (("text", text), ("image", image)):
        if len(shape) != 4:
            raise ConversionError(f"{_manager(stream, 0)}layer_scores {shape} is not [1, N, 1, W]")
    if text[1] != image[1]:
        raise ValueError(f"managed_layers_text={text[1]} != managed_layers_image={image[1]}: our "
                         f"model.manager.num_layers is one N for both streams")
    c.manager.num_layers = text[1]
    c.manager.weight_type = "scalar" if text[-1] == 1 else "vector"
    if f"{_manager('text', 1)}linear_controller.weight" in state_dict:
        c.manager.type = "AAUE"
    else:  # with one cross-modal layer both types hold the same first-layer SAUE
        c.manager.type = "SAUE" if c.cross.num_layers > 1 else hp.get("manager_type", "AAUE")
    c.manager.learn_temperature = bool(hp.get("manager_softmax_temperature_learnable", True))
    c.manager.temperature = float(hp.get("manager_softmax_temperature", 1.0))
    c.manager.layer_norm_eps = 1e-5


def _head_config(c: ml_collections.ConfigDict, state_dict: Mapping, hp: Mapping) -> None:
    def rows(key: str) -> int | None:
        return np.shape(state_dict[key])[0] if key in state_dict else None

    present = {"mlm": "mlm_score.", "itm": "itm_score.", "itc": f"{ITC_PREFIX[c.tower]}text_head.",
               **{head: f"{theirs}." for head, theirs in CLASSIFIERS.items()}}
    c.heads = tuple(h for h, prefix in present.items()
                    if any(k.startswith(prefix) for k in state_dict))
    scales = {rows(f"{CLASSIFIERS[h]}.0.weight") / (2 * c.cross.hidden_size)
              for h in CLASSIFIERS if h in c.heads and rows(f"{CLASSIFIERS[h]}.0.weight")}
    if len(scales) > 1:
        raise ValueError(f"the task heads have different hidden scales {sorted(scales)}")
    c.head_hidden_scale = scales.pop() if scales else float(hp.get("head_hidden_scale", 1))
    if "vqa" in c.heads:
        c.vqa_num_answers = rows("vqa_classifier.3.weight") or hp.get("vqav2_label_size", 3129)
    if "itc" in c.heads:
        c.itc_dim = (rows(f"{ITC_PREFIX[c.tower]}text_head.fc.weight")
                     or hp.get("contrastive_hidden_size", c.itc_dim))
    c.itc_temperature = float(hp.get("temperature", 0.07))


def model_config_from_ckpt(state_dict: Mapping[str, np.ndarray], hparams: Mapping | None = None,
                           image_size: int | None = None) -> ml_collections.ConfigDict:
    """Our model config for an official checkpoint: sizes from the tensors, the rest from the
    official config in `hparams` (Lightning's hyper_parameters) or the official defaults."""
    hp = official_config(hparams)
    _check_supported(hp)
    sd = state_dict
    c = model_config("base", _tower(sd))
    vocab, width = _shape(sd, f"{TEXT}embeddings.word_embeddings.weight")
    layer0 = f"{TEXT}encoder.layer.0."
    c.text = ml_collections.ConfigDict(dict(
        vocab_size=vocab, hidden_size=width, num_layers=_count(sd, f"{TEXT}encoder.layer."),
        num_heads=max(1, width // 64), mlp_dim=_shape(sd, f"{layer0}intermediate.dense.weight")[0],
        max_position_embeddings=_shape(sd, f"{TEXT}embeddings.position_embeddings.weight")[0],
        pad_token_id=1,
        type_vocab_size=_shape(sd, f"{TEXT}embeddings.token_type_embeddings.weight")[0],
        layer_norm_eps=1e-5, activation="gelu", dropout=0.1, attention_dropout=0.1))
    for key in (f"{VISION}conv1.weight", POSITIONS):  # read by openai_vision_config
        _shape(sd, key)
    visual = {k[len("vit_model."):]: v for k, v in sd.items() if k.startswith(VISION)}
    c.vision = hf_clip_vision.openai_vision_config(visual, "visual.", image_size)
    cross0 = "cross_modal_text_layers.0."
    d = _shape(sd, f"{cross0}attention.self.query.weight")[0]
    drop = float(hp.get("drop_rate", 0.1))
    c.cross = ml_collections.ConfigDict(dict(
        hidden_size=d, num_layers=_count(sd, "cross_modal_text_layers."),
        num_heads=int(hp.get("num_heads", max(1, d // 64))),
        mlp_dim=_shape(sd, f"{cross0}intermediate.dense.weight")[0], layer_norm_eps=1e-12,
        activation="gelu", dropout=drop, attention_dropout=drop))
    c.num_token_types = _shape(sd, "token_type_embeddings.weight")[0]
    c.max_text_len = min(int(hp.get("max_text_len", 50)),
                         c.text.max_position_embeddings - c.text.pad_token_id - 1)
    if c.tower == "manager":
        _manager_config(c, sd, hp)
    else:
        link = "cross_modal_text_link_tower.0."
        c.bridge.type = ("scaled_add" if f"{link}scaled_factor" in sd else "interpolate"
                         if f"{link}beta" in sd else "add")
        c.bridge.layer_norm_eps = 1e-5
    _head_config(c, sd, hp)
    return c


# ---- both directions -------------------------------------------------------------------------
def _override(cfg: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = cfg
        for parent in parents:
            node = node[parent]
        node[leaf] = value


def _split_rows(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{path: [N, ...]} -> {path@n: [...]} for the STACKED paths (shapes or arrays)."""
    out = {}
    for path, value in flat.items():
        if path.endswith(STACKED):
            rows = range(value[0]) if isinstance(value, tuple) else range(np.shape(value)[0])
            out.update({f"{path}@{n}": value[1:] if isinstance(value, tuple) else value[n]
                        for n in rows})
        else:
            out[path] = value
    return out


def _stack_rows(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out, rows = {}, {}
    for path, value in flat.items():
        base, at, n = path.rpartition("@")
        if at:
            rows.setdefault(base, {})[int(n)] = value
        else:
            out[path] = value
    out.update({base: np.stack([parts[n] for n in range(len(parts))])
                for base, parts in rows.items()})
    return out


def ignored(state_dict: Mapping, model_cfg: ml_collections.ConfigDict) -> list[str]:
    """The keys `convert` drops (see the module docstring)."""
    return [k for k in state_dict
            if k.startswith(DROPPED_PREFIXES) or k in DROPPED_KEYS or k.endswith(DROPPED_SUFFIXES)
            or k == "temperature" and "itc" not in model_cfg.heads]


def convert(state_dict: Mapping[str, np.ndarray],
            model_cfg: ml_collections.ConfigDict | None = None, *,
            hparams: Mapping | None = None, image_size: int | None = None,
            **overrides: Any) -> tuple[ml_collections.ConfigDict, dict]:
    """Official state dict -> (model_cfg, {'params': ...}).

    model_cfg: the target config; by default read off the checkpoint (`model_config_from_ckpt`)
      with `hparams`, the .ckpt's `hyper_parameters` (or the official config dict in it).
    image_size: resize the vision position embeddings bicubically to this image size.
    overrides: dotted config keys set last, e.g. **{'text.num_heads': 16}, or scan_layers=True
      (the encoder layers stacked, models/layer_stack.py).
    Every missing, unexpected or mis-shaped key is reported together (ConversionError)."""
    if model_cfg is None:
        model_cfg = model_config_from_ckpt(state_dict, hparams)
    else:
        model_cfg = model_cfg.copy_and_resolve_references()
    _override(model_cfg, overrides)
    if image_size:
        state_dict = resize_position_embedding(state_dict, POSITIONS, model_cfg.vision.patch_size,
                                               image_size)
        model_cfg.vision.image_size = image_size
    shapes = parameter_shapes(layer_stack.unrolled(model_cfg))  # the layout of the key map
    params = to_params(state_dict, rules(model_cfg), _split_rows(shapes),
                       ignored(state_dict, model_cfg), what="the official checkpoint", hint=HINT)
    flat = _stack_rows(traverse_util.flatten_dict(params, sep="/"))
    params = traverse_util.unflatten_dict(flat, sep="/")
    return model_cfg, {"params": layer_stack.for_config(params, model_cfg)}


def export(params: Mapping, model_cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """Our params -> the official state dict (torch.load_state_dict(..., strict=False) fills
    all but the dropped keys). Either layer layout."""
    params = layer_stack.unstack_layers(params)
    flat = _split_rows({k: np.asarray(v) for k, v in
                        traverse_util.flatten_dict(params, sep="/").items()})
    mapping = rules(model_cfg)
    state_dict = to_state_dict(traverse_util.unflatten_dict(flat, sep="/"), mapping)
    for key, value in state_dict.items():
        if key.endswith(".layer_scores"):  # [rows, W] -> [1, rows, 1, W]
            state_dict[key] = value[None, :, None, :]
    return state_dict
