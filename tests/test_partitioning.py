"""Every parameter carries logical axis names from the one vocabulary, and the default rules
leave everything replicated on one device."""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import random_variables, tiny_config
from mtower_jax.models import build_model, example_inputs
from mtower_jax.models.partitioning import DEFAULT_RULES, LOGICAL_AXES, PARAM_AXES

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
