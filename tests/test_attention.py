"""attention.py's implementations agree: the fused ones (jax.nn.dot_product_attention, masking
keys by length) against the written-out einsums, values and gradients, with padded keys. On
CPU the fused one is 'xla'; on a GPU (`JAX_PLATFORMS=cuda pytest tests/test_attention.py`)
'cudnn' is checked too, in bfloat16, its dtype."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtower_jax.models import config as model_config
from mtower_jax.models.attention import MultiHeadAttention, probabilities, resolve_impl

B, LQ, LK, D, H = 3, 7, 9, 32, 4
FUSED = ("xla", "cudnn") if jax.default_backend() == "gpu" else ("xla",)


def _inputs(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    lengths = np.array([LK, 4, 1])  # full, padded, only the first key
    mask = np.arange(LK)[None, :] < lengths[:, None]
    return (jnp.asarray(rng.standard_normal((B, LQ, D)), jnp.float32),
            jnp.asarray(rng.standard_normal((B, LK, D)), jnp.float32), jnp.asarray(mask))


def _loss_and_grads(impl: str, dtype, params, q, kv, mask):
    module = MultiHeadAttention(H, dropout_rate=0.1, implementation=impl, dtype=dtype)

    def loss(params, q, kv):
        out = module.apply(params, q, kv, mask, train=False)
        return jnp.sum(jnp.sin(out.astype(jnp.float32)))  # weights every output differently
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(params, q, kv)


@pytest.mark.parametrize("impl", FUSED)
def test_fused_matches_explicit_with_padded_keys(impl):
    dtype = jnp.bfloat16 if impl == "cudnn" else jnp.float32
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    q, kv, mask = _inputs(0)
    params = MultiHeadAttention(H).init(jax.random.PRNGKey(1), q, kv, mask, False)
    want_loss, want = _loss_and_grads("explicit", dtype, params, q, kv, mask)
    got_loss, got = _loss_and_grads(impl, dtype, params, q, kv, mask)
    np.testing.assert_allclose(got_loss, want_loss, rtol=tol, atol=tol)
    got, want = ([np.asarray(x, np.float32) for x in jax.tree.leaves(t)] for t in (got, want))
    # The key bias's gradient is zero up to rounding (softmax ignores it): each leaf is judged
    # against at least 1% of the whole gradient's norm (in bfloat16, on an H100, its rounding
    # alone failed a per-leaf relative bound).
    floor = 1e-2 * np.sqrt(sum(np.sum(w ** 2) for w in want))
    for g, w in zip(got, want):
        assert np.linalg.norm(g - w) <= tol * max(np.linalg.norm(w), floor), (impl, g.shape)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_probabilities_gradient_matches_the_softmax(dtype):
    """The written-out backward, which keeps only the output in `dtype`, against autodiff of
    the float32 softmax: equal in float32; in bfloat16 within the output's rounding."""
    keys = jax.random.split(jax.random.PRNGKey(3))
    logits = 3 * jax.random.normal(keys[0], (2, H, LQ, LK))
    g = jax.random.normal(keys[1], logits.shape)
    ours = jax.grad(lambda l: jnp.sum(g * probabilities(l, dtype).astype(jnp.float32)))(logits)
    reference = jax.grad(lambda l: jnp.sum(g * jax.nn.softmax(l, axis=-1)))(logits)
    error = np.linalg.norm(ours - reference) / np.linalg.norm(reference)
    assert error < (1e-6 if dtype == jnp.float32 else 1e-2), error


def test_padded_keys_do_not_leak():
    """Changing a masked key changes nothing, in every implementation this backend has."""
    q, kv, mask = _inputs(2)
    params = MultiHeadAttention(H).init(jax.random.PRNGKey(1), q, kv, mask, False)
    changed = kv.at[1, 4:].set(100.0)
    for impl in ("explicit", "xla"):
        module = MultiHeadAttention(H, implementation=impl)
        out = module.apply(params, q, kv, mask, False)
        np.testing.assert_allclose(module.apply(params, q, changed, mask, False), out,
                                   rtol=1e-6, atol=1e-6)


def test_resolution_rules():
    # Active attention dropout needs the explicit path (the fused kernels take no dropout key).
    assert resolve_impl("xla", jnp.float32, 64, dropout_active=True) == "explicit"
    assert resolve_impl("xla", jnp.float32, 64, dropout_active=False) == "xla"
    on_gpu = jax.default_backend() == "gpu"
    assert resolve_impl("auto", jnp.bfloat16, 64, False) == ("cudnn" if on_gpu else "explicit")
    assert resolve_impl("auto", jnp.float32, 64, False) == "explicit"
    with pytest.raises(ValueError, match="needs a GPU, model.dtype bfloat16"):
        resolve_impl("cudnn", jnp.float32, 64, False)
    with pytest.raises(ValueError, match="is not one of"):
        resolve_impl("flash", jnp.float32, 64, False)


def test_config_validates_attention_impl():
    cfg = model_config.model_config("tiny")
    cfg.attention_impl = "flash"
    with pytest.raises(ValueError, match=r"model.attention_impl='flash' is not one of"):
        model_config.validate(cfg)
