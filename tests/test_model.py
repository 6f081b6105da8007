"""The assembled model: output shapes of every tower and manager variant, jit, train/eval
behaviour, masking, NLVR2 pairs, remat and bfloat16."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_variables, tiny_config
from mtower_jax.models import build_model, example_inputs, random_inputs

VARIANTS = {
    "manager-AAUE-vector": tiny_config("manager"),
    "manager-AAUE-scalar": tiny_config("manager", **{"manager.weight_type": "scalar"}),
    "manager-SAUE-vector": tiny_config("manager", **{"manager.type": "SAUE"}),
    "manager-SAUE-scalar-N1": tiny_config("manager", **{"manager.type": "SAUE",
                                                        "manager.weight_type": "scalar",
                                                        "manager.num_layers": 1}),
    "manager-N4-fixed-tau-no-noise": tiny_config("manager", **{
        "manager.num_layers": 4, "manager.learn_temperature": False, "manager.noise": False}),
    "bridge-add": tiny_config("bridge"),
    "bridge-scaled_add": tiny_config("bridge", **{"bridge.type": "scaled_add"}),
    "bridge-interpolate": tiny_config("bridge", **{"bridge.type": "interpolate"}),
    "meter": tiny_config("meter"),
}


def init_variables(cfg, seed: int = 0):
    return build_model(cfg), random_variables(cfg, seed)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_output_shapes(name):
    cfg = VARIANTS[name]
    cfg.heads = ("mlm", "itm", "itc")
    model = build_model(cfg)
    inputs = example_inputs(cfg, batch_size=3)
    manager = cfg.tower == "manager"

    def run(rng):
        variables = model.init(rng, **inputs)
        return model.apply(variables, **inputs, train=True, rngs={"dropout": rng},
                           return_manager_weights=manager)

    out = jax.eval_shape(run, jax.random.PRNGKey(0))
    d, length = cfg.cross.hidden_size, cfg.max_text_len
    image_len = (cfg.vision.image_size // cfg.vision.patch_size) ** 2 + 1
    assert out["text_feats"].shape == (3, length, d)
    assert out["image_feats"].shape == (3, image_len, d)
    assert out["cls_feats"].shape == (3, 2 * d)
    assert out["mlm_logits"].shape == (3, length, cfg.text.vocab_size)
    assert out["itm_logits"].shape == (3, 2)
    assert out["itc_text_embeds"].shape == out["itc_image_embeds"].shape == (3, cfg.itc_dim)
    assert ("manager_weights" in out) == manager
    if manager:
        n, layers = cfg.manager.num_layers, cfg.cross.num_layers
        assert out["manager_weights"]["text"].shape == (layers, 3, length, n)
        assert out["manager_weights"]["image"].shape == (layers, 3, image_len, n)


def test_jitted_init_follows_the_reference_initialisation():
    cfg = tiny_config("manager")
    model = build_model(cfg)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), **example_inputs(cfg))
    params = nn.unbox(variables["params"])
    flat = {"/".join(k.key for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    kernels = np.concatenate([v.ravel() for k, v in flat.items() if k.endswith("/kernel")])
    assert abs(kernels.std() - 0.02) < 0.001 and abs(kernels.mean()) < 0.001
    for path, value in flat.items():
        leaf = path.rsplit("/", 1)[-1]
        if leaf == "scale":
            np.testing.assert_array_equal(value, 1.0, err_msg=path)
        elif leaf == "bias":
            np.testing.assert_array_equal(value, 0.0, err_msg=path)
        elif leaf == "expert_weights":
            np.testing.assert_allclose(value, 1.0 / cfg.manager.num_layers, err_msg=path)
        elif leaf in ("cross_weight", "temperature"):
            np.testing.assert_array_equal(value, 1.0, err_msg=path)
    # AAUE is the default, but the first cross-modal layer has no C_0 and uses SAUE.
    managers = params["backbone"]["text_inputs"]
    assert "expert_weights" in managers["managers_0"] and "controller" not in managers["managers_0"]
    assert "controller" in managers["managers_1"] and "expert_weights" not in managers["managers_1"]


@pytest.fixture(scope="module", params=["manager", "bridge", "meter"])
def tower_model(request):
    cfg = tiny_config(request.param)
    model, variables = init_variables(cfg)
    return cfg, model, variables


def test_jit_forward_eval_is_deterministic_train_is_not(tower_model):
    cfg, model, variables = tower_model
    inputs = random_inputs(cfg, batch_size=4)
    forward = jax.jit(lambda v, rng, train: model.apply(v, **inputs, train=train,
                                                        rngs={"dropout": rng}),
                      static_argnums=2)
    eval_a = forward(variables, jax.random.PRNGKey(0), False)
    eval_b = forward(variables, jax.random.PRNGKey(1), False)
    train = forward(variables, jax.random.PRNGKey(0), True)
    for key in ("text_feats", "image_feats", "cls_feats", "mlm_logits", "itm_logits"):
        assert np.all(np.isfinite(eval_a[key])), key
        np.testing.assert_array_equal(eval_a[key], eval_b[key])
    assert not np.allclose(eval_a["cls_feats"], train["cls_feats"])
    # The top vision layer went through the shared ln_post: zero mean per token before its affine.
    ln_post = nn.unbox(variables["params"])["backbone"]["vision_encoder"]["ln_post"]
    normed = (eval_a["unimodal_image_feats"] - ln_post["bias"]) / ln_post["scale"]
    np.testing.assert_allclose(np.mean(normed, -1), 0.0, atol=1e-4)


def test_prepared_image_fuses_as_the_raw_encoding(tower_model):
    # prepare_image takes the image stream's cross-modal inputs once; gathering its rows
    # (ITM negatives) must equal fusing the gathered raw encoding.
    from mtower_jax.train.objectives import select_images
    cfg, model, variables = tower_model
    inputs = random_inputs(cfg, batch_size=3)
    index = jnp.array([2, 0, 0])

    def fuse(m, prepared: bool):
        bb = m.backbone
        text = bb.encode_text(inputs["input_ids"], inputs["attention_mask"], False)
        image = bb.encode_image(inputs["pixel_values"], False)
        image = bb.prepare_image(image) if prepared else image
        return bb.fuse(text, inputs["attention_mask"], select_images(image, index), False)

    raw, prepared = (model.apply(variables, p, method=fuse) for p in (False, True))
    for key in ("text_feats", "image_feats", "cls_feats"):
        np.testing.assert_allclose(prepared[key], raw[key], rtol=1e-6, atol=1e-6, err_msg=key)


def test_last_layer_at_chosen_positions_equals_the_full_rows(tower_model):
    # fuse(text_positions=, image_positions=) runs the last cross-modal layer for those
    # queries only (MLM: the masked positions, ITM: [CLS]); its rows must be the full ones.
    cfg, model, variables = tower_model
    inputs = random_inputs(cfg, batch_size=3)
    text_at = jnp.array([[0, 5, 2], [7, 7, 1], [3, 0, 9]], jnp.int32)
    image_at = jnp.zeros((3, 1), jnp.int32)

    def fuse(m, **positions):
        bb = m.backbone
        text = bb.encode_text(inputs["input_ids"], inputs["attention_mask"], False)
        image = bb.encode_image(inputs["pixel_values"], False)
        return bb.fuse(text, inputs["attention_mask"], image, False, **positions)

    full = model.apply(variables, method=fuse)
    part = model.apply(variables, method=fuse, text_positions=text_at, image_positions=image_at)
    np.testing.assert_allclose(part["text_feats"], np.take_along_axis(
        full["text_feats"], np.asarray(text_at)[..., None], 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(part["image_feats"], full["image_feats"][:, :1], rtol=1e-5,
                               atol=1e-5)
    pooled = model.apply(variables, method=fuse, text_positions=image_at,
                         image_positions=image_at)
    np.testing.assert_allclose(pooled["cls_feats"], full["cls_feats"], rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_real_tokens():
    # Extra padding must not change anything the real tokens see: RoBERTa positions skip pads
    # and every attention over text is masked. (The AAUE query attention is unmasked by
    # design, so the bridge tower is the clean check.)
    cfg = tiny_config("bridge")
    model, variables = init_variables(cfg)
    inputs = random_inputs(cfg, batch_size=2)
    inputs["attention_mask"][:, 10:] = 0
    inputs["input_ids"][:, 10:] = cfg.text.pad_token_id
    longer = dict(inputs, attention_mask=inputs["attention_mask"].copy(),
                  input_ids=inputs["input_ids"].copy())
    shorter = dict(inputs)
    shorter["attention_mask"] = inputs["attention_mask"].copy()
    shorter["input_ids"] = inputs["input_ids"].copy()
    # Same real tokens, different garbage in padded positions.
    longer["input_ids"][:, 12:] = 7
    longer["input_ids"][:, 10:12] = cfg.text.pad_token_id
    a = model.apply(variables, **shorter)
    b = model.apply(variables, **{**longer, "input_ids": np.where(
        longer["attention_mask"] == 1, longer["input_ids"], cfg.text.pad_token_id)})
    np.testing.assert_allclose(a["text_feats"][:, :10], b["text_feats"][:, :10], atol=1e-5)
    np.testing.assert_allclose(a["cls_feats"], b["cls_feats"], atol=1e-5)
    np.testing.assert_allclose(a["image_feats"], b["image_feats"], atol=1e-5)


def test_nlvr2_pair_uses_third_token_type():
    cfg = tiny_config("manager", heads=("nlvr2",), num_token_types=3)
    model, variables = init_variables(cfg)
    inputs = random_inputs(cfg, batch_size=2)
    out = model.apply(variables, **inputs)
    d = cfg.cross.hidden_size
    assert out["cls_feats_pair"].shape == (2, 4 * d)
    assert out["nlvr2_logits"].shape == (2, 2)
    # The first half is the ordinary single-image pass (token type 1) ...
    single_cfg = tiny_config("manager", heads=(), num_token_types=3)
    single = build_model(single_cfg).apply(
        {"params": {"backbone": variables["params"]["backbone"]}},
        **{k: v for k, v in inputs.items() if k != "pixel_values_2"})
    np.testing.assert_allclose(out["cls_feats_pair"][:, :2 * d], single["cls_feats"], atol=1e-5)
    # ... and only the second pass reads token-type row 2.
    moved = jax.tree.map(np.copy, variables["params"])
    moved["backbone"]["token_type_embeddings"]["embedding"][2] += 1.0
    out2 = model.apply({"params": moved}, **inputs)
    np.testing.assert_allclose(out2["cls_feats_pair"][:, :2 * d], out["cls_feats_pair"][:, :2 * d],
                               atol=1e-6)
    assert not np.allclose(out2["cls_feats_pair"][:, 2 * d:], out["cls_feats_pair"][:, 2 * d:])
    with pytest.raises(ValueError, match="pixel_values_2"):
        model.apply(variables, **{k: v for k, v in inputs.items() if k != "pixel_values_2"})


def test_remat_changes_nothing_but_memory():
    shallow = {"text.num_layers": 1, "vision.num_layers": 1, "cross.num_layers": 1,
               "manager.num_layers": 1, "heads": ("itm",)}
    cfg = tiny_config("manager", **shallow)
    model, variables = init_variables(cfg)
    remat_model = build_model(tiny_config("manager", remat=True, **shallow))
    inputs = random_inputs(cfg, batch_size=2)

    def loss(m):
        def f(params):
            out = m.apply({"params": params}, **inputs, train=True,
                          rngs={"dropout": jax.random.PRNGKey(0)})
            return jnp.mean(out["text_feats"] ** 2) + jnp.mean(out["itm_logits"] ** 2)
        return jax.value_and_grad(f)

    params = variables["params"]
    assert "remat" in str(jax.make_jaxpr(loss(remat_model))(params))
    assert "remat" not in str(jax.make_jaxpr(loss(model))(params))
    value, grads = jax.jit(loss(model))(params)
    remat_value, remat_grads = jax.jit(loss(remat_model))(params)
    np.testing.assert_allclose(value, remat_value, rtol=1e-6)
    for g, rg in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
        np.testing.assert_allclose(g, rg, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params():
    cfg = tiny_config("manager", dtype="bfloat16")
    model, variables = init_variables(cfg)
    assert {x.dtype for x in jax.tree.leaves(nn.unbox(variables))} == {jnp.dtype("float32")}
    out = jax.jit(lambda v: model.apply(v, **random_inputs(cfg)))(variables)
    assert out["text_feats"].dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(out["mlm_logits"], np.float32)))
    # Close to the float32 model with the same parameters.
    f32 = build_model(tiny_config("manager")).apply(variables, **random_inputs(cfg))
    np.testing.assert_allclose(np.asarray(out["cls_feats"], np.float32), f32["cls_feats"],
                               atol=0.05)


def test_manager_weights_only_for_the_manager_tower():
    cfg = tiny_config("bridge")
    model = build_model(cfg)
    with pytest.raises(ValueError, match="has no managers"):
        jax.eval_shape(lambda r: model.apply(model.init(r, **example_inputs(cfg)),
                                             **example_inputs(cfg), return_manager_weights=True),
                       jax.random.PRNGKey(0))


def test_image_size_mismatch_is_a_clear_error():
    cfg = tiny_config("meter")
    model = build_model(cfg)
    inputs = example_inputs(cfg)
    inputs["pixel_values"] = np.zeros((2, 48, 48, 3), np.float32)
    with pytest.raises(ValueError, match="image_size 32"):
        jax.eval_shape(lambda r: model.init(r, **inputs), jax.random.PRNGKey(0))


def test_dropout_keeps_a_fraction_q_and_preserves_the_mean():
    from mtower_jax.models.layers import Dropout
    x = jnp.ones((3, 1001, 77))  # an odd size: the last 16-bit half-word is dropped
    layer = Dropout(0.1)
    y = np.asarray(layer.apply({}, x, rngs={"dropout": jax.random.PRNGKey(0)}))
    q = round(0.9 * 2**16) / 2**16
    kept = y != 0
    assert abs(kept.mean() - q) < 0.002
    np.testing.assert_allclose(y[kept], 1 / q, rtol=1e-6)  # the mean is exactly preserved
    again = layer.apply({}, x, rngs={"dropout": jax.random.PRNGKey(0)})
    other = layer.apply({}, x, rngs={"dropout": jax.random.PRNGKey(1)})
    assert np.array_equal(y, again) and not np.array_equal(y, other)
    assert np.array_equal(layer.apply({}, x, deterministic=True), x)
    # Neighbouring elements (the two halves of one random word) are independent.
    pairs = kept.reshape(-1)[: (kept.size // 2) * 2].reshape(-1, 2)
    assert abs((pairs[:, 0] & pairs[:, 1]).mean() - q * q) < 0.002


@pytest.mark.parametrize("n", [1, 2, 7, 4096, 100_003])
def test_random_bits_are_jax_random_bits(n):
    """sampling.random_bits (threefry unrolled) draws jax's own words, for raw and typed keys."""
    from mtower_jax.models import sampling
    for key in (jax.random.PRNGKey(n), jax.random.fold_in(jax.random.key(7), n)):
        ours = jax.jit(sampling.random_bits, static_argnums=1)(key, n)
        assert ours.dtype == jnp.uint32 and ours.shape == (n,)
        np.testing.assert_array_equal(ours, jax.random.bits(key, (n,), jnp.uint32))


