"""Managers: aggregate the top N uni-modal layers ("experts") into the input of a cross-modal layer.

For cross-modal layer l of one stream, with experts X_1..X_N [B, L, D] (uni-modal layers after
transform + token type + layer embedding) and C = C_{l-1} the stream's previous cross-modal output:

  SAUE (static):    s_n learned per expert ([D] for `vector`, scalar for `scalar`), init 1/N
      alpha = softmax_n((s_n + eps_n) / tau)                eps ~ N(0, 1/N^2) per element, train only
                                                            (sampling.standard_normal / N)
      out   = sum_n alpha_n * LN_n(X_n)  [+ w_c * LN_c(C)  for l >= 2; w_c init 1, outside the softmax]

  AAUE (adaptive, l >= 2; layer 1 is always SAUE since there is no C_0):
      c = LN_c(C),  q = LN_q(C_other)                       C_other: the other stream's C_{l-1}
      a = softmax((c W_q + b_q)(q W_k + b_k)^T / sqrt(D)) q  single head, no value projection, no mask
                                     (computed as c (W_q W_k^T) q^T + (b_q W_k^T) q^T)
      s = [a ; c] W + b = a W_a + c W_c + b                 [B, L, N]: per-token expert logits
      out = sum_n softmax_n((s_n + eps_n) / tau) * LN_n(X_n) + w_c * c

tau is a learnable temperature (init `manager.temperature`, frozen unless `learn_temperature`).
LN_n(X_n) = x_hat_n * scale_n + bias_n: the managers take the experts standardised (x_hat,
layers.standardise), once per stream for all of them (towers.ManagerInputs.prepare; for the
image, once per step for MLM and ITM), and apply their own `expert_norms` affine maps inside
the mix, which never materialises LN_n(X_n). The experts arrive as N separate arrays,
not stacked: slicing a stacked one copies the slice wherever a reduction reads it, and its
gradient is concatenated.
Each manager returns its output [B, L, D] and its expert weights averaged over channels [B, L, N].
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mtower_jax.models import sampling
from mtower_jax.models.attention import probabilities
from mtower_jax.models.layers import (DenseWeights, Dtype, LayerNorm,
                                      StackedLayerNormWeights)
from mtower_jax.models.partitioning import logical

Experts = Sequence[jax.Array]  # N standardised experts [B, L, D], each its own buffer


def _softmax_weights(logits: jax.Array, n: int) -> list[jax.Array]:
    """softmax over the leading (expert) axis of logits [N, ...], as N elementwise terms:
    XLA:CPU runs a reduction over a leading axis ~4x slower than the same arithmetic
    spelled out (BENCHMARKS.md)."""
    top = functools.reduce(jnp.maximum, [logits[i] for i in range(n)])
    exps = [jnp.exp(logits[i] - top) for i in range(n)]
    inverse = 1.0 / functools.reduce(jnp.add, exps)  # one division per element, not N
    return [e * inverse for e in exps]


@jax.custom_vjp
def _softmax_mix(logits: jax.Array, tau: jax.Array, experts: Experts, scale: jax.Array,
                 bias: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sum_n alpha_n * (experts_n * scale_n + bias_n), alpha = softmax_n(logits / tau):
    experts N arrays [B, L, D] standardised (each expert's LayerNorm before its affine map,
    which is scale, bias [N, D] float32), logits float32 broadcastable to [N, B, L, D], tau a
    scalar -> ([B, L, D], the weights alpha averaged over their last dim
    [N, *logits.shape[1:-1]]); the experts' gradient is a tuple like them.
    The weights are a report: the backward ignores their cotangent, so a loss that reads
    them gets no gradient from them.

    The affine maps are applied here, not materialised per manager: every manager of a
    stream shares one standardisation of its experts (towers.ManagerInputs.prepare).
    Its gradient is written out, one elementwise pass per expert (autodiff took 3x longer,
    and its reduction for tau over the whole [N, B, L, D] logits was most of a manager's
    backward on XLA:CPU). With e_n = experts_n * scale_n + bias_n:
        d e_n = alpha_n g,   d experts_n = d e_n scale_n,   d scale_n = sum d e_n experts_n,
        d bias_n = sum d e_n   (sums over every row),
        d logits_n = alpha_n g (e_n - mix) / tau   (summed over the dims logits broadcast along),
        d tau = -(1/tau) sum g sum_n alpha_n log(alpha_n) (e_n - mix)
    (from d alpha_n / d tau = -alpha_n (u_n - sum_m alpha_m u_m) / tau with u_n = logits_n / tau,
    where u_n may be replaced by log alpha_n: they differ by a per-element constant, and
    sum_n alpha_n c (e_n - mix) = 0), so tau's reduction runs over [B, L, D] only and the
    logits need not be kept for the backward."""
    return _mix_forward(logits, tau, experts, scale, bias)[0]


def _affine(experts: Experts, scale: jax.Array, bias: jax.Array, n: int) -> jax.Array:
    """e_n = experts_n * scale_n + bias_n [B, L, D], in the experts' dtype."""
    dtype = experts[n].dtype
    return experts[n] * scale[n].astype(dtype) + bias[n].astype(dtype)


