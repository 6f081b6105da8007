"""The MLM loss computed block by block over the vocabulary (models/vocab_decoder.py) against
optax's cross-entropy of the whole logits: values, hits and every gradient."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import tiny_config
from mtower_jax.models.config import validate
from mtower_jax.models.heads import MLMHead
from mtower_jax.models.vocab_decoder import blockwise_cross_entropy

ROWS, WIDTH, VOCAB = 37, 16, 1001  # 1001 = 7 x 143: blocks of 3 and 8 are uneven


def _problem(seed: int = 0):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    x = jax.random.normal(k[0], (ROWS, WIDTH))
    kernel = jax.random.normal(k[1], (WIDTH, VOCAB)) / 2
    bias = jax.random.normal(k[2], (VOCAB,))
    labels = jax.random.randint(k[3], (ROWS,), 0, VOCAB)
    # A few rows whose label is the top word, so `correct` is exercised both ways.
    labels = labels.at[:5].set(jnp.argmax(x[:5] @ kernel + bias, -1))
    weights = jax.random.normal(k[4], (ROWS,))
    return x, kernel, bias, labels, weights


def _reference(x, kernel, bias, labels):
    logits = x @ kernel + bias
    return (optax.softmax_cross_entropy_with_integer_labels(logits, labels),
            jnp.argmax(logits, -1) == labels)


@pytest.mark.parametrize("chunks", [1, 3, 8])
def test_blockwise_cross_entropy_matches_the_whole_logits(chunks):
    x, kernel, bias, labels, weights = _problem()
    ce, correct = blockwise_cross_entropy(x, kernel, bias, labels, chunks, jnp.float32)
    want_ce, want_correct = _reference(x, kernel, bias, labels)
    np.testing.assert_allclose(ce, want_ce, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(correct, want_correct)
    assert 0 < int(correct.sum()) < ROWS

    def loss(fn):
        return lambda x, k, b: jnp.sum(weights * fn(x, k, b)[0])
    ours = jax.grad(loss(lambda x, k, b: blockwise_cross_entropy(x, k, b, labels, chunks,
                                                                 jnp.float32)), (0, 1, 2))
    want = jax.grad(loss(lambda x, k, b: _reference(x, k, b, labels)), (0, 1, 2))
    for name, got, expected in zip(("x", "kernel", "bias"), ours(x, kernel, bias),
                                   want(x, kernel, bias)):
        scale = float(jnp.max(jnp.abs(expected)))
        np.testing.assert_allclose(got, expected, atol=1e-5 * scale, err_msg=name)


def test_blockwise_cross_entropy_in_bfloat16_matmuls():
    x, kernel, bias, labels, _ = _problem(1)
    ce, _ = jax.jit(blockwise_cross_entropy, static_argnums=(4, 5))(
        x, kernel, bias, labels, 4, jnp.bfloat16)
    assert ce.dtype == jnp.float32
    np.testing.assert_allclose(ce, _reference(x, kernel, bias, labels)[0], rtol=0.05, atol=0.05)


def test_mlm_head_loss_equals_its_logits_loss():
    """The head given labels returns the cross-entropy of the logits it returns without them,
    and the same parameter gradients."""
    cfg = tiny_config("bridge", mlm_vocab_chunks=3)
    head = MLMHead(ml_collections.FrozenConfigDict(cfg))
    k = jax.random.split(jax.random.PRNGKey(2), 3)
    feats = jax.random.normal(k[0], (2, 5, cfg.cross.hidden_size))
    labels = jax.random.randint(k[1], (2, 5), 0, cfg.text.vocab_size)
    params = head.init(k[2], {"text_feats": feats}, False)["params"]

    def blockwise(params):
        out = head.apply({"params": params}, {"text_feats": feats, "mlm_labels": labels}, False)
        return jnp.sum(out["mlm_cross_entropy"])

    def whole(params):
        logits = head.apply({"params": params}, {"text_feats": feats}, False)["mlm_logits"]
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    np.testing.assert_allclose(jax.jit(blockwise)(params), jax.jit(whole)(params), rtol=1e-5)
    got, want = jax.jit(jax.grad(blockwise))(params), jax.jit(jax.grad(whole))(params)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, atol=1e-5 * float(jnp.max(jnp.abs(w))) + 1e-7,
                                   err_msg=jax.tree_util.keystr(path))


def test_mlm_vocab_chunks_must_be_positive():
    with pytest.raises(ValueError, match="mlm_vocab_chunks=0"):
        validate(tiny_config("bridge", mlm_vocab_chunks=0))
