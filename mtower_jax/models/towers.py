"""The three towers differ only in what enters each cross-modal layer. Each class here is that
rule for one stream: `prepare` runs once on the uni-modal layers sent across, and
`__call__(l, ...)` builds the input of cross-modal layer l (0-based).

  meter:   input_1 = U_top,                         input_l = C_{l-1}
  bridge:  input_1 = LN(U_{top-L+1}),                input_l = Bridge(U_{top-L+l}, C_{l-1})
  manager: input_l = Manager_l(std(U_{top-N+1..top} + E_layer), C_{l-1}, C^other_{l-1})

U: uni-modal layer outputs after the shared transform and the token-type embedding, L the number
of cross-modal layers, N the number of managed layers, E_layer a learned per-layer embedding,
std the standardisation every manager's per-expert LayerNorms share (each manager applies
its own affine maps; managers.py).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mtower_jax.models.bridges import Bridge
from mtower_jax.models.layers import Dtype, Embed, LayerNorm, standardise
from mtower_jax.models.managers import make_manager

TOWERS = ("manager", "bridge", "meter")


def num_uni_modal_inputs(cfg: ml_collections.ConfigDict) -> int:
    """How many top uni-modal layers each stream sends to the cross-modal side."""
    return {"meter": 1, "bridge": cfg.cross.num_layers, "manager": cfg.manager.num_layers}[cfg.tower]


class _TowerInputs(nn.Module):
    """What enters each cross-modal layer of one stream. `prepare` takes the k uni-modal
    layers sent across, stacked [k, B, T, D] (one transform for all), and returns them as a
    tuple of k arrays [B, T, D]: each layer is then its own buffer, whose slices and gradient
    cost no copy (a stacked one is copied per slice where a reduction or a dot reads it, and
    its gradient is concatenated)."""
    cfg: ml_collections.FrozenConfigDict  # model
    uni_modal_depth: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def prepare(self, inputs: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(inputs)


class MeterInputs(_TowerInputs):
    def __call__(self, layer: int, inputs: jax.Array, previous, other_previous, train: bool):
        return (inputs[0] if layer == 0 else previous), None


class BridgeInputs(_TowerInputs):
    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.first_norm = LayerNorm(self.cfg.bridge.layer_norm_eps, **kw)
        self.bridges = [Bridge(self.cfg.bridge.type, self.cfg.bridge.layer_norm_eps, **kw)
                        for _ in range(self.cfg.cross.num_layers - 1)]

    def __call__(self, layer: int, inputs: tuple[jax.Array, ...], previous, other_previous,
                 train: bool):
        """inputs: L arrays [B, T, D] -> ([B, T, D], None)."""
        if layer == 0:
            return self.first_norm(inputs[0]), None
        return self.bridges[layer - 1](inputs[layer], previous), None


class ManagerInputs(_TowerInputs):
    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # One row per uni-modal layer (the reference keeps all of them; the top N are used).
        self.layer_embeddings = Embed(self.uni_modal_depth, self.cfg.cross.hidden_size, "layers",
                                      **kw)
        self.managers = [make_manager(self.cfg.manager, i, **kw)
                         for i in range(self.cfg.cross.num_layers)]

    def prepare(self, inputs: jax.Array) -> tuple[jax.Array, ...]:
        """inputs [N, B, T, D] + the embeddings of uni-modal layers depth-N+1..depth,
        standardised expert by expert (what every manager's expert LayerNorms compute before
        their affine maps: once here, not once per manager and fusion) -> N arrays [B, T, D].
        Expert by expert: XLA:CPU runs an [N, ..., D] norm's backward as one slow fusion."""
        rows = self.layer_embeddings.table()[self.uni_modal_depth - inputs.shape[0]:]
        return tuple(standardise(x + row, self.cfg.manager.layer_norm_eps).astype(self.dtype)
                     for x, row in zip(inputs, rows))

    def __call__(self, layer: int, inputs: tuple[jax.Array, ...], previous, other_previous,
                 train: bool):
        """inputs: N arrays [B, T, D] -> ([B, T, D], expert weights [B, T, N])."""
        return self.managers[layer](inputs, previous, other_previous, train)


TOWER_INPUTS = {"meter": MeterInputs, "bridge": BridgeInputs, "manager": ManagerInputs}