def test_sampled_normals_match_the_standard_normal():
    from mtower_jax.models import sampling
    z = np.asarray(sampling.standard_normal(jax.random.PRNGKey(0), (1000, 999)))
    assert z.dtype == np.float32 and abs(z.mean()) < 0.003 and abs(z.std() - 1) < 0.003
    for q, expected in ((0.025, -1.95996), (0.5, 0.0), (0.9, 1.28155)):
        assert abs(np.quantile(z, q) - expected) < 0.01
    assert np.abs(z).max() < 4.34  # the grid's outermost points, +-Phi^-1(2^-17)


@pytest.mark.parametrize("tower", ["manager", "bridge"])
def test_bfloat16_backward_keeps_no_float32_activation(tower):
    """What the backward of a bfloat16 pretraining loss (MLM + ITM) keeps from its forward:
    float32 only for per-row statistics ([..., 1]: LayerNorm means and 1 / std) and per-example
    loss terms, never an activation. A float32 activation kept is a [B, L, D] or
    [B, H, L, L] buffer per layer; each one found in base (LayerNorm's x_hat, the managers'
    weights, the attention probabilities) cost several GiB per chip (docs/SCALING.md)."""
    from jax._src.ad_checkpoint import saved_residuals  # jax.ad_checkpoint prints them only
    from mtower_jax.bench.train_step import bench_config, synthetic_batch
    from mtower_jax.train.tasks import get_task
    config = bench_config("tiny", tower, 4, "bfloat16")
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(config).items()}
    model, task = build_model(config.model), get_task(config)
    params = random_variables(config.model)["params"]

    def loss(params, rng):
        dropout, negatives = jax.random.split(rng)
        terms, _ = model.apply({"params": params}, batch, losses=("mlm", "itm"), train=True,
                               method=task.forward,
                               rngs={"dropout": dropout, "negatives": negatives})
        return sum(term[0] for term in terms.values())
    kept = saved_residuals(loss, params, jax.random.PRNGKey(0))
    activations = [(aval.shape, source) for aval, source in kept
                   if aval.dtype == jnp.float32 and "argument" not in source
                   and aval.ndim >= 3 and aval.shape[-1] > 1]
    assert len(kept) > 100 and not activations, activations


