"""The uni-modal encoders' identical layers: run as one `nn.scan`, and their two parameter layouts.

`model.scan_layers` picks how TextEncoder and VisionEncoder run their `num_layers` layers:

    False  unrolled  .../{text,vision}_encoder/layer_{i}/...  one module per layer (a Python loop)
    True   stacked   .../{text,vision}_encoder/layers/...     one module, every parameter with a
                                                             leading [num_layers] dim (logical
                                                             axis 'layers', never sharded)

The stacked layout is the unrolled one with layer i at index i of axis 0, so the two convert
exactly both ways: `stack_layers` / `unstack_layers` find the encoder subtrees by name
(ENCODERS) anywhere in a params tree and leave everything else as it is. The checkpoint
importers write the unrolled layout and stack it when the config says `scan_layers`
(`for_config`); the exporters unstack first; `init_from` converts a source to the model's
layout (`match_layout`). The cross-modal layers are never scanned (every cross-modal layer has
its own manager / bridge inputs), so their names never change.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

ENCODERS = ("text_encoder", "vision_encoder")
STACKED = "layers"  # the scanned module's name, and the logical axis of its leading dim
_LAYER = re.compile(r"layer_(\d+)")


# ---- running the layers -----------------------------------------------------------------------
@functools.cache
def scanned(layer: type[nn.Module], num_layers: int, num_args: int, remat: bool) -> type:
    """`layer` ((x, *args) -> x, its last argument the Python `train` flag) as one nn.scan
    over `num_layers` copies: called as (x, *args) -> (x_top, ys [num_layers, *x.shape]),
    `args` broadcast to every layer. Each layer gets its own parameters (stacked on axis 0,
    logical axis 'layers') and its own dropout stream; with `remat` the body is rematerialised
    (remat inside scan: one layer's activations are recomputed at a time)."""

    class Body(layer):
        def __call__(self, x, *args):
            y = super().__call__(x, *args)
            return y, y

    Body.__name__ = Body.__qualname__ = f"Scanned{layer.__name__}"
    # Positional indices count `self` as 0: x is 1, and `train`, the last argument, 1 + num_args.
    # prevent_cse=False: inside a scan the loop already keeps XLA from merging the recompute
    # into the forward (jax.checkpoint's documented setting for scan bodies).
    body = nn.remat(Body, static_argnums=(1 + num_args,), prevent_cse=False) if remat else Body
    return nn.scan(body, variable_axes={"params": 0},
                   split_rngs={"params": True, "dropout": True},
                   in_axes=(nn.broadcast,) * num_args, length=num_layers,
                   metadata_params={nn.PARTITION_NAME: STACKED})


def layer_outputs(ys: jax.Array) -> tuple[jax.Array, ...]:
    """The scan's stacked outputs [num_layers, ...] as the unrolled loop's tuple of layers."""
    return tuple(ys[i] for i in range(ys.shape[0]))


# ---- converting parameter trees ---------------------------------------------------------------
def _xp(leaves) -> Any:
    """numpy for host arrays (exact, no device), jax.numpy otherwise."""
    return np if all(isinstance(x, np.ndarray | np.generic) for x in leaves) else jnp


def _stack_encoder(tree: Mapping, where: str) -> dict:
    layers = {int(m.group(1)): key for key in tree if (m := _LAYER.fullmatch(key))}
    if not layers:
        return dict(tree)
    if STACKED in tree:
        raise ValueError(f"{where} holds both {STACKED}/ and layer_<i>/ parameters")
    if sorted(layers) != list(range(len(layers))):
        raise ValueError(f"{where}: layers {sorted(layers)} are not "
                         f"layer_0..layer_{len(layers) - 1}")
    parts = [tree[layers[i]] for i in range(len(layers))]
    xp = _xp(jax.tree.leaves(parts))
    out = {k: v for k, v in tree.items() if k not in layers.values()}
    out[STACKED] = jax.tree.map(lambda *xs: xp.stack(xs), *parts)
    return out


def _unstack_encoder(tree: Mapping, where: str) -> dict:
    if STACKED not in tree:
        return dict(tree)
    if any(_LAYER.fullmatch(key) for key in tree):
        raise ValueError(f"{where} holds both {STACKED}/ and layer_<i>/ parameters")
    stacked = tree[STACKED]
    depths = {np.shape(x)[0] for x in jax.tree.leaves(stacked)}
    if len(depths) != 1:
        raise ValueError(f"{where}/{STACKED}: leading dims {sorted(depths)} differ")
    out = {k: v for k, v in tree.items() if k != STACKED}
    for i in range(depths.pop()):
        out[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out


def _map_encoders(params: Mapping, fn, like: Mapping | None = None, where: str = "") -> dict:
    """`params` with every encoder subtree replaced by fn(subtree, its path, its twin in
    `like` or None); everything else is kept as it is."""
    out = {}
    for key, value in params.items():
        path = f"{where}/{key}" if where else key
        twin = like.get(key) if isinstance(like, Mapping) else None
        if not isinstance(value, Mapping):
            out[key] = value
        elif key in ENCODERS:
            out[key] = fn(value, path, twin)
        else:
            out[key] = _map_encoders(value, fn, twin, path)
    return out


def stack_layers(params: Mapping) -> dict:
    """Unrolled -> stacked: every encoder's layer_{i}/... become layers/... [num_layers, ...].
    A tree already stacked (or without encoder layers) comes back as it is."""
    return _map_encoders(params, lambda tree, where, _: _stack_encoder(tree, where))


def unstack_layers(params: Mapping) -> dict:
    """Stacked -> unrolled, the inverse of stack_layers (an unrolled tree comes back as is)."""
    return _map_encoders(params, lambda tree, where, _: _unstack_encoder(tree, where))


def is_stacked(params: Mapping) -> bool:
    """Whether any encoder in `params` holds stacked (scanned) layers."""
    found = []
    _map_encoders(params, lambda tree, where, _: found.append(STACKED in tree) or tree)
    return any(found)


def for_config(params: Mapping, model_cfg: ml_collections.ConfigDict) -> dict:
    """`params` (either layout) in the layout `model_cfg` builds (its scan_layers)."""
    scan = bool(model_cfg.get("scan_layers", False))
    return stack_layers(params) if scan else unstack_layers(params)


def unrolled(model_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `model_cfg` with scan_layers=False: the layout the checkpoint key maps use."""
    cfg = model_cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.scan_layers = False
    return cfg


def match_layout(source: Mapping, like: Mapping) -> tuple[dict, list[str]]:
    """(`source` with each encoder in the layout of its twin in `like`, what was converted):
    init_from's source vs the model's fresh params."""
    notes = []

    def convert(tree: Mapping, where: str, twin: Mapping | None) -> dict:
        if not isinstance(twin, Mapping) or (STACKED in tree) == (STACKED in twin):
            return dict(tree)
        if STACKED in twin and any(_LAYER.fullmatch(k) for k in tree):
            notes.append(f"{where}: layer_<i>/ stacked into {STACKED}/ (model.scan_layers=True)")
            return _stack_encoder(tree, where)
        if STACKED in tree and any(_LAYER.fullmatch(k) for k in twin):
            notes.append(f"{where}: {STACKED}/ unstacked into layer_<i>/ "
                         "(model.scan_layers=False)")
            return _unstack_encoder(tree, where)
        return dict(tree)

    return _map_encoders(source, convert, like), notes
