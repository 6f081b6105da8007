"""tools/aot.py: the train step compiled by libtpu for a TPU topology on this CPU machine.

One compile (~30 s): the tiny model cut to one layer per stack, FSDP over a v5e:2x2 (4 chips).
"""
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.experimental.layout import Format

from configs.pretrain import get_config
from mtower_jax.tools import aot
from mtower_jax.train import flops

# One layer per stack keeps the TPU compile short; the program keeps its structure.
SMALL = [f"model.{part}.num_layers=1" for part in ("text", "vision", "cross", "manager")]
FSDP = ["mesh.data=1", "mesh.fsdp=4", "logical_axis_rules=fsdp", "batch_size=8"]


def tiny_config(overrides: list[str]):
    config = get_config("model=tiny")
    config.unlock()
    for item in overrides:
        key, value = item.split("=")
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = type(node[leaf])(value)
    return config


@pytest.fixture(scope="module")
def compiled():
    config = tiny_config(SMALL + FSDP)
    result = aot.compile_train_step(config, aot.compile_devices("v5e:2x2"))
    return config, result, aot.report(config, "v5e:2x2", 1, result)


def test_accelerator_types_name_libtpu_topologies():
    assert aot.topology_name("v5p-64") == "v5p:2x4x4"  # 64 TensorCores = 32 chips
    assert aot.topology_name("v5e-256") == "v5e:16x16"
    assert aot.topology_name("v5litepod-4") == "v5e:2x2"
    assert aot.topology_name("v6e:4x4") == "v6e:4x4"
    assert len(aot.compile_devices("v5p-64")) == 32
    assert len(aot.compile_devices("v5e:2x2", num_slices=2)) == 8
    with pytest.raises(ValueError, match="unknown topology"):
        aot.topology_name("v5p-63")


def _padded_bytes(leaf: jax.ShapeDtypeStruct, layout) -> int:
    """Bytes of one device's shard of `leaf` in its TPU layout: the minor dims are padded up
    to the layout's tile (e.g. (8, 128)); a shape of lower rank than the tile counts as
    having leading 1s."""
    dims = [leaf.sharding.shard_shape(leaf.shape)[d] for d in reversed(layout.major_to_minor)]
    tile = list(reversed(layout.tiling[0])) if layout.tiling else []
    dims += [1] * (len(tile) - len(dims))
    dims = [-(-d // t) * t for d, t in zip(dims, tile)] + dims[len(tile):]
    return math.prod(dims) * np.dtype(leaf.dtype).itemsize


def test_argument_bytes_are_the_sharded_state_and_batch(compiled):
    _, result, report = compiled
    args = jax.tree.leaves((result.abstract_state, result.batch, result.rng))
    formats = jax.tree.leaves(result.compiled.input_formats[0],
                              is_leaf=lambda x: isinstance(x, Format))
    assert len(formats) == len(args)
    kept = [(leaf, f.layout) for leaf, f in zip(args, formats) if f.layout is not None]
    # Only batch features the step does not read are dropped; the whole state is an argument.
    assert len(kept) >= len(args) - len(result.batch)
    assert report["argument_bytes"] == sum(_padded_bytes(leaf, layout) for leaf, layout in kept)
    # FSDP: each device holds a quarter of the parameters (LayerNorm-free scalars aside).
    full = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(result.abstract_state["params"]))
    assert full / 4 <= report["params_bytes"] < 1.05 * full / 4
    assert report["opt_state_bytes"] == pytest.approx(2 * report["params_bytes"], rel=1e-3)


def test_fsdp_gathers_weights_and_reduces_gradients(compiled):
    collectives = compiled[2]["collectives"]
    assert collectives["all-gather"] > 0
    assert collectives["reduce-scatter"] + collectives["all-reduce"] > 0


def test_report_adds_up(compiled):
    config, _, r = compiled
    assert r["devices"] == 4 and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert r["per_device_batch"] == 2 and r["fits"] and r["hbm_bytes"] == 16 * 2 ** 30
    assert r["total_bytes"] == (r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"]
                                + r["temp_bytes"] + r["generated_code_bytes"])
    assert r["alias_bytes"] > 0 and r["peak_bytes"] > 0  # alias: the donated state
    assert r["analytic_flops_per_step"] == flops.train_step_flops(config)
    assert r["xla_flops_per_device"] > r["analytic_flops_per_device"] > 0  # XLA counts more
    assert r["total_hours_at_50pct_mfu"] * 3600 == pytest.approx(
        r["analytic_flops_per_step"] * config.total_steps / (4 * 197e12 * 0.5))


def test_a_program_over_the_hbm_exits_2_with_what_to_change(tmp_path):
    overrides = [f"--config.{item}" for item in SMALL + FSDP] + ["--config.batch_size=1048576"]
    run = subprocess.run(
        [sys.executable, "-m", "mtower_jax.tools.aot", "--config=configs/pretrain.py:model=tiny",
         "--topology=v5e-4", *overrides], capture_output=True, text=True, timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 2, run.stderr[-3000:]
    assert "RESOURCE_EXHAUSTED" in run.stderr and "exceeds available HBM" in run.stderr
    assert "--config.model.remat=True" in run.stderr and "Traceback" not in run.stderr
    assert "--config.data.itm_negatives=shard" in run.stderr  # batch negatives, 4 shards
