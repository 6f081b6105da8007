"""The device mesh from `config.mesh` (axis sizes; -1 = the remaining devices).

Axes: data (batch), fsdp (batch + parameter/optimizer shards), tensor (heads / MLP). Axis
types are Auto: `jax.make_mesh` now defaults to Explicit, under which Flax's logical
constraints (`with_logical_constraint`) do not apply.
"""
import math

import jax
import ml_collections
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(sizes: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Resolves one -1 entry so the product is `num_devices`; clear errors otherwise."""
    shape = [int(sizes[axis]) for axis in MESH_AXES]
    unknown = [i for i, s in enumerate(shape) if s == -1]
    if len(unknown) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"config.mesh={dict(sizes)}: sizes must be positive, at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(f"config.mesh={dict(sizes)}: {num_devices} devices are not "
                             f"divisible by the fixed axes' product {known}")
        shape[unknown[0]] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(f"config.mesh={dict(sizes)} needs {math.prod(shape)} devices, "
                         f"{num_devices} are available")
    return tuple(shape)


def make_mesh(sizes: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(sizes, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """Leading (batch) dimension split over data x fsdp, the rest replicated."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))


def global_batch(local: dict, mesh: jax.sharding.Mesh) -> dict:
    """Host-local numpy batch -> global jax.Arrays sharded along the batch."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}
