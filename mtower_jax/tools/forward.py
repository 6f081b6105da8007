"""One jitted forward pass of a config's model on a random batch; prints what comes out.

    python -m mtower_jax.tools.forward --config=configs/pretrain.py:model=tiny

A smoke test of the whole model (every tower and head) that needs no data.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mtower_jax import config_args
from mtower_jax.models import build_model, random_inputs


def _shape(value) -> str:
    """'(B, L, D)' for an array, 'k x (B, L, D)' for the per-layer tuples (hidden states)."""
    if isinstance(value, (tuple, list)):
        shapes = {tuple(v.shape) for v in value}
        return f"{len(value)} x {shapes.pop()}" if len(shapes) == 1 else str(sorted(shapes))
    return str(tuple(value.shape))


def _mean(value) -> float:
    values = value if isinstance(value, (tuple, list)) else (value,)
    return float(np.mean([float(jnp.mean(v)) for v in values]))


def describe(cfg, batch_size: int) -> str:
    """Initialises the model of `cfg` (config.model), runs one jitted forward pass on a random
    batch of `batch_size` and returns the printed report: each output's shape and mean and,
    for the manager tower, the expert weights averaged per cross-modal layer."""
    model = build_model(cfg)
    inputs = random_inputs(cfg, batch_size)
    start = time.perf_counter()
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), **inputs)
    with_weights = cfg.tower == "manager"
    forward = jax.jit(lambda v, x: model.apply(v, **x, return_manager_weights=with_weights))
    out = jax.block_until_ready(forward(variables, inputs))
    lines = [f"{cfg.tower} tower, init + forward in {time.perf_counter() - start:.1f}s "
             f"on {jax.devices()[0].platform}"]
    for key, value in sorted(out.items()):
        if key != "manager_weights":
            lines.append(f"  {key:<26} {_shape(value):<22} mean {_mean(value):+.4f}")
    if with_weights:
        for stream, weights in out["manager_weights"].items():
            # [layers, B, L, N] -> mean over batch and tokens: one row of N weights per layer.
            table = np.asarray(jnp.mean(weights, axis=(1, 2)))
            lines.append(f"  manager weights ({stream}), cross layer x managed uni-modal layer:")
            lines += [f"    layer {layer}: " + " ".join(f"{w:.3f}" for w in row)
                      for layer, row in enumerate(table, start=1)]
    return "\n".join(lines)


def _define_flags() -> dict:
    """The command line's flags, defined only when this runs as a program (importing
    `describe` must not claim --config, which other tools define too)."""
    return {"config": config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                                      lock_config=True),
            "batch_size": flags.DEFINE_integer("batch_size", 4, "Batch size of the random batch.")}


def main(argv, cli: dict) -> None:
    del argv
    print(describe(cli["config"].value.model, cli["batch_size"].value))


if __name__ == "__main__":
    _cli = _define_flags()
    app.run(lambda argv: main(argv, _cli),
            flags_parser=config_args.parse_flags)  # overrides type-checked first
