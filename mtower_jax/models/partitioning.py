"""The logical-axis vocabulary: every parameter and every block-boundary activation is named
with these axes, and rules in the config map them to mesh axes (`data`, `fsdp`, `tensor`).

Parameter axes
  embed    model width of a stream (D)          mlp      FFN inner width
  heads    attention heads                        kv       per-head width
  vocab    token vocabulary rows                  pos      position-embedding rows
  types    token-type rows                        layers   stacked layers / layer embeddings
  experts  uni-modal layers a manager aggregates  patch    flattened P*P*C patch pixels
  classes  head outputs (answers, labels, 2 for ITM, ITC width)
Activation axes
  act_batch, act_len, act_embed, act_heads, act_kv, act_mlp

The default rules below are pure data parallelism: only the batch is split, every parameter
is replicated. On one device they leave everything replicated, which is the single-device
behaviour; the scale-out presets (FSDP, tensor parallel) replace them.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

PARAM_AXES = ("embed", "mlp", "heads", "kv", "vocab", "pos", "types", "layers", "experts",
              "patch", "classes")
ACTIVATION_AXES = ("act_batch", "act_len", "act_embed", "act_heads", "act_kv", "act_mlp")
LOGICAL_AXES = PARAM_AXES + ACTIVATION_AXES

# (logical name, mesh axes or None). Names missing from the rules stay replicated.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("act_batch", ("data", "fsdp")),
) + tuple((name, None) for name in LOGICAL_AXES if name != "act_batch")


def logical(init: nn.initializers.Initializer,
            axes: Sequence[str | None]) -> nn.initializers.Initializer:
    """Wraps an initializer so the parameter it makes carries logical axis names (None marks a
    size-1 dim that is never sharded, e.g. the width of a scalar manager weight)."""
    unknown = [a for a in axes if a is not None and a not in PARAM_AXES]
    if unknown:
        raise ValueError(f"unknown logical parameter axes {unknown}; vocabulary: {PARAM_AXES}")
    return nn.with_logical_partitioning(init, tuple(axes))


def constrain(x: jax.Array, axes: Sequence[str]) -> jax.Array:
    """Sharding hint for an activation at a block boundary (a no-op outside a mesh)."""
    return nn.with_logical_constraint(x, tuple(axes))
