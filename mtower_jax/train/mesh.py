"""The device mesh from `config.mesh`, and what the rules make of the train state on it.

    config.mesh = {data, fsdp, tensor: sizes within a slice / node (-1 = the rest),
                   dcn_data, dcn_fsdp, dcn_tensor: sizes across slices / nodes}

The mesh has the axes (data, fsdp, tensor); each axis is `dcn_<axis> x <axis>` long. With
every dcn size 1 it is `jax.make_mesh` (devices ordered for the fastest interconnect);
otherwise `mesh_utils.create_hybrid_device_mesh` keeps the inner sizes inside a TPU slice
(or, on GPUs and CPUs, inside a process) and puts only the dcn factor across the slow
network: put data parallelism there (dcn_data), it only all-reduces gradients once a step.

Axis types are Auto: `jax.make_mesh` now defaults to Explicit, under which Flax's logical
constraints (`with_logical_constraint`) do not apply.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils

from mtower_jax.models.partitioning import MESH_AXES

_AUTO = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
# Parameters may stay replicated under FSDP up to this fraction of the parameter bytes
# (LayerNorm-free scalars, manager weights, small biases); more means a rule is missing.
REPLICATED_TOLERANCE = 0.01


def mesh_config(**sizes: int) -> ml_collections.ConfigDict:
    """The `config.mesh` block: pure data parallelism over every device unless overridden."""
    defaults = dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
    unknown = set(sizes) - set(defaults)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; axes: {sorted(defaults)}")
    return ml_collections.ConfigDict({**defaults, **sizes})


def _resolve(shape: list[int], num_devices: int, what: str) -> tuple[int, ...]:
    """Resolves one -1 entry so the product is `num_devices`; clear errors otherwise."""
    unknown = [i for i, s in enumerate(shape) if s == -1]
    if len(unknown) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"{what}: sizes must be positive, at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(f"{what}: {num_devices} devices are not divisible by the fixed "
                             f"axes' product {known}")
        shape[unknown[0]] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(f"{what} needs {math.prod(shape)} devices, {num_devices} are "
                         "available")
    return tuple(shape)


def mesh_shape(sizes: ml_collections.ConfigDict, num_devices: int
               ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(per-slice shape, dcn shape) over MESH_AXES for `num_devices` devices in all."""
    what = f"config.mesh={dict(sizes)}"
    dcn = tuple(int(sizes.get(f"dcn_{axis}", 1)) for axis in MESH_AXES)
    if any(s < 1 for s in dcn):
        raise ValueError(f"{what}: dcn sizes must be positive")
    slices = math.prod(dcn)
    if num_devices % slices:
        raise ValueError(f"{what}: {num_devices} devices do not split into {slices} slices / "
                         "nodes (the product of the dcn_* sizes)")
    inner = _resolve([int(sizes[axis]) for axis in MESH_AXES], num_devices // slices, what)
    return inner, dcn


def make_mesh(sizes: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    inner, dcn = mesh_shape(sizes, len(devices))
    if math.prod(dcn) == 1:
        return jax.make_mesh(inner, MESH_AXES, axis_types=_AUTO, devices=devices)
    # TPU devices know their slice; elsewhere a process (one node) is the unit.
    grid = mesh_utils.create_hybrid_device_mesh(
        inner, dcn, devices, process_is_granule=devices[0].platform != "tpu")
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=_AUTO)


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """Leading (batch) dimension split over data x fsdp, the rest replicated."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))


def batch_shards(sizes: Mapping[str, int]) -> int:
    """How many ways `batch_sharding` splits the batch on a mesh of these axis sizes
    (`mesh.shape`): data x fsdp."""
    return math.prod(sizes.get(axis, 1) for axis in ("data", "fsdp"))


def global_batch(local: dict, mesh: jax.sharding.Mesh) -> dict:
    """Host-local numpy batch -> global jax.Arrays sharded along the batch."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


def check_divisible(abstract: dict) -> None:
    """Every sharded dim divides evenly over its mesh axes (else one error listing them)."""
    errors = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
        spec, mesh = leaf.sharding.spec, leaf.sharding.mesh
        for dim, axes in zip(leaf.shape, spec):
            names = () if axes is None else (axes,) if isinstance(axes, str) else axes
            ways = math.prod(mesh.shape[a] for a in names)
            if dim % ways:
                errors.append(f"{jax.tree_util.keystr(path)} {leaf.shape} {spec}: {dim} is not "
                              f"divisible by {ways}")
    if errors:
        raise ValueError("these dims do not split evenly over the mesh; change config.mesh or "
                         "config.logical_axis_rules:\n  " + "\n  ".join(errors))


def replicated_parameters(abstract_params: dict) -> tuple[float, list[str]]:
    """(fraction of parameter bytes every device holds whole, their names, largest first)."""
    total, replicated, names = 0, 0, []
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
        size = leaf.size * leaf.dtype.itemsize
        total += size
        if leaf.sharding.is_fully_replicated:
            replicated += size
            names.append((size, jax.tree_util.keystr(path)))
    return replicated / max(total, 1), [name for _, name in sorted(names, reverse=True)]


def report_replicated(abstract_params: dict, mesh: jax.sharding.Mesh,
                      tolerance: float = REPLICATED_TOLERANCE) -> str | None:
    """A warning when `fsdp` > 1 but more than `tolerance` of the parameter bytes stay
    replicated (a rule that does not name a dim, or the 'data' preset); else None."""
    if mesh.shape["fsdp"] == 1:
        return None
    fraction, names = replicated_parameters(abstract_params)
    if fraction <= tolerance:
        return None
    return (f"mesh fsdp={mesh.shape['fsdp']} but {fraction:.1%} of the parameter bytes stay "
            f"replicated on every device (tolerance {tolerance:.0%}); largest: "
            f"{', '.join(names[:5])}. Use config.logical_axis_rules='fsdp' (or 'fsdp_tensor')")
