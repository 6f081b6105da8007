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

`layers` is the leading dim of model.scan_layers' stacked encoder parameters ([num_layers,
embed, ...]: the scan takes one layer's slice per step) and the rows of the managers' layer
embeddings. Every preset maps it to no mesh axis, so a stacked parameter is split exactly as
one layer's is (its other dims keep their rules) and each device holds every layer's shard.

`config.logical_axis_rules` names a preset (or, in a config file, gives the pairs):

  data         pure data parallelism: the batch is split over (data, fsdp), every parameter
               is replicated (the default; on one device it leaves everything replicated)
  fsdp         + ZeRO-3: every parameter with an `embed` (else `mlp`) dim is split over `fsdp`,
               and with it its AdamW moments; XLA all-gathers weights before use and
               reduce-scatters gradients
  tensor       Megatron-style: attention heads and MLP / transform widths over `tensor`
               (the activations' act_heads / act_mlp too), parameters otherwise replicated
  fsdp_tensor  both

Flax resolves a parameter's dims in rule order and uses each mesh axis once per array, so
a [embed, mlp] kernel under fsdp_tensor becomes P('fsdp', 'tensor') and its [mlp] bias
P('tensor'). Rules for a mesh axis of size 1 change nothing, so a preset works on any mesh.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

PARAM_AXES = ("embed", "mlp", "heads", "kv", "vocab", "pos", "types", "layers", "experts",
              "patch", "classes")
ACTIVATION_AXES = ("act_batch", "act_len", "act_embed", "act_heads", "act_kv", "act_mlp")
LOGICAL_AXES = PARAM_AXES + ACTIVATION_AXES

MESH_AXES = ("data", "fsdp", "tensor")
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def _complete(rules: Rules) -> Rules:
    """`rules`, then (name, None) for every logical axis they leave out (replicated)."""
    named = {name for name, _ in rules}
    return tuple(rules) + tuple((name, None) for name in LOGICAL_AXES if name not in named)


_BATCH = (("act_batch", ("data", "fsdp")),)
_FSDP = (("embed", "fsdp"), ("mlp", "fsdp"))  # mlp: biases and [mlp] LayerNorm-free params
_TENSOR = (("heads", "tensor"), ("mlp", "tensor"), ("act_heads", "tensor"),
           ("act_mlp", "tensor"))

# (logical name, mesh axes or None), first match per dim. Presets for config.logical_axis_rules;
# the names a preset leaves out (`layers`, `vocab`, ...) are replicated (_complete).
RULE_PRESETS: dict[str, Rules] = {
    "data": _complete(_BATCH),
    "fsdp": _complete(_BATCH + _FSDP),
    "tensor": _complete(_BATCH + _TENSOR),
    # tensor first: a [embed, mlp] kernel takes mlp -> tensor, then embed -> fsdp.
    "fsdp_tensor": _complete(_BATCH + _TENSOR + _FSDP),
}
DEFAULT_RULES: Rules = RULE_PRESETS["data"]


def resolve_rules(spec: str | Sequence[Sequence]) -> Rules:
    """config.logical_axis_rules -> rules: a preset name, or explicit (logical, mesh axes)
    pairs (completed with replication for the names they leave out)."""
    if isinstance(spec, str):
        if spec not in RULE_PRESETS:
            raise ValueError(f"config.logical_axis_rules={spec!r} is not a preset; choose from "
                             f"{tuple(RULE_PRESETS)} or give (logical, mesh axes) pairs")
        return RULE_PRESETS[spec]
    rules, errors = [], []
    for pair in spec:
        name, axes = tuple(pair)
        mesh_axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        if name not in LOGICAL_AXES:
            errors.append(f"{name!r} is not a logical axis (vocabulary: {LOGICAL_AXES})")
        errors += [f"{name!r} -> {a!r}: not a mesh axis {MESH_AXES}"
                   for a in mesh_axes if a not in MESH_AXES]
        rules.append((name, axes if axes is None or isinstance(axes, str) else tuple(axes)))
    if errors:
        raise ValueError("config.logical_axis_rules:\n  " + "\n  ".join(errors))
    return _complete(tuple(rules))


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
