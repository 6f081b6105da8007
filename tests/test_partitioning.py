"""Every parameter carries logical axis names from the one vocabulary, the default rules
leave everything replicated on one device, the presets map names as documented, and the mesh
sizes resolve (or fail) clearly; under the fsdp rules the encoders' activations stay split
along the batch."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import random_variables, tiny_config
from mtower_jax.models import build_model, example_inputs
from mtower_jax.models.partitioning import (DEFAULT_RULES, LOGICAL_AXES, PARAM_AXES,
                                           resolve_rules)
from mtower_jax.train import mesh as mesh_lib

ALL_HEADS = ("mlm", "itm", "itc", "vqa", "snli_ve", "nlvr2")

CONFIGS = {
    "manager-AAUE": tiny_config("manager", heads=ALL_HEADS, num_token_types=3),
    "manager-SAUE-scalar": tiny_config("manager", **{"manager.type": "SAUE",
                                                     "manager.weight_type": "scalar"}),
    "bridge-scaled_add": tiny_config("bridge", **{"bridge.type": "scaled_add"}),
    "bridge-interpolate": tiny_config("bridge", **{"bridge.type": "interpolate"}),
    "meter": tiny_config("meter"),
}


def boxed_params(cfg):
    model = build_model(cfg)
    return jax.eval_shape(lambda r: model.init(r, **example_inputs(cfg)),
                          jax.random.PRNGKey(0))["params"]


def abstract_params(cfg, mesh, rules) -> dict:
    """The params as ShapeDtypeStructs sharded on `mesh` by their logical names and `rules`."""
    boxed = boxed_params(cfg)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nn.unbox(boxed), shardings)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_parameter_has_logical_names(name):
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed_params(CONFIGS[name]), is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert len(leaves) > 50
    problems = []
    for path, leaf in leaves:
        where = jax.tree_util.keystr(path)
        if not isinstance(leaf, nn.LogicallyPartitioned):
            problems.append(f"{where}: no logical names")
            continue
        names, shape = leaf.names, leaf.value.shape
        if len(names) != len(shape):
            problems.append(f"{where}: names {names} for shape {shape}")
        for axis_name, size in zip(names, shape):
            if axis_name is None and size != 1:
                problems.append(f"{where}: unnamed dim of size {size}")
            elif axis_name is not None and axis_name not in PARAM_AXES:
                problems.append(f"{where}: {axis_name!r} is not in the vocabulary")
        if len(set(n for n in names if n)) != len([n for n in names if n]):
            problems.append(f"{where}: repeats a name in {names}")
    assert not problems, "\n".join(problems)


def test_default_rules_replicate_on_one_device():
    cfg = CONFIGS["manager-AAUE"]
    specs = nn.get_partition_spec(boxed_params(cfg))
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, DEFAULT_RULES)
    for sharding in jax.tree.leaves(shardings):
        assert sharding.is_fully_replicated
        assert all(axis is None for axis in sharding.spec)
    assert {name for name, _ in DEFAULT_RULES} == set(LOGICAL_AXES)
    assert dict(DEFAULT_RULES)["act_batch"] == ("data", "fsdp")
    assert all(dict(DEFAULT_RULES)[name] is None for name in PARAM_AXES)

    # The activation constraints resolve under the mesh and rules inside jit, and change nothing.
    model = build_model(cfg)
    variables = random_variables(cfg)
    inputs = example_inputs(cfg)
    plain = jax.jit(lambda v: model.apply(v, **inputs)["cls_feats_pair"])(variables)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        lowered = jax.jit(lambda v: model.apply(v, **inputs)["cls_feats_pair"]).lower(variables)
        assert lowered.as_text().count("sharding_constraint") >= 20
        constrained = lowered.compile()(variables)
    np.testing.assert_allclose(plain, constrained, rtol=1e-6)


@pytest.mark.parametrize("preset, names, spec", [
    ("fsdp", ("embed", "mlp"), ("fsdp", None)),
    ("fsdp", ("mlp", "embed"), (None, "fsdp")),
    ("fsdp", ("mlp",), ("fsdp",)),
    ("fsdp", ("vocab",), (None,)),  # 50,265 rows do not split: the decoder bias stays whole
    ("tensor", ("embed", "heads", "kv"), (None, "tensor", None)),
    ("tensor", ("mlp", "embed"), ("tensor", None)),
    ("fsdp_tensor", ("embed", "mlp"), ("fsdp", "tensor")),
    ("fsdp_tensor", ("heads", "kv", "embed"), ("tensor", None, "fsdp")),
    ("fsdp_tensor", ("mlp",), ("tensor",)),
    ("data", ("embed", "mlp"), (None, None)),
    ("fsdp_tensor", ("act_batch", "act_len", "act_mlp"), (("data", "fsdp"), None, "tensor")),
])
def test_presets_map_logical_names_to_mesh_axes(preset, names, spec):
    rules = resolve_rules(preset)
    assert {name for name, _ in rules} == set(LOGICAL_AXES)
    assert tuple(nn.logical_to_mesh_axes(names, rules)) == spec


def test_explicit_rules_are_completed_and_checked():
    rules = resolve_rules([("embed", "fsdp"), ("act_batch", ["data", "fsdp"])])
    assert rules[:2] == (("embed", "fsdp"), ("act_batch", ("data", "fsdp")))
    assert dict(rules)["mlp"] is None and {n for n, _ in rules} == set(LOGICAL_AXES)
    with pytest.raises(ValueError, match="'fsdb'") as e:
        resolve_rules([("embedd", "fsdp"), ("mlp", "fsdb")])
    assert "'embedd' is not a logical axis" in str(e.value)
    with pytest.raises(ValueError, match="not a preset; choose from"):
        resolve_rules("zero3")


def test_mesh_shapes_with_dcn_and_clear_errors():
    sizes = mesh_lib.mesh_config(data=-1, fsdp=4, dcn_data=2)
    assert mesh_lib.mesh_shape(sizes, 16) == ((2, 4, 1), (2, 1, 1))
    assert mesh_lib.mesh_shape(mesh_lib.mesh_config(), 8) == ((8, 1, 1), (1, 1, 1))
    with pytest.raises(ValueError, match="12 devices do not split into 8 slices"):
        mesh_lib.mesh_shape(mesh_lib.mesh_config(dcn_data=8), 12)
    with pytest.raises(ValueError, match="needs 8 devices, 4 are available"):
        mesh_lib.mesh_shape(mesh_lib.mesh_config(data=2, fsdp=4), 4)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        mesh_lib.mesh_config(sequence=2)


def test_dims_that_do_not_divide_are_listed():
    """tensor=4 cannot split the tiny model's 2 heads: every such parameter is named."""
    mesh = jax.sharding.AbstractMesh((1, 1, 4), ("data", "fsdp", "tensor"),
                                     axis_types=(jax.sharding.AxisType.Auto,) * 3)
    abstract = abstract_params(CONFIGS["manager-AAUE"], mesh, resolve_rules("tensor"))
    with pytest.raises(ValueError, match="do not split evenly") as e:
        mesh_lib.check_divisible(abstract)
    assert "['attention']['query']['kernel']" in str(e.value)
    assert ": 2 is not divisible by 4" in str(e.value)


