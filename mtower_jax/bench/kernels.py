"""The small measurements behind the step's optimisations: each alternative of one piece of
the model, jitted and timed side by side at the `small` benchmark's shapes (batch 32, image
tokens 65, hidden 256, 4 heads, N = 4 managed layers):

    python -m mtower_jax.bench.kernels

    layer_norm      forward + backward at [32, 65, 256]: autodiff vs layers.layer_norm's
                    written-out gradient
    manager_mix     sum_n softmax_n(logits) X_n, forward + backward: jax.nn.softmax over the
                    expert axis vs N elementwise terms (autodiff) vs managers._softmax_mix
                    (the same terms with the gradient written out)
    manager_norms   one manager's N expert LayerNorms + its mix, forward + backward: whole
                    norms, then the mix vs the affine maps inside the mix on experts
                    standardised once for every manager (`standardise_once`: that once)
    dropout_mask    jax.random.bernoulli vs sampling.keep_mask (16-bit uniforms)
    manager_noise   jax.random.normal vs sampling.standard_normal (quantile table)
    attention       attention.py's separate Q/K/V projections vs one fused QKV matmul vs
                    jax.nn.dot_product_attention (forward + backward)
    mlm_loss        the vocabulary projection + cross-entropy at 384 masked positions
                    (vocabulary 50,265), forward + backward: optax's cross-entropy of the
                    whole logits vs vocab_decoder.blockwise_cross_entropy in 1 and 8 blocks

Prints one JSON line: {piece: {alternative: median ms}}.
"""
from __future__ import annotations

import json
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from mtower_jax.bench.train_step import median_seconds
from mtower_jax.models import sampling
from mtower_jax.models.layers import (LayerNorm, _standardised, _statistics, layer_norm,
                                      standardise)
from mtower_jax.models.managers import _softmax_mix, _softmax_weights
from mtower_jax.models.vocab_decoder import blockwise_cross_entropy

_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per alternative.")
B, T, D, H, N = 32, 65, 256, 4, 4


# timer(fn, *args) -> median milliseconds of jit(fn)(*args); a test passes one that only
# traces, which is where a wrong pytree or custom_vjp signature fails.
Timer = Callable[..., float]


def milliseconds(repeats: int) -> Timer:
    return lambda fn, *args: 1e3 * median_seconds(jax.jit(fn), args, repeats)


def _fwd_bwd(f: Callable, argnums: tuple[int, ...]) -> Callable:
    return jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=argnums)


def _attention(fused: bool, library: bool) -> Callable:
    def attend(x, wq, wk, wv, wo):
        if fused:
            qkv = jnp.tensordot(x, jnp.stack([wq, wk, wv], axis=1), 1)  # [B, T, 3, H, Dh]
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            q, k, v = (jnp.tensordot(x, w, 1) for w in (wq, wk, wv))
        if library:
            context = jax.nn.dot_product_attention(q, k, v)
        else:
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
            context = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v)
        return jnp.tensordot(context, wo, 2)
    return attend


