"""The projection onto the vocabulary, and its cross-entropy computed block by block.

    logits = x W + b                   x [M, D], W [D, V], b [V]

`VocabDecoder.cross_entropy` returns the per-row loss and hit without the [M, V] logits ever
existing whole: the vocabulary is cut into `chunks` column blocks, each block's logits are
made, reduced and dropped, and the backward pass makes them again. With z = x W + b,

    lse = log sum_v exp(z_v)       over blocks c:  lse = m + log sum_c s_c exp(m_c - m),
                                   m_c = max z_c, s_c = sum exp(z_c - m_c), m = max_c m_c
    ce = lse - z_y                 correct = (z_y >= m): the label's logit is a largest one
    d z = g (softmax(z) - onehot(y))   per block, then  d x = sum_c d z_c W_c^T,
                                       d W_c = x^T d z_c,  d b_c = 1^T d z_c

On the 2-core CPU at `small` (384 masked positions, vocabulary 50,265) forward + backward
took 378-444 ms through optax's cross-entropy of the whole logits and 269-305 ms in 8 blocks
(bench/kernels.py, BENCHMARKS.md): a block's logits fit in the cache, the whole
[384, 50265] matrix (77 MB) does not, and no scatter, transpose or leading-axis reduction of
it is left. The price is a second x W in the backward pass (model FLOPs, as train/flops.py
counts them, leave it out, as they leave out rematerialisation).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtower_jax.models.layers import Dtype, normal_init
from mtower_jax.models.partitioning import logical


def _blocks(vocab: int, chunks: int) -> list[tuple[int, int]]:
    """[start, stop) column ranges of at most `chunks` near-equal blocks."""
    step = -(-vocab // max(1, min(chunks, vocab)))
    return [(start, min(start + step, vocab)) for start in range(0, vocab, step)]


def _block_logits(x, kernel, bias, start: int, stop: int, dtype) -> jax.Array:
    """[M, stop - start] float32 logits of one vocabulary block."""
    z = jnp.dot(x.astype(dtype), kernel[:, start:stop].astype(dtype),
                preferred_element_type=jnp.float32)
    return z + bias[start:stop].astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def blockwise_cross_entropy(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                            labels: jax.Array, chunks: int, dtype: Dtype
                            ) -> tuple[jax.Array, jax.Array]:
    """x [M, D], kernel [D, V], bias [V], labels [M] int in [0, V) ->
    (cross-entropy [M] float32, correct [M] bool); the matmuls run in `dtype`."""
    return _forward(x, kernel, bias, labels, chunks, dtype)[0]


def _forward(x, kernel, bias, labels, chunks, dtype):
    tops, sums, picked = [], [], jnp.zeros(labels.shape, jnp.float32)
    for start, stop in _blocks(kernel.shape[1], chunks):
        z = _block_logits(x, kernel, bias, start, stop, dtype)
        top = jnp.max(z, axis=-1)
        tops.append(top)
        sums.append(jnp.sum(jnp.exp(z - top[:, None]), axis=-1))
        inside = (labels >= start) & (labels < stop)
        column = jnp.clip(labels - start, 0, stop - start - 1)[:, None]
        picked = jnp.where(inside, jnp.take_along_axis(z, column, axis=-1)[:, 0], picked)
    top = functools.reduce(jnp.maximum, tops)
    lse = top + jnp.log(functools.reduce(jnp.add, [s * jnp.exp(t - top)
                                                   for s, t in zip(sums, tops)]))
    return (lse - picked, picked >= top), (x, kernel, bias, labels, lse)


def _backward(chunks, dtype, residuals, cotangents):
    x, kernel, bias, labels, lse = residuals
    g = cotangents[0].astype(jnp.float32)[:, None]  # `correct` has no gradient
    d_x = jnp.zeros(x.shape, jnp.float32)
    d_kernel, d_bias = [], []
    for start, stop in _blocks(kernel.shape[1], chunks):
        z = _block_logits(x, kernel, bias, start, stop, dtype)
        onehot = jax.lax.broadcasted_iota(jnp.int32, z.shape, 1) == (labels - start)[:, None]
        d_z = g * (jnp.exp(z - lse[:, None]) - onehot)
        d_zc = d_z.astype(dtype)
        d_x = d_x + jnp.dot(d_zc, kernel[:, start:stop].astype(dtype).T,
                            preferred_element_type=jnp.float32)
        d_kernel.append(jnp.dot(x.astype(dtype).T, d_zc, preferred_element_type=jnp.float32))
        # 1^T d_z as a matrix-vector product: XLA:CPU's fast reduction over rows.
        d_bias.append(jnp.dot(jnp.ones(d_z.shape[:1], jnp.float32), d_z))
    return (d_x.astype(x.dtype), jnp.concatenate(d_kernel, 1).astype(kernel.dtype),
            jnp.concatenate(d_bias).astype(bias.dtype), None)


blockwise_cross_entropy.defvjp(_forward, _backward)


class VocabDecoder(nn.Module):
    """logits = x W + b onto `vocab_size` words; W [embed, vocab], b [vocab] (the parameter
    names and axes of layers.Dense, so checkpoints see no difference)."""

    features_in: int  # D, the width of x (setup makes W before any input is seen)
    vocab_size: int
    chunks: int = 8
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.kernel = self.param("kernel", logical(normal_init(), ("embed", "vocab")),
                                 (self.features_in, self.vocab_size), self.param_dtype)
        self.bias = self.param("bias", logical(nn.initializers.zeros_init(), ("vocab",)),
                               (self.vocab_size,), self.param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., D] -> logits [..., V] in `dtype`."""
        y = jnp.tensordot(x.astype(self.dtype), self.kernel.astype(self.dtype), axes=1)
        return y + self.bias.astype(self.dtype)

    def cross_entropy(self, x: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [..., D], labels [...] int in [0, V) -> (cross-entropy [...] float32,
        correct [...] bool), block by block (the module docstring)."""
        lead = labels.shape
        ce, correct = blockwise_cross_entropy(x.reshape(-1, x.shape[-1]), self.kernel, self.bias,
                                              labels.reshape(-1), self.chunks, self.dtype)
        return ce.reshape(lead), correct.reshape(lead)
