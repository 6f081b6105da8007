"""Heatmaps of the managers' aggregation weights, averaged over an eval set (the ManagerTower
paper's visualisation of what each cross-modal layer takes from each uni-modal layer).

    python -m mtower_jax.tools.plot_managers --workdir=runs/pretrain [--split=val] \
        [--max_batches=50]

Reads DIR/config.json and the newest params in DIR (DIR/checkpoints/<step>/state or
DIR/params), runs the model on `split` (default: the first of config.data.eval_splits) and
writes into DIR:

    manager_weights_text.png    rows: cross-modal layer 1..L, columns: the N managed uni-modal
    manager_weights_image.png   layers (labelled by their uni-modal layer number, bottom-up)
    manager_weights.json        the averaged [L, N] arrays, the row / column labels, what was read

A cell is the expert's softmax weight averaged over every real token of the split (text:
attention_mask == 1; image: every token), so each row sums to 1. The managers' weights cover
the N uni-modal experts only: the previous cross-modal layer enters with its own weight w_c,
outside the softmax (managers.py), so it has no column. Layer 1 is always SAUE (static
weights), later layers AAUE (per token) unless model.manager.type is 'SAUE'.

In-process: `main(workdir, split, max_batches)` returns the written paths;
`average_manager_weights(config, params, split, max_batches)` and `plot(...)` are the parts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

STREAMS = ("text", "image")
ENCODERS = dict(text="text", image="vision")  # stream -> model config section


class PlotManagersError(ValueError):
    """The workdir cannot be plotted (no config, no managers, no params)."""


def _tuples(value):
    """JSON lists back to the tuples the configs hold (model.heads, data.datasets, ...)."""
    if isinstance(value, dict):
        return {key: _tuples(item) for key, item in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(item) for item in value)
    return value


def load_config(workdir: str):
    """The run's config from DIR/config.json (written by training), lists made tuples again."""
    import ml_collections

    path = os.path.join(os.path.expanduser(workdir), "config.json")
    if not os.path.isfile(path):
        raise PlotManagersError(f"{path} does not exist: --workdir must be a training run's "
                                "directory (it writes config.json)")
    with open(path) as f:
        return ml_collections.ConfigDict(_tuples(json.load(f)))


def check_manager_tower(config) -> None:
    tower = config.model.get("tower")
    if tower != "manager":
        raise PlotManagersError(f"the run's model.tower is {tower!r}: only the 'manager' tower "
                                "has managers whose weights can be plotted")


def task_of(config) -> str:
    return config.get("task", None) or "pretrain"


def default_split(config) -> str:
    splits = config.data.get("eval_splits", None)
    if splits:
        return splits[0] if not isinstance(splits, str) else splits
    return config.data.get("eval_split", None) or "val"


def column_labels(model_cfg) -> dict[str, list[str]]:
    """Per stream, the uni-modal layer numbers (1-based) of the N managed experts, in the
    experts' order: the encoders send hidden_states[depth - N:], i.e. layers depth-N+1..depth."""
    n = model_cfg.manager.num_layers
    labels = {}
    for stream, encoder in ENCODERS.items():
        depth = model_cfg[encoder].num_layers
        labels[stream] = [str(layer) for layer in range(depth - n + 1, depth + 1)]
    return labels


def row_labels(model_cfg) -> list[str]:
    return [str(layer) for layer in range(1, model_cfg.cross.num_layers + 1)]


def manager_description(model_cfg) -> str:
    m = model_cfg.manager
    kind = "SAUE" if m.type == "SAUE" or model_cfg.cross.num_layers == 1 else \
        f"{m.type} (layer 1: SAUE)"
    return f"{kind} managers, {m.weight_type} weights"


_WEIGHT_SUMS = {}  # model config JSON -> jitted fn: repeated in-process calls compile once


def make_weight_sums(model_cfg):
    """A jitted fn (params, batch, valid [B]) -> per stream (sum of weights [L, N], token count)
    over the real tokens of the valid rows."""
    key = model_cfg.to_json(sort_keys=True)
    if key not in _WEIGHT_SUMS:
        _WEIGHT_SUMS[key] = _make_weight_sums(model_cfg)
    return _WEIGHT_SUMS[key]


def _make_weight_sums(model_cfg):
    import jax
    import jax.numpy as jnp

    from mtower_jax.models import build_model

    model = build_model(model_cfg)
    pair = "nlvr2" in model_cfg.heads

    @jax.jit
    def weight_sums(params, batch, valid):
        out = model.apply({"params": params}, input_ids=batch["input_ids"],
                          attention_mask=batch["attention_mask"],
                          pixel_values=batch["pixel_values"],
                          pixel_values_2=batch["pixel_values_2"] if pair else None,
                          train=False, return_manager_weights=True)
        weights = out["manager_weights"]
        text_mask = (batch["attention_mask"] > 0).astype(jnp.float32) * valid[:, None]  # [B, T]
        text = weights["text"].astype(jnp.float32)  # [L, B, T, N]
        image = weights["image"].astype(jnp.float32)  # [L, B, 1+P, N]
        return {"text": (jnp.einsum("lbtn,bt->ln", text, text_mask), jnp.sum(text_mask)),
                "image": (jnp.einsum("lbtn,b->ln", image, valid),
                          jnp.sum(valid) * image.shape[2])}

    return weight_sums