def measure(timer: Timer) -> dict:
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    experts = jax.random.normal(keys[0], (N, B, T, D))
    logits = jax.random.normal(keys[1], (N, B, T, D))
    reduce_mix = lambda l, x: jnp.sum(jax.nn.softmax(l, axis=0) * x, axis=0)
    elementwise_autodiff = lambda l, x: sum(a * x[i] for i, a in enumerate(
        _softmax_weights(l, N)))
    shape = (B, T, 4 * D)  # an FFN activation
    x = jax.random.normal(keys[2], (B, T, D))
    w = [0.02 * jax.random.normal(keys[3 + i], (D, H, D // H)) for i in range(3)]
    wo = 0.02 * jax.random.normal(keys[6], (H, D // H, D))
    attention = {name: timer(_fwd_bwd(_attention(fused, library), (0, 1, 2, 3, 4)), x, *w, wo)
                 for name, fused, library in (("separate_qkv", False, False),
                                              ("fused_qkv", True, False),
                                              ("dot_product_attention", False, True))}
    def autodiff_norm(scale, bias, x):
        return _standardised(x, *_statistics(x, 1e-5)) * scale + bias
    norm = LayerNorm(1e-5)
    ones, zeros = jnp.ones((D,)), jnp.zeros((D,))
    scales, biases = jnp.ones((N, D)), jnp.zeros((N, D))

    def norms_then_mix(logits, experts, scales, biases):
        normed = tuple(layer_norm(experts[n], scales[n], biases[n], 1e-5) for n in range(N))
        identity = (jnp.ones_like(scales), jnp.zeros_like(biases))  # applied by the norms
        return _softmax_mix(logits, jnp.float32(1.0), normed, *identity)[0]

    def affine_in_mix(logits, standardised, scales, biases):
        return _softmax_mix(logits, jnp.float32(1.0), standardised, scales, biases)[0]

    # The model's mix takes its experts as a tuple of N [B, T, D] buffers.
    expert_tuple = tuple(experts)
    standardised = tuple(standardise(x, 1e-5) for x in experts)
    return {
        "layer_norm": {
            "autodiff": timer(_fwd_bwd(autodiff_norm, (0, 1, 2)), ones, zeros, x),
            "custom_vjp": timer(_fwd_bwd(lambda s, b, x: norm.apply(
                {"params": {"scale": s, "bias": b}}, x), (0, 1, 2)), ones, zeros, x)},
        "manager_mix": {
            "softmax_over_axis0": timer(_fwd_bwd(reduce_mix, (0, 1)), logits, experts),
            "elementwise_terms": timer(_fwd_bwd(elementwise_autodiff, (0, 1)), logits, experts),
            "elementwise_custom_vjp": timer(_fwd_bwd(
                lambda l, x: _softmax_mix(l, jnp.float32(1.0), x, scales, biases)[0], (0, 1)),
                logits, expert_tuple)},
        "manager_norms": {
            "norms_then_mix": timer(_fwd_bwd(norms_then_mix, (0, 1, 2, 3)), logits,
                                    expert_tuple, scales, biases),
            "affine_in_mix": timer(_fwd_bwd(affine_in_mix, (0, 1, 2, 3)), logits, standardised,
                                   scales, biases),
            "standardise_once": timer(_fwd_bwd(lambda x: jnp.stack(
                [standardise(e, 1e-5) for e in x]), (0,)), expert_tuple)},
        "dropout_mask": {
            "bernoulli": timer(lambda k: jax.random.bernoulli(k, 0.9, shape), keys[7]),
            "keep_mask_16bit": timer(lambda k: sampling.keep_mask(k, shape, 0.9), keys[7])},
        "manager_noise": {
            "jax_random_normal": timer(lambda k: jax.random.normal(k, (N, B, T, D)), keys[7]),
            "quantile_table": timer(lambda k: sampling.standard_normal(k, (N, B, T, D)),
                                    keys[7])},
        "attention": attention,
        "mlm_loss": _mlm_loss(keys[7], timer),
    }


def _mlm_loss(key: jax.Array, timer: Timer) -> dict:
    rows, vocab = B * 12, 50265  # small's 12 masked positions per text
    k = jax.random.split(key, 3)
    x = jax.random.normal(k[0], (rows, D))
    kernel, bias = 0.02 * jax.random.normal(k[1], (D, vocab)), jnp.zeros((vocab,))
    labels = jax.random.randint(k[2], (rows,), 0, vocab)

    def whole(x, kernel, bias):
        logits = x @ kernel + bias
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return ce + (jnp.argmax(logits, -1) == labels)  # the step also counts hits

    def blocks(chunks: int) -> Callable:
        def loss(x, kernel, bias):
            ce, correct = blockwise_cross_entropy(x, kernel, bias, labels, chunks, jnp.float32)
            return ce + correct
        return loss
    grads = lambda f: jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 1, 2))
    return {name: timer(grads(f), x, kernel, bias)
            for name, f in (("whole_logits_optax", whole), ("blockwise_1", blocks(1)),
                            ("blockwise_8", blocks(8)))}


def main(argv: list[str]) -> None:
    del argv
    shapes = dict(batch=B, tokens=T, hidden=D, heads=H, experts=N)
    print(json.dumps({"device": jax.local_devices()[0].device_kind, "shapes": shapes,
                      **measure(milliseconds(_REPEATS.value))}))


if __name__ == "__main__":
    app.run(main)
