"""Per-module parameter table of a config's model, from `jax.eval_shape` (nothing is allocated).

    python -m mtower_jax.summary --config=configs/pretrain.py:model=base,tower=bridge

The last line is `total_params: N` for the backbone: encoders, transforms, token-type and layer
embeddings, cross-modal layers, managers or bridges, poolers. Heads are listed but not counted.
"""
from __future__ import annotations

import math

import ml_collections
from absl import app
from ml_collections import config_flags

from mtower_jax import config_args
from mtower_jax.models import parameter_shapes

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)

_INPUTS_LABEL = {"manager": "managers", "bridge": "bridges", "meter": "inputs (no parameters)"}


def _groups(tower: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(label, parameter-path prefixes) of the backbone's rows, in reading order."""
    inputs = _INPUTS_LABEL[tower]
    return (
        ("text encoder", ("backbone/text_encoder/",)),
        ("vision encoder", ("backbone/vision_encoder/",)),
        ("transforms + token types", ("backbone/text_transform", "backbone/image_transform",
                                      "backbone/token_type_embeddings/")),
        (f"text {inputs}", ("backbone/text_inputs/",)),
        (f"image {inputs}", ("backbone/image_inputs/",)),
        ("cross-modal text layers", ("backbone/text_cross_layers_",)),
        ("cross-modal image layers", ("backbone/image_cross_layers_",)),
        ("poolers", ("backbone/text_pooler/", "backbone/image_pooler/")),
    )


def parameter_table(model_cfg: ml_collections.ConfigDict):
    """-> (backbone rows [(label, count)], head rows [(name, count)], backbone total)."""
    counts = {path: math.prod(shape) for path, shape in parameter_shapes(model_cfg).items()}
    rows, seen = [], set()
    for label, prefixes in _groups(model_cfg.tower):
        paths = [p for p in counts if p.startswith(prefixes)]
        seen.update(paths)
        rows.append((label, sum(counts[p] for p in paths)))
    heads: dict[str, int] = {}
    for path in counts:
        if path not in seen:
            top = path.split("/")[0]
            if top == "backbone":
                raise RuntimeError(f"parameter {path} belongs to no summary row")
            heads[top] = heads.get(top, 0) + counts[path]
    return rows, sorted(heads.items()), sum(count for _, count in rows)


def main(argv):
    del argv
    config = _CONFIG.value
    m = config.model
    rows, heads, total = parameter_table(m)
    print(f"tower={m.tower}  image={m.vision.image_size}  text_len={m.max_text_len}  "
          f"text={m.text.num_layers}x{m.text.hidden_size}  vision={m.vision.num_layers}x"
          f"{m.vision.hidden_size}  cross={m.cross.num_layers}x{m.cross.hidden_size}")
    width = max(len(label) for label, _ in rows + heads) + 4
    print(f"{'module':<{width}}{'params':>15}")
    for label, count in rows:
        print(f"{label:<{width}}{count:>15,}")
    if heads:
        print("heads (not in total):")
        for name, count in heads:
            print(f"  {name:<{width - 2}}{count:>15,}")
    print(f"total_params: {total}")


if __name__ == "__main__":
    app.run(main, flags_parser=config_args.parse_flags)  # overrides type-checked first
