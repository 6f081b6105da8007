"""Model configs: the size presets and the validation every model config passes before building.

`model_config(size, tower)` returns the `config.model` ConfigDict of a run. Its fields:

  tower                 'manager' | 'bridge' | 'meter'
  text / vision / cross encoder sizes, LayerNorm eps, activation, dropout
  manager               type ('AAUE' | 'SAUE'), weight_type ('vector' | 'scalar'), num_layers (N),
                        learn_temperature, temperature (init), noise, layer_norm_eps
  bridge                type ('add' | 'scaled_add' | 'interpolate'), layer_norm_eps
  heads                 which task heads to build, and their sizes
  mlm_vocab_chunks      the MLM loss's vocabulary blocks: its logits are made, reduced and
                        dropped block by block, never whole (models/vocab_decoder.py); 1: one
                        block
  attention_impl        'auto' | 'explicit' | 'xla' | 'cudnn': how attention's softmax(QK^T)V
                        runs (models/attention.py); auto takes cuDNN's fused kernel on a GPU in
                        bfloat16 / float16, the written-out einsums elsewhere
  dtype / param_dtype   compute and parameter dtypes; remat: rematerialise every layer
  scan_layers           run each uni-modal encoder's identical layers as one nn.scan (one
                        compiled layer body instead of num_layers copies: faster, leaner
                        compiles). Parameters: `layers/...` stacked [num_layers, ...] instead of
                        `layer_{i}/...` (models/layer_stack.py converts; the checkpoint
                        importers, exporters and init_from do so themselves). With remat the
                        scanned body is rematerialised. The cross-modal layers stay unrolled:
                        each has its own manager / bridge inputs.
"""
from __future__ import annotations

import ml_collections

from mtower_jax.models.attention import ATTENTION_IMPLS
from mtower_jax.models.bridges import BRIDGE_TYPES
from mtower_jax.models.heads import HEADS
from mtower_jax.models.layers import ACTIVATIONS
from mtower_jax.models.towers import TOWERS

SIZES = ("tiny", "small", "base", "large")
MANAGER_TYPES = ("AAUE", "SAUE")
WEIGHT_TYPES = ("vector", "scalar")
DTYPES = ("float32", "bfloat16", "float16")

# (hidden, layers, heads, mlp) per encoder, image/patch, text length, vocab, managed layers N.
_PRESETS = {
    #        text                 vision               cross               image patch len  vocab  N
    "tiny": ((64, 4, 2, 256), (64, 4, 2, 256), (64, 2, 2, 256), 32, 8, 32, 1024, 3),
    "small": ((256, 4, 4, 1024), (256, 4, 4, 1024), (256, 2, 4, 1024), 128, 16, 40, 50265, 4),
    # CLIP ViT-B/16 + RoBERTa-base; vision heads = hidden // 64 as in CLIP.
    "base": ((768, 12, 12, 3072), (768, 12, 12, 3072), (768, 6, 12, 3072), 288, 16, 50, 50265, 6),
    # CLIP ViT-L/14 + RoBERTa-large; 294 = 21 x 14 is the large models' pretraining resolution.
    "large": ((1024, 24, 16, 4096), (1024, 24, 16, 4096), (1024, 6, 16, 4096), 294, 14, 50, 50265,
              6),
}


# model.<part>.<field>s that change what the part's parameters compute but no shape, with
# the parameter paths of the part: parameters made under other values load without a
# complaint and compute something else (init_from and resumes compare them).
SHAPELESS_FIELDS = {
    "text": (("backbone/text_encoder/",), ("activation", "layer_norm_eps", "pad_token_id")),
    "vision": (("backbone/vision_encoder/",), ("activation", "layer_norm_eps")),
    "cross": (("backbone/text_cross_layers_", "backbone/image_cross_layers_"),
              ("activation", "layer_norm_eps")),
    "manager": (("backbone/text_inputs/managers_", "backbone/image_inputs/managers_"),
                ("layer_norm_eps",)),
    "bridge": (("backbone/text_inputs/bridges_", "backbone/image_inputs/bridges_"),
               ("type", "layer_norm_eps")),
}


