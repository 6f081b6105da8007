"""The parameter-holding building blocks, each creating its parameters with logical axis names.

Every parameter of the model is made here (or by a module that calls `partitioning.logical`
itself), so the sharding vocabulary is applied in one place. Initialisation follows BERT:
weights ~ N(0, 0.02), biases 0, LayerNorm scale 1 / bias 0, as the reference code does.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtower_jax.models import sampling
from mtower_jax.models.partitioning import logical

Dtype = Any
INIT_STD = 0.02


def normal_init() -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=INIT_STD)


class Dense(nn.Module):
    """y = x W + b over the last `contract_dims` dims of x.

    W: [*in_dims, *features], named `axes` (input axes first); b: [*features].
    """

    features: int | tuple[int, ...]
    axes: tuple[str, ...]
    contract_dims: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = dense_parameters(self, x.shape[x.ndim - self.contract_dims:])
        y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=self.contract_dims)
        return y if bias is None else y + bias.astype(self.dtype)


class DenseWeights(Dense):
    """A Dense layer's parameters, the same names and axes, without the product:
    `DenseWeights(...)(in_shape)` -> (W, b or None), for callers that combine weights before
    applying them (managers.AAUE multiplies its query and key maps)."""

    @nn.compact
    def __call__(self, in_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array | None]:
        return dense_parameters(self, tuple(in_shape))


def dense_parameters(module: Dense,
                     in_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array | None]:
    """Creates (or reads) `kernel` [*in_shape, *features] and, with use_bias, `bias`
    [*features] in `module`'s scope; called from its compact __call__."""
    features = (module.features,) if isinstance(module.features, int) else tuple(module.features)
    if len(module.axes) != module.contract_dims + len(features):
        raise ValueError(f"{module.name}: axes {module.axes} do not fit {module.contract_dims} "
                         f"input and {len(features)} output dims")
    kernel = module.param("kernel", logical(normal_init(), module.axes), in_shape + features,
                          module.param_dtype)
    if not module.use_bias:
        return kernel, None
    bias = module.param("bias", logical(nn.initializers.zeros_init(),
                                        module.axes[module.contract_dims:]),
                        features, module.param_dtype)
    return kernel, bias


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * scale + bias over the last dim, statistics in float32."""

    epsilon: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale, bias = layer_norm_parameters(self, (x.shape[-1],), ("embed",))
        return layer_norm(x, scale.astype(jnp.float32), bias.astype(jnp.float32),
                          self.epsilon).astype(self.dtype)


class StackedLayerNormWeights(nn.Module):
    """The parameters of N LayerNorms, scale and bias [N, D] (axes experts, embed), without
    the normalisation: `StackedLayerNormWeights(N)(D)` -> (scale, bias). The managers apply
    them to experts standardised once for all managers (`standardise`), inside their mix."""

    stacked: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, width: int) -> tuple[jax.Array, jax.Array]:
        return layer_norm_parameters(self, (self.stacked, width), ("experts", "embed"))


def layer_norm_parameters(module: nn.Module, shape: tuple[int, ...],
                          axes: tuple[str, ...]) -> tuple[jax.Array, jax.Array]:
    """`scale` (ones) and `bias` (zeros) of `shape` in `module`'s scope."""
    scale = module.param("scale", logical(nn.initializers.ones_init(), axes), shape,
                         module.param_dtype)
    bias = module.param("bias", logical(nn.initializers.zeros_init(), axes), shape,
                        module.param_dtype)
    return scale, bias