@pytest.mark.parametrize("affine", [True, False], ids=["layer_norm", "standardise"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_gradient_matches_autodiff(affine, dtype):
    from mtower_jax.models.layers import LayerNorm, standardise
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    shape = (3, 5, 7, 16)  # stacked layers [N, B, T, D], as ln_post sees them
    x = (3 * jax.random.normal(keys[0], shape) + 1).astype(dtype)
    variables = {"params": {"scale": 1 + 0.3 * jax.random.normal(keys[1], (16,)),
                            "bias": 0.3 * jax.random.normal(keys[2], (16,))}}
    g = jax.random.normal(keys[3], shape)
    if affine:
        ours = lambda v, x: LayerNorm(1e-5, dtype=dtype).apply(v, x)
    else:  # the managers' shared part of their expert norms; no parameters
        ours = lambda v, x: standardise(x, 1e-5)

    def reference(variables, x):
        scale, bias = variables["params"]["scale"], variables["params"]["bias"]
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        y = (x32 - mean) / jnp.sqrt(((x32 - mean) ** 2).mean(-1, keepdims=True) + 1e-5)
        return (y * scale + bias).astype(dtype) if affine else y

    tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours(variables, x), np.float32),
                               np.asarray(reference(variables, x), np.float32), **tol)
    loss = lambda f: lambda v, x: jnp.sum(g * f(v, x).astype(jnp.float32))
    mine = jax.grad(loss(ours), argnums=(0, 1))(variables, x)
    theirs = jax.grad(loss(reference), argnums=(0, 1))(variables, x)
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)
