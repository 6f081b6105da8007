"""SAUE / AAUE against a NumPy transcription of DESIGN.md's equations, and their properties."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mtower_jax.models.layers import standardise
from mtower_jax.models.managers import AAUE, SAUE, make_manager

N, B, L, L_OTHER, D = 3, 2, 5, 4, 16


def manager_cfg(**overrides) -> ml_collections.FrozenConfigDict:
    cfg = dict(type="AAUE", weight_type="vector", num_layers=N, learn_temperature=True,
               temperature=1.0, noise=True, layer_norm_eps=1e-5)
    cfg.update(overrides)
    return ml_collections.FrozenConfigDict(cfg)


def perturbed(params, seed: int):
    """Every parameter moved away from its init (LayerNorms off 1/0, weights off 1/N)."""
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    leaves = [np.asarray(x) + 0.3 * rng.standard_normal(np.shape(x)).astype(np.float32)
              for x in leaves]
    return jax.tree.unflatten(treedef, leaves)


def inputs(seed: int = 0, other_len: int = L_OTHER):
    rng = np.random.default_rng(seed)
    experts = rng.standard_normal((N, B, L, D)).astype(np.float32)
    previous = rng.standard_normal((B, L, D)).astype(np.float32)
    other = rng.standard_normal((B, other_len, D)).astype(np.float32)
    return experts, previous, other


def init(module, experts, previous, other, seed=0):
    variables = module.init(jax.random.PRNGKey(0), experts, previous, other, False)
    return {"params": perturbed(nn.unbox(variables["params"]), seed)}


# ---- NumPy reference, written from DESIGN.md section 2 ------------------------------------
def ln(x, p, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def expert_norms(p, experts):
    stacked = p["expert_norms"]
    return np.stack([ln(experts[n], {"scale": stacked["scale"][n], "bias": stacked["bias"][n]})
                     for n in range(N)])


def saue_reference(p, experts, previous, first):
    alpha = softmax(p["expert_weights"] / p["temperature"], axis=0)  # [N, D|1]
    out = sum(alpha[n] * expert_norms(p, experts)[n] for n in range(N))
    if not first:
        out = out + p["cross_weight"] * ln(previous, p["cross_norm"])
    return out


def aaue_reference(p, experts, previous, other):
    c = ln(previous, p["cross_norm"])
    q = ln(other, p["query_norm"])
    qp = c @ p["query_proj"]["kernel"] + p["query_proj"]["bias"]
    kp = q @ p["key_proj"]["kernel"] + p["key_proj"]["bias"]
    attn = softmax(np.einsum("bld,bmd->blm", qp, kp) / np.sqrt(D), axis=-1)
    a = np.einsum("blm,bmd->bld", attn, q)
    logits = np.concatenate([a, c], -1) @ p["controller"]["kernel"] + p["controller"]["bias"]
    alpha = softmax(logits / p["temperature"], axis=-1)  # [B, L, N]
    normed = expert_norms(p, experts)
    out = sum(alpha[..., n, None] * normed[n] for n in range(N))
    return out + p["cross_weight"] * c, alpha


def unbox_np(tree):
    return jax.tree.map(np.asarray, nn.unbox(tree))


@pytest.mark.parametrize("weight_type", ["vector", "scalar"])
@pytest.mark.parametrize("first", [True, False])
def test_saue_matches_reference(weight_type, first):
    experts, previous, other = inputs()
    module = SAUE(manager_cfg(type="SAUE", weight_type=weight_type), first_layer=first)
    variables = init(module, experts, previous, other)
    # The module takes the experts standardised (towers.ManagerInputs.prepare does it once for
    # every manager); the reference applies whole LayerNorms.
    out, weights = module.apply(variables, standardise(experts, 1e-5), previous, other, False)
    p = unbox_np(variables["params"])
    np.testing.assert_allclose(out, saue_reference(p, experts, previous, first), atol=2e-5)
    expected = softmax(p["expert_weights"] / p["temperature"], axis=0).mean(-1)  # [N]
    np.testing.assert_allclose(weights, np.broadcast_to(expected, (B, L, N)), atol=1e-6)
    width = D if weight_type == "vector" else 1
    assert p["expert_weights"].shape == (N, width)
    assert ("cross_weight" in p) == (not first) and ("cross_norm" in p) == (not first)


@pytest.mark.parametrize("weight_type", ["vector", "scalar"])
@pytest.mark.parametrize("other_len", [L_OTHER, L + 2], ids=["other_shorter", "other_longer"])
def test_aaue_matches_reference(weight_type, other_len):
    # AAUE projects the shorter of its two streams through W_q W_k^T: both orders.
    experts, previous, other = inputs(1, other_len)
    module = AAUE(manager_cfg(weight_type=weight_type))
    variables = init(module, experts, previous, other, seed=1)
    # Every parameter moved off its initial value, so the biases (zero at init) take part:
    # the module folds b_k away and b_q through W_k, which the reference does not.
    leaves, tree = jax.tree.flatten(unbox_np(variables["params"]))
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    p = jax.tree.unflatten(tree, [x + 0.3 * np.asarray(jax.random.normal(k, np.shape(x)))
                                  for x, k in zip(leaves, keys)])
    out, weights = module.apply({"params": p}, standardise(experts, 1e-5), previous, other,
                                False)
    expected, alpha = aaue_reference(p, experts, previous, other)
    np.testing.assert_allclose(out, expected, atol=2e-5)
    np.testing.assert_allclose(weights, alpha, atol=1e-6)
    assert p["cross_weight"].shape == ((D,) if weight_type == "vector" else (1,))


def test_parameter_initial_values():
    experts, previous, other = inputs()
    for module in (SAUE(manager_cfg(type="SAUE")), AAUE(manager_cfg())):
        p = unbox_np(module.init(jax.random.PRNGKey(0), experts, previous, other, False)["params"])
        if "expert_weights" in p:
            np.testing.assert_array_equal(p["expert_weights"], np.full((N, D), 1 / N, np.float32))
        np.testing.assert_array_equal(p["cross_weight"], np.ones(D, np.float32))
        assert float(p["temperature"]) == 1.0


@pytest.mark.parametrize("module", [SAUE(manager_cfg(type="SAUE")), AAUE(manager_cfg())],
                         ids=["SAUE", "AAUE"])
def test_weights_sum_to_one_and_noise_only_in_training(module):
    experts, previous, other = inputs()
    variables = init(module, experts, previous, other)
    run = jax.jit(lambda rng, train: module.apply(variables, experts, previous, other, train,
                                                  rngs={"dropout": rng}), static_argnums=1)
    eval_a, w_eval_a = run(jax.random.PRNGKey(1), False)
    eval_b, w_eval_b = run(jax.random.PRNGKey(2), False)
    np.testing.assert_array_equal(eval_a, eval_b)  # no noise at eval, whatever the rng
    train_a, w_train_a = run(jax.random.PRNGKey(1), True)
    train_b, _ = run(jax.random.PRNGKey(2), True)
    assert not np.allclose(train_a, eval_a) and not np.allclose(train_a, train_b)
    for w in (w_eval_a, w_train_a):
        np.testing.assert_allclose(np.sum(w, axis=-1), 1.0, atol=1e-5)
        assert np.all(np.asarray(w) > 0)


def test_noise_is_per_element_with_std_one_over_n():
    # Scalar weights on a width-1 input: the returned weights are the per-element softmax, so
    # log(alpha_0 / alpha_1) = s_0 - s_1 + (eps_0 - eps_1), whose spread is sqrt(2) / N.
    module = SAUE(manager_cfg(type="SAUE", weight_type="scalar"), first_layer=True)
    experts = np.random.default_rng(0).standard_normal((N, 64, 256, 1)).astype(np.float32)
    variables = {"params": nn.unbox(module.init(jax.random.PRNGKey(0), experts, None, None,
                                                False)["params"])}
    _, w = module.apply(variables, experts, None, None, True, rngs={"dropout": jax.random.PRNGKey(3)})
    log_ratio = np.log(np.asarray(w)[..., 0]) - np.log(np.asarray(w)[..., 1])
    assert abs(log_ratio.mean()) < 0.01
    np.testing.assert_allclose(log_ratio.std(), np.sqrt(2) / N, rtol=0.03)
    off = SAUE(manager_cfg(type="SAUE", weight_type="scalar", noise=False), first_layer=True)
    _, w = off.apply(variables, experts, None, None, True, rngs={"dropout": jax.random.PRNGKey(3)})
    np.testing.assert_allclose(np.asarray(w), 1 / N, rtol=1e-6)


def test_scalar_weights_are_shared_across_channels_vector_weights_are_not():
    experts, previous, other = inputs()
    # Expert 0 is a +-1 pattern (standardised already), the others are zero,
    # so channel d of the output is alpha[0, d] * pattern[d].
    pattern = np.where(np.arange(D) % 2 == 0, 1.0, -1.0).astype(np.float32)
    probe = np.zeros((N, 1, 1, D), np.float32)
    probe[0, 0, 0] = pattern
    for weight_type, shared in (("scalar", True), ("vector", False)):
        module = SAUE(manager_cfg(type="SAUE", weight_type=weight_type), first_layer=True)
        p = unbox_np(init(module, experts, previous, other)["params"])
        p["expert_norms"] = {"scale": np.ones((N, D), np.float32),
                             "bias": np.zeros((N, D), np.float32)}
        out, _ = module.apply({"params": p}, probe, None, None, False)
        alpha_0 = np.asarray(out)[0, 0] / pattern
        expected = softmax(p["expert_weights"] / p["temperature"], axis=0)[0]
        np.testing.assert_allclose(alpha_0, np.broadcast_to(expected, (D,)), rtol=1e-4)
        assert np.allclose(alpha_0, alpha_0[0]) == shared


def test_temperature_sharpens_and_learnability_switch():
    experts, previous, other = inputs()

    def weights_entropy(tau: float) -> float:
        module = AAUE(manager_cfg())
        p = init(module, experts, previous, other)["params"]
        p["temperature"] = np.float32(tau)
        _, w = module.apply({"params": p}, experts, previous, other, False)
        w = np.asarray(w)
        return float(-(w * np.log(w)).sum(-1).mean())

    assert weights_entropy(0.2) < weights_entropy(1.0) < weights_entropy(5.0)

    for learn in (True, False):
        module = SAUE(manager_cfg(type="SAUE", learn_temperature=learn))
        p = init(module, experts, previous, other)["params"]
        grads = jax.grad(lambda q: jnp.sum(module.apply({"params": q}, experts, previous, other,
                                                        False)[0] ** 2))(p)
        assert (float(grads["temperature"]) != 0.0) == learn


def test_first_layer_is_saue_even_for_aaue():
    assert isinstance(make_manager(manager_cfg(type="AAUE"), 0), SAUE)
    assert isinstance(make_manager(manager_cfg(type="AAUE"), 1), AAUE)
    assert isinstance(make_manager(manager_cfg(type="SAUE"), 3), SAUE)
    with pytest.raises(ValueError, match="first cross-modal layer uses SAUE"):
        experts, previous, other = inputs()
        AAUE(manager_cfg()).init(jax.random.PRNGKey(0), experts, None, other, False)


@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("logits_shape", [(4, 3, 5, 8), (4, 1, 1, 8), (4, 3, 5, 1), (4, 1, 1, 1)])
def test_softmax_mix_gradient_matches_autodiff(logits_shape, noise):
    from mtower_jax.models.managers import _softmax_mix
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    logits = 3 * jax.random.normal(keys[0], logits_shape)
    experts = jax.random.normal(keys[1], (4, 3, 5, 8))
    scale = 1 + 0.3 * jax.random.normal(keys[2], (4, 8))
    bias = 0.3 * jax.random.normal(keys[3], (4, 8))
    g = jax.random.normal(keys[4], (3, 5, 8))
    eps = jax.random.normal(keys[5], experts.shape) if noise else None
    tau = jnp.float32(0.7)

    def reference(l, t, x, s, b):
        affine = x * s[:, None, None, :] + b[:, None, None, :]
        u = l if eps is None else l + eps
        return jnp.sum(jax.nn.softmax(u / t, axis=0) * affine, axis=0)

    args = (logits, tau, experts, scale, bias)
    # The managers add the noise to the logits before the mix, and pass N separate experts.
    ours = lambda l, t, x, s, b: _softmax_mix(l if eps is None else l + eps, t, tuple(x), s, b)
    mix, weights = ours(*args)
    np.testing.assert_allclose(mix, reference(*args), rtol=1e-6, atol=1e-6)
    u = logits if eps is None else logits + eps
    np.testing.assert_allclose(weights, jnp.mean(jax.nn.softmax(u / tau, axis=0), -1),
                               rtol=1e-6, atol=1e-7)
    # The weights are a report: a loss that reads them gets no gradient through them.
    argnums = tuple(range(len(args)))
    mine = jax.grad(lambda *a: jnp.sum(g * ours(*a)[0]) + jnp.sum(ours(*a)[1]),
                    argnums=argnums)(*args)
    theirs = jax.grad(lambda *a: jnp.sum(g * reference(*a)), argnums=argnums)(*args)
    for a, b in zip(mine, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