def _mix_forward(logits: jax.Array, tau: jax.Array, experts: Experts, scale: jax.Array,
                 bias: jax.Array) -> tuple:
    alpha = _softmax_weights(logits * (1.0 / tau), len(experts))
    weights = jnp.stack([jnp.mean(a, axis=-1) for a in alpha])
    # alpha in the experts' dtype, as the mix uses it, is what the backward keeps: with the
    # manager's noise alpha is [B, L, D] per expert, and in float32 it was base's largest
    # residual after the attention probabilities (9.9 GiB at 128 examples per chip).
    alpha = [a.astype(x.dtype) for a, x in zip(alpha, experts)]
    mix = functools.reduce(jnp.add, [a * _affine(experts, scale, bias, i)
                                     for i, a in enumerate(alpha)])
    return (mix, weights), (tau, experts, scale, bias, alpha, mix)


def _mix_backward(residuals: tuple, cotangents: tuple) -> tuple:
    tau, experts, scale, bias, alpha, mix = residuals
    g, _ = cotangents  # the weights' cotangent: a report, not differentiated
    n, width = len(alpha), g.shape[-1]
    inverse_tau = 1.0 / tau
    # Each alpha_n has logits_n's shape: the dims where it is 1 are those logits broadcast along.
    broadcast = tuple(d for d in range(alpha[0].ndim) if alpha[0].shape[d] == 1)
    g32 = g.astype(jnp.float32)
    alpha = [a.astype(jnp.float32) for a in alpha]
    rows = lambda x: x.reshape(-1, width)
    d_affine = [a * g32 for a in alpha]  # d e_n
    d_experts = tuple((d * scale[i]).astype(x.dtype)
                      for i, (d, x) in enumerate(zip(d_affine, experts)))
    # Reductions, not dots: a dot's operand is materialised, and experts[i] would be copied.
    d_scale = jnp.stack([jnp.sum(rows(d * experts[i]), axis=0) for i, d in enumerate(d_affine)])
    d_bias = jnp.stack([jnp.sum(rows(d), axis=0) for d in d_affine])
    spread = [(_affine(experts, scale, bias, i) - mix).astype(jnp.float32) for i in range(n)]
    d_logits = [d * s * inverse_tau for d, s in zip(d_affine, spread)]
    d_logits = jnp.stack([jnp.sum(d, axis=broadcast, keepdims=True) if broadcast else d
                          for d in d_logits])
    # alpha log(alpha) with the log's argument clamped, not xlogy: xlogy's select made this
    # term 2/3 of a noisy manager's mix backward on XLA:CPU (BENCHMARKS.md); alpha = 0 still
    # gives 0. The sum over [B, L, D] is a dot against ones per row, XLA:CPU's fast reduction.
    tiny = jnp.finfo(jnp.float32).tiny
    entropy_spread = functools.reduce(jnp.add, [d * jnp.log(jnp.maximum(a, tiny)) * s
                                                for a, d, s in zip(alpha, d_affine, spread)])
    d_tau = -jnp.sum(rows(entropy_spread) @ jnp.ones((width,), jnp.float32)) * inverse_tau
    return (d_logits, d_tau.astype(tau.dtype), d_experts, d_scale.astype(scale.dtype),
            d_bias.astype(bias.dtype))


_softmax_mix.defvjp(_mix_forward, _mix_backward)


class _ManagerBase(nn.Module):
    cfg: ml_collections.FrozenConfigDict  # model.manager
    first_layer: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _weight_shape(self, width: int) -> tuple[tuple[int, ...], tuple[str | None, ...]]:
        if self.cfg.weight_type == "vector":
            return (width,), ("embed",)
        return (1,), (None,)

    def _temperature(self) -> jax.Array:
        tau = self.param("temperature", logical(nn.initializers.constant(self.cfg.temperature), ()),
                         (), self.param_dtype)
        return tau if self.cfg.learn_temperature else jax.lax.stop_gradient(tau)

    def _cross_weight(self, width: int) -> jax.Array:
        shape, axes = self._weight_shape(width)
        return self.param("cross_weight", logical(nn.initializers.ones_init(), axes), shape,
                          self.param_dtype)

    def _aggregate(self, logits: jax.Array, experts: Experts, cross: jax.Array | None,
                   train: bool) -> tuple[jax.Array, jax.Array]:
        """logits broadcastable to [N, B, L, D]; experts N arrays [B, L, D]; cross [B, L, D]
        or None."""
        experts = tuple(experts)  # the mix's custom_vjp returns a tuple of cotangents
        num_experts, shape = len(experts), experts[0].shape
        logits = logits.astype(jnp.float32)
        if train and self.cfg.noise:
            noise = sampling.standard_normal(self.make_rng("dropout"), (num_experts, *shape))
            logits = logits + noise / num_experts
        tau = self._temperature()
        scale, bias = StackedLayerNormWeights(num_experts, param_dtype=self.param_dtype,
                                              name="expert_norms")(shape[-1])
        out, weights = _softmax_mix(logits, tau.astype(jnp.float32), experts,
                                    scale.astype(jnp.float32), bias.astype(jnp.float32))
        if cross is not None:
            out = out + self._cross_weight(shape[-1]).astype(self.dtype) * cross
        weights = jnp.broadcast_to(weights, (num_experts,) + shape[:-1])
        return out, jnp.moveaxis(weights, 0, -1)  # [B, L, N]

    def _cross_norm(self, previous: jax.Array) -> jax.Array:
        return LayerNorm(self.cfg.layer_norm_eps, name="cross_norm", dtype=self.dtype,
                         param_dtype=self.param_dtype)(previous)


