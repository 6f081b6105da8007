"""The train state, built abstract-first (MaxText's pattern, DESIGN.md section 6).

    state = {"step": int32 (), "params": ..., "opt_state": ..., "rng": uint32 [2]}

    abstract  = jax.eval_shape(init)                   shapes + logical axis names, no memory
    shardings = logical_to_mesh_sharding(specs, mesh, rules)
    state     = jax.jit(init, out_shardings=shardings)()   each device makes only its shard

The same abstract tree (with shardings) is the Orbax restore target, so a checkpoint
restores onto whatever mesh the run has now.
"""
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mtower_jax.models import build_model, example_inputs
from mtower_jax.models.partitioning import DEFAULT_RULES
from mtower_jax.train.mesh import check_divisible
from mtower_jax.train.optimizer import make_optimizer


def _boxed_init(config: ml_collections.ConfigDict, model: nn.Module) -> Callable:
    """rng -> boxed params (carrying logical axis names)."""
    inputs = example_inputs(config.model, 1)

    def init(rng: jax.Array):
        params_rng, dropout_rng = jax.random.split(rng)
        return model.init({"params": params_rng, "dropout": dropout_rng}, **inputs)["params"]
    return init


def create_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                       rules=DEFAULT_RULES) -> tuple:
    """Returns (model, tx, abstract_state, init) without allocating anything.

    abstract_state: ShapeDtypeStructs carrying this mesh's shardings (the Orbax restore
    target). init(params=None) -> the sharded state; `params` (unboxed arrays, e.g. from
    `init_from` or tests) replaces the random initialisation.
    """
    model = build_model(config.model)
    init_params = _boxed_init(config, model)
    abstract_params = jax.eval_shape(init_params, jax.random.PRNGKey(0))
    tx = make_optimizer(config.optimizer, config.total_steps, abstract_params)  # structure only

    def init_state(boxed_params) -> dict:
        return {"step": jnp.zeros((), jnp.int32), "params": boxed_params,
                "opt_state": tx.init(boxed_params),
                "rng": jax.random.PRNGKey(config.seed + 1)}

    abstract = jax.eval_shape(lambda: init_state(init_params(jax.random.PRNGKey(config.seed))))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)

    def init(params=None) -> dict:
        if params is None:
            make = lambda: nn.unbox(init_state(init_params(jax.random.PRNGKey(config.seed))))
            return jax.jit(make, out_shardings=shardings)()
        boxed = jax.tree.map(lambda box, value: box.replace_boxed(jnp.asarray(value)),
                             abstract_params, params,
                             is_leaf=lambda x: isinstance(x, nn.Partitioned))
        return jax.jit(lambda p: nn.unbox(init_state(p)), out_shardings=shardings)(boxed)

    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, abstract,
                     is_leaf=lambda x: isinstance(x, nn.Partitioned)),
        shardings)  # (nn.unbox would apply sharding constraints, outside jit)
    check_divisible(abstract_state)
    return model, tx, abstract_state, init
