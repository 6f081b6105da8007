"""Shared fixtures. Tests run on the CPU; compiled-model fixtures are module-scoped so each
distinct model compiles once per file."""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import ml_collections  # noqa: E402
import pytest  # noqa: E402

from mtower_jax.models import model_config  # noqa: E402

# XLA:CPU's cheapest codegen, for subprocess runs that compile much and step little.
FAST_COMPILE_XLA_FLAGS = ("--xla_llvm_disable_expensive_passes=true "
                          "--xla_backend_optimization_level=0")


def tiny_config(tower: str = "manager", /, **overrides) -> ml_collections.ConfigDict:
    """The tiny model config with dotted-key overrides: tiny_config(**{'manager.type': 'SAUE'})."""
    cfg = model_config("tiny", tower)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = cfg
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return cfg


@pytest.fixture
def tiny():
    return tiny_config


def random_variables(cfg: ml_collections.ConfigDict, seed: int = 0, batch_size: int = 2) -> dict:
    """Random parameters of the model's exact tree, made with NumPy from `jax.eval_shape` (a
    jitted init costs seconds of XLA:CPU compile for its RNG ops). LayerNorm scales sit around
    1, temperatures at 1, everything else ~ N(0, 0.05): far enough from init to catch mix-ups."""
    import flax.linen as nn
    import jax
    import numpy as np

    from mtower_jax.models import build_model, example_inputs

    model = build_model(cfg)
    shapes = jax.eval_shape(lambda r: model.init(r, **example_inputs(cfg, batch_size)),
                            jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)

    def make(path, leaf):
        name = path[-1].key
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if name == "temperature":
            return np.ones(leaf.shape, np.float32)
        if name == "scale":
            return 1.0 + 0.1 * noise
        return 0.05 * noise

    return {"params": jax.tree_util.tree_map_with_path(make, nn.unbox(shapes["params"]))}