class SAUE(_ManagerBase):
    """Static Aggregation of Uni-modal Experts."""

    @nn.compact
    def __call__(self, experts: Experts, previous: jax.Array | None,
                 other_previous: jax.Array | None, train: bool) -> tuple[jax.Array, jax.Array]:
        """experts N arrays [B, L, D] standardised, previous [B, L, D] (None at layer 1)
        -> ([B, L, D], [B, L, N])."""
        del other_previous  # static weights: the other stream does not steer them
        num_experts, width = len(experts), experts[0].shape[-1]
        shape, axes = self._weight_shape(width)
        scores = self.param("expert_weights",
                            logical(nn.initializers.constant(1.0 / num_experts), ("experts",) + axes),
                            (num_experts,) + shape, self.param_dtype)
        cross = None if self.first_layer else self._cross_norm(previous)
        return self._aggregate(scores[:, None, None, :], experts, cross, train)


class AAUE(_ManagerBase):
    """Adaptive Aggregation of Uni-modal Experts: per-token weights steered by both streams."""

    @nn.compact
    def __call__(self, experts: Experts, previous: jax.Array | None,
                 other_previous: jax.Array | None, train: bool) -> tuple[jax.Array, jax.Array]:
        """experts N arrays [B, L, D] standardised, previous [B, L, D], other_previous [B, L', D]
        -> ([B, L, D], [B, L, N])."""
        if previous is None or other_previous is None:
            raise ValueError("AAUE needs the previous cross-modal outputs of both streams; "
                             "the first cross-modal layer uses SAUE")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        num_experts, width = len(experts), experts[0].shape[-1]
        c = self._cross_norm(previous)
        q = LayerNorm(self.cfg.layer_norm_eps, name="query_norm", **kw)(other_previous)
        c, q = c.astype(self.dtype), q.astype(self.dtype)
        # (c W_q + b_q)(q W_k + b_k)^T = c M q^T + 1 (q key_bias)^T + terms constant along the
        # keys (those with b_k), which the softmax over the keys cancels; M = W_q W_k^T [D, D]
        # (`product`), key_bias = b_q W_k^T [D]. c M q^T is one [*, D] x [D, D] projection
        # instead of one per stream, of the shorter of the two (b_k's gradient is zero either
        # way).
        w_q, b_q = DenseWeights(width, ("embed", "kv"), name="query_proj", **kw)((width,))
        w_k, _ = DenseWeights(width, ("embed", "kv"), name="key_proj", **kw)((width,))
        w_q, b_q, w_k = (x.astype(self.dtype) for x in (w_q, b_q, w_k))
        # [D, D] and [D] products contracted over the kv axis, no transposed copy of W_k.
        product, key_bias = jnp.einsum("dk,ek->de", w_q, w_k), jnp.einsum("k,ek->e", b_q, w_k)
        if c.shape[1] <= q.shape[1]:
            scores = jnp.einsum("bld,bmd->blm", c @ product + key_bias, q)
        else:
            keys = jnp.einsum("bme,de->bmd", q, product)  # q M^T
            scores = jnp.einsum("bld,bmd->blm", c, keys) + (q @ key_bias)[:, None, :]
        attn = probabilities(scores.astype(jnp.float32) / jnp.sqrt(width), self.dtype)
        a = jnp.einsum("blm,bmd->bld", attn, q)
        # [a ; c] W + b as a W_a + c W_c: no [B, L, 2D] concatenation, nor its split backward
        # (AAUE forward + backward at image size: 29.5 -> 21.3 ms without the noise).
        w, b = DenseWeights(num_experts, ("embed", "experts"), name="controller", **kw)(
            (2 * width,))
        w, b = w.astype(self.dtype), b.astype(self.dtype)
        logits = a @ w[:width] + c @ w[width:] + b  # [B, L, N]
        return self._aggregate(jnp.moveaxis(logits, -1, 0)[..., None], experts, c, train)


def make_manager(cfg: ml_collections.FrozenConfigDict, layer_index: int, **kw) -> _ManagerBase:
    """The manager of cross-modal layer `layer_index` (0-based) under `cfg` = model.manager."""
    first = layer_index == 0
    if cfg.type == "SAUE" or first:
        return SAUE(cfg, first_layer=first, **kw)
    return AAUE(cfg, **kw)