def test_encoders_keep_the_batch_split_under_fsdp():
    """Forward and backward of both encoders under the fsdp rules, compiled for 4 v5e chips
    (data 2 x fsdp 2, as tools/aot.py compiles): no all-gather brings the global batch of
    activations onto a device. Before ln_post's input and output were pinned, the image's
    top layers [N, B, 1+P, D] were gathered whole for that one LayerNorm, whose scale is
    split over fsdp (base on a v5e-256: 17.33 -> 9.90 GiB of temporaries per chip)."""
    from mtower_jax.tools import aot  # libtpu's compile-only devices

    cfg, batch, rules = tiny_config("manager", dtype="bfloat16"), 24, resolve_rules("fsdp")
    model = build_model(cfg)
    devices = np.array(aot.compile_devices("v5e:2x2")).reshape(2, 2, 1)
    mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"))
    params = abstract_params(cfg, mesh, rules)
    split = NamedSharding(mesh, P(("data", "fsdp")))
    text_len, size = cfg.text.max_position_embeddings - 2, cfg.vision.image_size
    ids = jax.ShapeDtypeStruct((batch, text_len), jnp.int32, sharding=split)
    pixels = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=split)

    def loss(params, ids, pixels):
        def encode(backbone):
            text = backbone.encode_text(ids, jnp.ones_like(ids), True)["outputs"]
            image = backbone.encode_image(pixels, True)["outputs"]
            return sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in (text, image))
        return model.apply({"params": params}, rngs={"dropout": jax.random.PRNGKey(0)},
                           method=lambda m: encode(m.backbone))

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        hlo = jax.jit(jax.grad(loss)).lower(params, ids, pixels).compile().as_text()
    gathered = [m.group(0) for m in re.finditer(r"= \w+\[([\d,]*)\]\S* all-gather\(", hlo)
                if str(batch) in m.group(1).split(",")]
    assert "all-gather" in hlo  # the fsdp weights are gathered; the activations are not
    assert not gathered, gathered


def test_layer_norm_gradient_keeps_a_split_batch_split():
    """layer_norm's written-out backward on [N, B, T, D] with B split over 4 CPU devices
    compiles with no all-gather. Its scale and bias gradients once summed over rows made by a
    reshape, and XLA cannot keep N x B split when N is not: it gathered the whole batch (seen
    on CPU devices, for ln_post on the stacked image layers; the TPU compiler kept it split)."""
    script = """
import re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from mtower_jax.models.layers import layer_norm
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
x = jax.ShapeDtypeStruct((3, 24, 17, 64), jnp.float32, sharding=NamedSharding(mesh, P(None, "batch")))
w = jax.ShapeDtypeStruct((64,), jnp.float32, sharding=NamedSharding(mesh, P()))
loss = lambda x, s, b: jnp.sum(layer_norm(x, s, b, 1e-5) ** 2)
hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, w, w).compile().as_text()
print(len(jax.devices()), len(re.findall(r"all-gather\\(", hlo)))
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.split() == ["4", "0"], out.stdout + out.stderr