def shapeless_differences(recorded, cfg, param_paths=None) -> list[tuple[str, object, object]]:
    """[("model.<part>.<field>", recorded value, cfg value)] of the SHAPELESS_FIELDS where a
    recorded model config (dict) differs from `cfg` (config.model), for the parts whose
    parameters `param_paths` ('/'-joined) hold; every part if None."""
    out = []
    for part, (prefixes, fields) in SHAPELESS_FIELDS.items():
        given = param_paths is None or any(path.startswith(prefixes) for path in param_paths)
        if part not in cfg or part not in recorded or not given:
            continue
        for field in fields:
            theirs, ours = recorded[part].get(field), cfg[part].get(field)
            if theirs is not None and theirs != ours:
                out.append((f"model.{part}.{field}", theirs, ours))
    return out


def _encoder(hidden: int, layers: int, heads: int, mlp: int, **extra) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(hidden_size=hidden, num_layers=layers, num_heads=heads,
                                          mlp_dim=mlp, **extra))


def model_config(size: str = "tiny", tower: str = "manager") -> ml_collections.ConfigDict:
    if size not in _PRESETS:
        raise ValueError(f"unknown model size {size!r}; choose from {SIZES}")
    text, vision, cross, image_size, patch, text_len, vocab, managed = _PRESETS[size]
    big = size in ("base", "large")
    return ml_collections.ConfigDict(dict(
        tower=tower,
        # RoBERTa: post-LN, erf GELU, 514 positions with padding-offset ids (pad id 1).
        text=_encoder(*text, vocab_size=vocab, max_position_embeddings=514 if big else text_len + 2,
                      pad_token_id=1, type_vocab_size=1, layer_norm_eps=1e-5, activation="gelu",
                      dropout=0.1, attention_dropout=0.1),
        # CLIP ViT: pre-LN, QuickGELU, no dropout.
        vision=_encoder(*vision, image_size=image_size, patch_size=patch, layer_norm_eps=1e-5,
                        activation="quick_gelu", dropout=0.0, attention_dropout=0.0),
        # Cross-modal layers: the original code's BertConfig eps 1e-12 (HF BridgeTower: 1e-5).
        cross=_encoder(*cross, layer_norm_eps=1e-12, activation="gelu", dropout=0.1,
                       attention_dropout=0.1),
        manager=dict(type="AAUE", weight_type="vector", num_layers=managed,
                     learn_temperature=True, temperature=1.0, noise=True, layer_norm_eps=1e-5),
        bridge=dict(type="add", layer_norm_eps=1e-5),
        max_text_len=text_len,
        num_token_types=2,  # text, image (NLVR2 adds a third row for its second image)
        share_transform=True,  # False: one uni-modal -> cross-modal transform per cross layer
        heads=("mlm", "itm"),
        mlm_vocab_chunks=8,  # vocabulary blocks of the MLM loss (models/vocab_decoder.py)
        head_hidden_scale=1.0,
        vqa_num_answers=3129,
        itc_dim=256,
        itc_temperature=0.07,
        attention_impl="auto",
        dtype="float32",
        param_dtype="float32",
        remat=False,
        scan_layers=False,
    ))


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Raises one ValueError listing every inconsistent value of a model config."""
    errors = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    def one_of(key: str, value, choices) -> None:
        check(value in choices, f"model.{key}={value!r} is not one of {tuple(choices)}")

    one_of("tower", cfg.tower, TOWERS)
    one_of("manager.type", cfg.manager.type, MANAGER_TYPES)
    one_of("manager.weight_type", cfg.manager.weight_type, WEIGHT_TYPES)
    one_of("bridge.type", cfg.bridge.type, BRIDGE_TYPES)
    one_of("dtype", cfg.dtype, DTYPES)
    one_of("param_dtype", cfg.param_dtype, DTYPES)
    one_of("attention_impl", cfg.get("attention_impl", "auto"), ATTENTION_IMPLS)
    for key in ("remat", "scan_layers"):
        check(isinstance(cfg.get(key, False), bool), f"model.{key}={cfg.get(key)!r} must be a bool")
    chunks = cfg.get("mlm_vocab_chunks", 1)
    check(isinstance(chunks, int) and chunks >= 1,
          f"model.mlm_vocab_chunks={chunks!r} must be a positive integer")
    for name in cfg.heads:
        one_of("heads", name, HEADS)
    check(len(set(cfg.heads)) == len(cfg.heads), f"model.heads={cfg.heads} repeats a head")
    for part in ("text", "vision", "cross"):
        enc = cfg[part]
        one_of(f"{part}.activation", enc.activation, ACTIVATIONS)
        for key in ("hidden_size", "num_layers", "num_heads", "mlp_dim"):
            check(isinstance(enc[key], int) and enc[key] > 0,
                  f"model.{part}.{key}={enc[key]!r} must be a positive integer")
        if isinstance(enc.num_heads, int) and enc.num_heads > 0:
            check(enc.hidden_size % enc.num_heads == 0,
                  f"model.{part}.hidden_size={enc.hidden_size} is not divisible by "
                  f"model.{part}.num_heads={enc.num_heads}")
        for key in ("dropout", "attention_dropout"):
            check(0.0 <= enc[key] < 1.0, f"model.{part}.{key}={enc[key]} must be in [0, 1)")
        check(enc.layer_norm_eps > 0, f"model.{part}.layer_norm_eps must be > 0")
    v = cfg.vision
    check(v.image_size % v.patch_size == 0,
          f"model.vision.image_size={v.image_size} is not a multiple of "
          f"model.vision.patch_size={v.patch_size}")
    t = cfg.text
    check(cfg.max_text_len + t.pad_token_id + 1 <= t.max_position_embeddings,
          f"model.max_text_len={cfg.max_text_len} needs {cfg.max_text_len + t.pad_token_id + 1} "
          f"position rows (RoBERTa positions start after pad_token_id={t.pad_token_id}) but "
          f"model.text.max_position_embeddings={t.max_position_embeddings}")
    depth = min(t.num_layers, v.num_layers)
    if cfg.tower == "manager":
        check(1 <= cfg.manager.num_layers <= depth,
              f"model.manager.num_layers={cfg.manager.num_layers} (N managed layers) must be in "
              f"[1, {depth}], the depth of the shallower uni-modal encoder")
    if cfg.tower == "bridge":
        check(cfg.cross.num_layers <= depth,
              f"model.cross.num_layers={cfg.cross.num_layers}: the bridge tower links one "
              f"uni-modal layer per cross-modal layer, so it needs at most {depth}")
    if not cfg.share_transform:
        check(cfg.tower == "bridge", "model.share_transform=False (one transform per cross-modal "
              "layer, HF BridgeTower's share_cross_modal_transformer_layers=False) needs "
              "model.tower='bridge'")
    check(cfg.num_token_types >= 2, "model.num_token_types must be >= 2 (text and image rows)")
    if "vqa" in cfg.heads:
        check(isinstance(cfg.vqa_num_answers, int) and cfg.vqa_num_answers >= 1,
              f"model.vqa_num_answers={cfg.vqa_num_answers!r} must be a positive integer (the "
              "answer vocabulary's size)")
    if "nlvr2" in cfg.heads:
        check(cfg.num_token_types >= 3,
              "the nlvr2 head needs model.num_token_types=3 (a row for the second image)")
    if errors:
        raise ValueError("invalid model config:\n  " + "\n  ".join(errors))
