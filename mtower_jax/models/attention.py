"""Multi-head scaled dot-product attention, used by every encoder and cross-modal layer.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_head) + mask) V,   Q = x_q W_q, K = x_kv W_k, V = x_kv W_v

Projections are [embed, heads, kv] so tensor parallelism can split heads; the output
projection is [heads, kv, embed]. Softmax runs in float32 whatever the compute dtype; its
backward keeps the probabilities in the compute dtype (`probabilities`).

The middle step, softmax(Q K^T) V, has one of these implementations (`model.attention_impl`):

  explicit  the two einsums and the softmax written out here. The only one with attention
            dropout: the fused kernels take no dropout key, so a layer whose attention
            dropout is active (training, rate > 0) runs this one whatever is asked.
  xla       jax.nn.dot_product_attention(implementation='xla'): the same arithmetic, one op.
  cudnn     jax.nn.dot_product_attention(implementation='cudnn'): cuDNN's flash attention
            (GPU, bfloat16 / float16, head_dim a multiple of 8 up to 128); the [B, H, Lq, Lk]
            probabilities are never written to memory.
  auto      cudnn where it applies, else explicit (on CPU the two einsums measured the same as
            jax.nn.dot_product_attention, BENCHMARKS.md).

The fused implementations mask keys by length (`key_value_seq_lengths`, the number of True in
kv_mask): kv_mask must be a padding mask, True then False along the keys, as the text's
attention_mask is (right-padded captions).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtower_jax.models.layers import Dense, Dropout, Dtype
from mtower_jax.models.partitioning import constrain

ATTENTION_IMPLS = ("auto", "explicit", "xla", "cudnn")


def resolve_impl(requested: str, dtype: Dtype, head_dim: int, dropout_active: bool) -> str:
    """The implementation a layer runs (see the module docstring). Raises ValueError when
    cudnn is asked for where it cannot run."""
    if requested not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention_impl={requested!r} is not one of {ATTENTION_IMPLS}")
    cudnn_fits = (jax.default_backend() == "gpu"
                  and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
                  and head_dim % 8 == 0 and head_dim <= 128)
    if requested == "cudnn" and not cudnn_fits:
        raise ValueError(
            f"model.attention_impl='cudnn' needs a GPU, model.dtype bfloat16 or float16 and a "
            f"head_dim that is a multiple of 8 up to 128; here: backend "
            f"{jax.default_backend()!r}, dtype {jnp.dtype(dtype).name}, head_dim {head_dim}. "
            f"Use model.attention_impl='auto'")
    if dropout_active:
        return "explicit"
    if requested == "auto":
        return "cudnn" if cudnn_fits else "explicit"
    return requested


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def probabilities(logits: jax.Array, dtype: Dtype) -> jax.Array:
    """softmax(logits) over the last dim, computed in float32 from logits [..., Lk] float32,
    returned in `dtype`.

    The backward keeps only that `dtype` output, which the probabilities' consumer (the
    einsum with V) keeps anyway: autodiff of a float32 softmax also kept its float32 output,
    2 extra bytes per probability in bfloat16 (base at 128 examples per chip: 16.6 GiB of
    float32 probabilities). With p the output and g its gradient:
        d logits = p (g - sum_k g_k p_k)
    In bfloat16 that moves the gradients of Q, K and V against a float32 reference from
    0.53% to 0.56% (relative norm; [8, 65, 4, 64])."""
    return jax.nn.softmax(logits, axis=-1).astype(dtype)


def _probabilities_forward(logits, dtype):
    p = probabilities(logits, dtype)
    return p, p


def _probabilities_backward(dtype, p, g):
    del dtype
    p, g = p.astype(jnp.float32), g.astype(jnp.float32)
    return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),)


probabilities.defvjp(_probabilities_forward, _probabilities_backward)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_mask: jax.Array | None,
                    impl: str) -> jax.Array:
    """softmax(q k^T / sqrt(d_head)) v through jax.nn.dot_product_attention: q [B, Lq, H, Dh],
    k / v [B, Lk, H, Dh], kv_mask [B, Lk] a padding mask or None -> [B, Lq, H, Dh].

    cuDNN's training kernels take even lengths only (the vision tower has 1 + 18^2 = 325
    tokens at base): an odd Lq gets one query row that is computed and dropped, an odd Lk one
    key that the lengths mask out."""
    lq, lk = q.shape[1], k.shape[1]
    lengths = None if kv_mask is None else jnp.sum(kv_mask, axis=-1, dtype=jnp.int32)
    if impl == "cudnn" and (lq % 2 or lk % 2):
        pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n % 2), (0, 0), (0, 0)))
        q, k, v = pad(q, lq), pad(k, lk), pad(v, lk)
        if lengths is None:
            lengths = jnp.full((q.shape[0],), lk, jnp.int32)
    context = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
                                           implementation=impl)
    return context[:, :lq]


class MultiHeadAttention(nn.Module):
    num_heads: int
    dropout_rate: float = 0.0
    implementation: str = "auto"  # model.attention_impl
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array, kv_mask: jax.Array | None,
                 train: bool) -> jax.Array:
        """inputs_q [B, Lq, D], inputs_kv [B, Lk, D], kv_mask [B, Lk] (True = attend) or None
        -> [B, Lq, D]."""
        width = inputs_q.shape[-1]
        head_dim = width // self.num_heads

        def project(name: str, x: jax.Array) -> jax.Array:
            y = Dense((self.num_heads, head_dim), ("embed", "heads", "kv"), dtype=self.dtype,
                      param_dtype=self.param_dtype, name=name)(x)
            return constrain(y, ("act_batch", "act_len", "act_heads", "act_kv"))

        q = project("query", inputs_q)
        k = project("key", inputs_kv)
        v = project("value", inputs_kv)
        impl = resolve_impl(self.implementation, self.dtype, head_dim,
                            dropout_active=train and self.dropout_rate > 0)
        if impl == "explicit":
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
            if kv_mask is not None:  # added, not selected: a select's backward keeps its mask
                logits = logits + jnp.where(kv_mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None]
            probs = probabilities(logits, self.dtype)
            probs = Dropout(self.dropout_rate)(probs, deterministic=not train)
            context = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        else:
            context = fused_attention(q, k, v, kv_mask, impl)
        return Dense(width, ("heads", "kv", "embed"), contract_dims=2, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="out")(context)