def average_manager_weights(config, params, split: str | None = None,
                            max_batches: int = 0) -> dict[str, np.ndarray]:
    """{'text': [L, N], 'image': [L, N]}: each manager's expert weights averaged over the real
    tokens of the first `max_batches` batches (0: all) of `split` of the run's task."""
    import jax

    from mtower_jax.data import pipeline
    from mtower_jax.train.evaluation import eval_batch_size, padded_batches

    check_manager_tower(config)
    split = split or default_split(config)
    batch_size = eval_batch_size(config)
    data = pipeline.task_data(config, task_of(config), split, train=False,
                              batch_size=batch_size, process_index=0, process_count=1)
    weight_sums = make_weight_sums(config.model)
    keys = ["input_ids", "attention_mask", "pixel_values"]
    if "nlvr2" in config.model.heads:
        keys.append("pixel_values_2")
    params = jax.device_put(params)
    sums = {stream: 0.0 for stream in STREAMS}
    counts = {stream: 0.0 for stream in STREAMS}
    batches = 0
    # Padding rows repeat a real row (no all-masked text, whose weights could be NaN) and
    # are excluded by `valid`.
    for padded in padded_batches(data, batch_size, max_batches or 1 << 62):
        if not padded["valid"].any():
            break
        out = jax.device_get(weight_sums(params, {k: padded[k] for k in keys}, padded["valid"]))
        for stream in STREAMS:
            sums[stream] = sums[stream] + np.asarray(out[stream][0], np.float64)
            counts[stream] += float(out[stream][1])
        batches += 1
    if not batches:
        raise PlotManagersError(f"split {split!r} of task {task_of(config)!r} has no examples")
    return {stream: (sums[stream] / counts[stream]).astype(np.float32) for stream in STREAMS}


def plot(weights: np.ndarray, labels: list[str], path: str, title: str,
         rows: list[str] | None = None) -> str:
    """One heatmap: rows = cross-modal layers, columns = `labels`; writes a PNG to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = np.asarray(weights, np.float64)
    num_rows, num_cols = weights.shape
    rows = rows or [str(layer) for layer in range(1, num_rows + 1)]
    size = (max(4.5, 1.2 + 0.9 * num_cols), 1.4 + 0.6 * num_rows)
    fig, ax = plt.subplots(figsize=size, dpi=120)
    vmax = max(float(weights.max()), 1e-6)
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
    for r in range(num_rows):
        for c in range(num_cols):
            value = weights[r, c]
            ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if value > 0.6 * vmax else "white")
    ax.set_xticks(range(num_cols), labels)
    ax.set_yticks(range(num_rows), rows)
    ax.set_xlabel("managed uni-modal layer")
    ax.set_ylabel("cross-modal layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def main(workdir: str, split: str | None = None, max_batches: int = 0) -> list[str]:
    """Averages the weights over `split` of the run in `workdir` and writes the two PNGs and
    the JSON into it; returns their paths."""
    from mtower_jax.train.init_from import read_params

    workdir = os.path.abspath(os.path.expanduser(workdir))
    config = load_config(workdir)
    check_manager_tower(config)
    split = split or default_split(config)
    params = read_params(workdir)
    weights = average_manager_weights(config, params, split, max_batches)
    columns, rows = column_labels(config.model), row_labels(config.model)
    description = manager_description(config.model)
    written = []
    for stream in STREAMS:
        path = os.path.join(workdir, f"manager_weights_{stream}.png")
        written.append(plot(weights[stream], columns[stream], path,
                            f"{stream} stream: {description}\n({task_of(config)}/{split})",
                            rows=rows))
    summary = dict(
        task=task_of(config), split=split, max_batches=max_batches,
        manager=description, rows=rows, columns=columns,
        **{stream: weights[stream].tolist() for stream in STREAMS})
    json_path = os.path.join(workdir, "manager_weights.json")
    with open(json_path, "w") as f:
        json.dump(summary, f, indent=2)
    written.append(json_path)
    return written


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtower_jax.tools.plot_managers",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a training run's directory")
    parser.add_argument("--split", default=None,
                        help="eval split (default: the first of config.data.eval_splits)")
    parser.add_argument("--max_batches", type=int, default=0,
                        help="batches to average over (0: the whole split)")
    args = parser.parse_args(argv)
    from mtower_jax.train.init_from import InitFromError

    try:
        paths = main(args.workdir, args.split, args.max_batches)
    except (PlotManagersError, InitFromError) as e:
        raise SystemExit(f"error: {e}") from None
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
