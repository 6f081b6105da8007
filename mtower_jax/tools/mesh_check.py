"""Trains a few steps of one config on several meshes / sharding rules and checks that the
per-step losses agree: the sharding must change where numbers live, not what they are.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m mtower_jax.tools.mesh_check \
        --config=configs/pretrain.py:model=tiny --steps=5 \
        --mesh=data=8 --mesh=data=2,fsdp=4:fsdp --mesh=data=2,fsdp=2,tensor=2:fsdp_tensor \
        --mesh=data=1

Each `--mesh` is `axis=size,...[:rules]`: axes left out are 1, the run takes the first
product-of-sizes devices, and `rules` is a config.logical_axis_rules preset (default: the
config's). Every mesh starts from the same parameters and reads the same batches with the
same step rngs as `mtower_jax.main` (jax's partitionable threefry draws the same dropout
bits on any sharding), so its losses are also those of a real run of the config.
Prints one JSON line per mesh — its losses, their largest relative difference from the
first mesh's, and the fraction of parameter bytes left replicated — and exits 1 if the
difference passes --rtol. Run it on a new cluster (or with host
devices on a laptop) before a long run with new rules.
"""
from __future__ import annotations

import json
import sys

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mtower_jax import config_args
from mtower_jax.data import pipeline
from mtower_jax.models.partitioning import MESH_AXES, resolve_rules
from mtower_jax.train import mesh as mesh_lib
from mtower_jax.train.loop import resolve_total_steps
from mtower_jax.train.state import create_train_state
from mtower_jax.train.step import jit_train_step
from mtower_jax.train.tasks import get_task

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:args].",
                                          lock_config=True)
_MESHES = flags.DEFINE_multi_string("mesh", None, "axis=size,...[:rules preset]; repeat.")
_STEPS = flags.DEFINE_integer("steps", 5, "Training steps per mesh.")
_RTOL = flags.DEFINE_float("rtol", 1e-5, "Largest relative loss difference accepted.")
flags.mark_flags_as_required(["config", "mesh"])


def parse_mesh(spec: str, default_rules) -> tuple[dict, object]:
    """'data=2,fsdp=4:fsdp' -> ({'data': 2, 'fsdp': 4, 'tensor': 1}, 'fsdp')."""
    sizes_text, _, rules = spec.partition(":")
    sizes = dict.fromkeys(MESH_AXES, 1)
    for item in filter(None, sizes_text.split(",")):
        axis, _, size = item.partition("=")
        if axis not in MESH_AXES or not size.isdigit() or int(size) < 1:
            raise ValueError(f"--mesh={spec!r}: {item!r} is not axis=size with an axis of "
                             f"{MESH_AXES} and a positive size")
        sizes[axis] = int(size)
    return sizes, rules or default_rules


def losses_on_mesh(config, sizes: dict, rules_spec, batches: list[dict], params=None
                   ) -> tuple[dict, float, dict]:
    """Trains on this mesh from `params` (None: the config's random initialisation). Returns
    ({metric name: [per-step values]}, the fraction of parameter bytes every device holds
    whole, the starting params on the host)."""
    count = int(np.prod(list(sizes.values())))
    if count > jax.device_count():
        raise ValueError(f"mesh {sizes} needs {count} devices; {jax.device_count()} exist (on "
                         "a CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    mesh = mesh_lib.make_mesh(mesh_lib.mesh_config(**sizes), jax.devices()[:count])
    rules = resolve_rules(rules_spec)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        model, tx, abstract_state, init = create_train_state(config, mesh, rules)
        state = init(params)
        start = jax.device_get(state["params"])  # before the step donates the buffers
        train_step = jit_train_step(config, model, tx, abstract_state, mesh)
        base_rng, history = jax.device_get(state["rng"]), []
        for i, batch in enumerate(batches):  # the step rngs of train/loop.py
            state, metrics = train_step(state, mesh_lib.global_batch(batch, mesh),
                                        jax.random.fold_in(base_rng, i))
            history.append(metrics)
    history = jax.device_get(history)  # one fetch: the steps run back to back
    losses = {k: [float(m[k]) for m in history] for k in history[0]
              if k == "loss" or k.startswith("loss_")}
    return losses, mesh_lib.replicated_parameters(abstract_state["params"])[0], start


def max_relative_difference(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(np.subtract(a[k], b[k])) / np.maximum(np.abs(b[k]), 1e-12)))
               for k in b)


def check(config, meshes: list[str], steps: int) -> list[dict]:
    """One row per mesh: mesh, rules, losses, replicated (fraction of parameter bytes not
    sharded), max_rel_diff (against the first mesh)."""
    config = resolve_total_steps(config)
    task = get_task(config)
    data = iter(pipeline.task_data(config, task.name, config.data.train_split, train=True,
                                   process_index=0, process_count=1))
    batches = [next(data) for _ in range(steps)]
    params, rows = None, []
    for spec in meshes:
        sizes, rules = parse_mesh(spec, config.logical_axis_rules)
        # The same start everywhere: the first mesh's initialisation.
        losses, replicated, params = losses_on_mesh(config, sizes, rules, batches, params)
        reference = rows[0]["losses"] if rows else losses
        rows.append(dict(mesh=sizes, rules=rules, losses=losses, replicated=replicated,
                         max_rel_diff=max_relative_difference(losses, reference)))
    return rows


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    rows = check(_CONFIG.value, _MESHES.value, _STEPS.value)
    for row in rows:
        print(json.dumps(row), flush=True)
    worst = max(row["max_rel_diff"] for row in rows)
    print(json.dumps({"max_rel_diff": worst, "rtol": _RTOL.value, "ok": worst <= _RTOL.value}))
    sys.exit(0 if worst <= _RTOL.value else 1)


if __name__ == "__main__":
    app.run(main, flags_parser=config_args.parse_flags)  # overrides type-checked first
