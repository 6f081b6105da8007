"""python -m mtower_jax.convert SOURCE_FORMAT SRC OUT

Reads SRC (safetensors or a torch file, or a directory holding one; an HF config.json beside
it is used where the format has one), converts it, and writes into OUT an Orbax checkpoint of
the parameters (OUT/params) and the model config (OUT/model_config.json); an OUT that already
holds params is refused. Training configs load it with --config.init_from=OUT, and towers
converted apart together: --config.init_from=runs/clip,runs/roberta.

  hf_bridgetower   HF BridgeTowerModel / ...ForMaskedLM / ...ForImageAndTextRetrieval
  hf_clip_vision   HF CLIPVisionModel or CLIPModel (vision tower only)
  openai_clip      OpenAI CLIP (ViT-B-16.pt): vision tower only
  hf_roberta       HF RobertaModel (text tower only)
  official_ckpt    the official ManagerTower / BridgeTower PyTorch Lightning .ckpt (its
                   hyper_parameters supply what the tensors do not tell)

Options: --image_size=N resizes the vision position embeddings (e.g. 224 -> 288; not for
hf_bridgetower); --model=tiny|small|base|large picks the model the uni-modal towers are written
into; --drop_itc_cross_modal_head leaves out HF ForContrastiveLearning's cross-modal ITC head,
which our model has no place for; --scan_layers writes the encoder layers stacked, for
model.scan_layers=True (not needed for init_from, which converts either layout).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax

from mtower_jax.convert import (checkpoint_files, hf_bridgetower, hf_clip_vision, hf_roberta,
                                official_ckpt)
from mtower_jax.models import model_config

FORMATS = ("hf_bridgetower", "hf_clip_vision", "openai_clip", "hf_roberta", "official_ckpt")
# config.json's model_type for each HF format (CLIPModel's and CLIPVisionModel's).
HF_MODEL_TYPES = {"hf_bridgetower": ("bridgetower",), "hf_roberta": ("roberta",),
                  "hf_clip_vision": ("clip", "clip_vision_model")}


def convert(source_format: str, src: str, image_size: int | None, model: str,
            drop_itc_cross_modal_head: bool = False, scan_layers: bool = False):
    if source_format == "hf_bridgetower" and image_size:
        raise ValueError("--image_size applies to the uni-modal formats and official_ckpt; "
                         "resize a BridgeTower checkpoint when fine-tuning (init_from)")
    if drop_itc_cross_modal_head and source_format != "hf_bridgetower":
        raise ValueError("--drop_itc_cross_modal_head applies to hf_bridgetower only")
    if source_format == "official_ckpt":
        state_dict, hparams = checkpoint_files.load_lightning_checkpoint(src)
        return official_ckpt.convert(state_dict, hparams=hparams, image_size=image_size,
                                     scan_layers=scan_layers)
    state_dict = checkpoint_files.load_state_dict(src)
    hf_config = checkpoint_files.load_hf_config(src)
    if source_format != "openai_clip" and hf_config is None:
        raise FileNotFoundError(f"{source_format} needs the HF config.json beside {src}")
    model_type, expected = (hf_config or {}).get("model_type"), HF_MODEL_TYPES.get(source_format)
    if expected and model_type is not None and model_type not in expected:
        right = [f for f, types in HF_MODEL_TYPES.items() if model_type in types]
        raise ValueError(f"the config.json of {src} is a {model_type!r} model, and {source_format} "
                         f"reads {' or '.join(map(repr, expected))}"
                         + (f"; convert it with {right[0]}" if right else ""))
    if source_format == "hf_bridgetower":
        return hf_bridgetower.convert(state_dict, hf_config, drop_itc_cross_modal_head,
                                      scan_layers)
    target = model_config(model)
    target.scan_layers = scan_layers
    if source_format == "hf_roberta":
        return hf_roberta.convert(state_dict, hf_config, target)
    return hf_clip_vision.convert(state_dict, hf_config if source_format == "hf_clip_vision"
                                  else None, target, image_size)


def check_out(out: str) -> None:
    """ValueError unless OUT can take a conversion: never a file, nor over another one's params."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"OUT {out} is a file; name a directory")
    if os.path.exists(os.path.join(out, "params")):
        raise ValueError(f"OUT {out} already holds converted params; pick a new directory (a "
                         f"model made of two conversions loads both: "
                         f"--config.init_from=runs/clip,runs/roberta)")


def save(out: str, model_cfg, variables) -> None:
    import orbax.checkpoint as ocp

    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(out, "params"), variables["params"])
    with open(os.path.join(out, "model_config.json"), "w") as f:
        f.write(model_cfg.to_json(indent=2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtower_jax.convert",
                                     description=__doc__.split("\n\n")[1])
    parser.add_argument("source_format", choices=FORMATS)
    parser.add_argument("src")
    parser.add_argument("out")
    parser.add_argument("--image_size", type=int, default=None)
    parser.add_argument("--model", default="base", choices=("tiny", "small", "base", "large"))
    parser.add_argument("--drop_itc_cross_modal_head", action="store_true")
    parser.add_argument("--scan_layers", action="store_true")
    args = parser.parse_args(argv)
    try:
        check_out(args.out)
        model_cfg, variables = convert(args.source_format, args.src, args.image_size, args.model,
                                       args.drop_itc_cross_modal_head, args.scan_layers)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyError as e:  # a config.json or state dict without a key the format always has
        print(f"error: {args.src} has no {e}, which every {args.source_format} checkpoint has: "
              f"is it one?", file=sys.stderr)
        return 1
    save(args.out, model_cfg, variables)
    count = sum(v.size for v in jax.tree.leaves(variables["params"]))
    print(json.dumps({"out": os.path.abspath(args.out), "format": args.source_format,
                      "parameters": int(count), "tower": model_cfg.tower,
                      "heads": list(model_cfg.heads)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