def _statistics(x: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array]:
    """(mean, 1 / sqrt(var + eps)) of x [..., D] over its last dim, float32 [..., 1]."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return mean, jax.lax.rsqrt(var + epsilon)


def _standardised(x: jax.Array, mean: jax.Array, rstd: jax.Array) -> jax.Array:
    """x_hat = (x - mean) rstd, float32."""
    return (x.astype(jnp.float32) - mean) * rstd


def _normalise_backward(x_hat: jax.Array, rstd: jax.Array, g: jax.Array) -> jax.Array:
    """d x = rstd (g - mean(g) - x_hat mean(g x_hat)) (means over D), g = d x_hat float32."""
    return rstd * (g - jnp.mean(g, axis=-1, keepdims=True)
                   - x_hat * jnp.mean(g * x_hat, axis=-1, keepdims=True))


# The backward keeps x in its own dtype and the per-row statistics, and recomputes x_hat: a
# float32 x_hat kept instead was an extra [B, L, D] float32 buffer per norm that XLA could
# not drop (base at 128 examples per chip: 12.8 GiB; the autodiff LayerNorm it replaced
# let XLA recompute x_hat from x in the backward's fusions).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """LayerNorm of x [..., D] with scale, bias [D] (float32) -> float32.

    The gradient is written out: XLA:CPU fuses autodiff's scale / bias reductions into a
    slow pass (3.3 ms vs 0.75 ms forward + backward at [32, 65, 256]; BENCHMARKS.md).
    With g the output gradient and g' = g * scale:
        d scale = sum g x_hat,   d bias = sum g   (over every row)
        d x = rstd (g' - mean(g') - x_hat mean(g' x_hat))   (means over D)
    """
    return _layer_norm_forward(x, scale, bias, epsilon)[0]


def _layer_norm_forward(x, scale, bias, epsilon):
    mean, rstd = _statistics(x, epsilon)
    return _standardised(x, mean, rstd) * scale + bias, (x, mean, rstd, scale)


def _layer_norm_backward(epsilon, residuals, g):
    del epsilon
    x, mean, rstd, scale = residuals
    x_hat, g = _standardised(x, mean, rstd), g.astype(jnp.float32)
    # A dot over every leading dim (XLA:CPU's fast reduction), not over rows made by a
    # reshape: merging an unsplit leading dim with a batch dim split across devices (ln_post
    # on the stacked layers [N, B, T, D]) cannot stay split, and XLA gathered the whole batch.
    d_scale = jnp.einsum("...d,...d->d", g, x_hat)
    d_bias = jnp.sum(g, axis=tuple(range(g.ndim - 1)))
    return _normalise_backward(x_hat, rstd, g * scale).astype(x.dtype), d_scale, d_bias


layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def standardise(x: jax.Array, epsilon: float) -> jax.Array:
    """x_hat = (x - mean) / sqrt(var + eps) over the last dim of x [..., D] -> float32: a
    LayerNorm without its affine map, gradient written out (and residuals kept) as
    layer_norm's."""
    return _standardised(x, *_statistics(x, epsilon))


def _standardise_forward(x, epsilon):
    mean, rstd = _statistics(x, epsilon)
    return _standardised(x, mean, rstd), (x, mean, rstd)


def _standardise_backward(epsilon, residuals, g):
    del epsilon
    x, mean, rstd = residuals
    d_x = _normalise_backward(_standardised(x, mean, rstd), rstd, g.astype(jnp.float32))
    return (d_x.astype(x.dtype),)


standardise.defvjp(_standardise_forward, _standardise_backward)


class Embed(nn.Module):
    """A [num_rows, features] table; `__call__` looks rows up, `table` returns it whole."""

    num_rows: int
    features: int
    row_axis: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.embedding = self.param("embedding", logical(normal_init(), (self.row_axis, "embed")),
                                    (self.num_rows, self.features), self.param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def table(self) -> jax.Array:
        return jnp.asarray(self.embedding, self.dtype)


class Dropout(nn.Module):
    """Inverted dropout: y = x * keep / q, keep ~ Bernoulli(q), q = 1 - rate.

    The mask comes from sampling.keep_mask (16-bit uniforms, ~6x faster on CPU than
    jax.random.bernoulli), so q is a multiple of 2^-16 (0.899994 for rate 0.1); x is scaled
    by the inverse of that exact q, so E[y] = x still holds.
    """

    rate: float
    deterministic: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic or self.rate == 0.0:
            return x
        q = sampling.keep_threshold(1.0 - self.rate) / sampling.LEVELS
        keep = sampling.keep_mask(self.make_rng("dropout"), x.shape, 1.0 - self.rate)
        return jnp.where(keep, x / jnp.asarray(q, x.dtype), jnp.zeros_like(x))


# `gelu` is the exact erf GELU of BERT/RoBERTa; `quick_gelu` is CLIP's x * sigmoid(1.702 x).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": nn.relu,
}
