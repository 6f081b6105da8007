"""The analytic FLOP count against the traced program and XLA's cost analysis; peaks and MFU."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from mtower_jax.models import build_model, example_inputs, model_config, random_inputs
from mtower_jax.train import flops

VARIANTS = {
    "manager-AAUE": tiny_config("manager"),
    "manager-SAUE": tiny_config("manager", **{"manager.type": "SAUE"}),
    "bridge": tiny_config("bridge"),
    "meter": tiny_config("meter"),
}


def forward_fn(cfg, *, keys=None, batch_size: int = 1):
    """(eval forward of the model -> outputs, or only `keys` of them; abstract params; inputs)."""
    model = build_model(cfg)
    inputs = example_inputs(cfg, batch_size)
    params = jax.eval_shape(lambda rng: model.init(rng, **inputs), jax.random.PRNGKey(0))

    def forward(variables, x):
        out = model.apply(variables, **x, train=False)
        return out if keys is None else {k: out[k] for k in keys}
    return forward, params, inputs


def model_forward_passes(cfg) -> dict:
    """What one call of the model does: both encoders, one fusion, MLM at every position, ITM."""
    return dict(text_encodes=1, image_encodes=1, fusions=1, mlm_positions=cfg.max_text_len, itm=1)


def xla_flops(fn, *args) -> float:
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_analytic_count_equals_the_traced_matmuls(name):
    cfg = VARIANTS[name]
    forward, params, inputs = forward_fn(cfg, batch_size=2)
    traced = flops.traced_matmul_flops(forward, params, inputs)
    assert traced == (2 * flops.forward_flops(cfg, passes=model_forward_passes(cfg))
                      + flops.aaue_weight_product_flops(cfg))


def test_xla_cost_analysis_agrees():
    """XLA also counts elementwise work (LayerNorm, erf GELU, softmax, bias adds: ~ D per
    token against the matmuls' ~ D^2), so it lies above the analytic count: 11% at tiny
    (width 64), 2% at small (width 256). Dropping the MLM fusion's dead image-stream layer
    and poolers (`text_only_fusions`) is what XLA's dead-code elimination does too."""
    cfg = model_config("tiny")
    analytic = flops.forward_flops(cfg, passes=model_forward_passes(cfg))
    forward, params, inputs = forward_fn(cfg)
    full = xla_flops(forward, params, inputs)
    assert 0.85 < analytic / full < 1.0
    mlm_only = xla_flops(forward_fn(cfg, keys=("mlm_logits",))[0], params, inputs)
    text_only = flops.forward_flops(cfg, passes=dict(text_encodes=1, image_encodes=1,
                                                     text_only_fusions=1,
                                                     mlm_positions=cfg.max_text_len))
    assert 0.85 < text_only / mlm_only < 1.0
    np.testing.assert_allclose(full - mlm_only, analytic - text_only, rtol=0.2)

    small = model_config("small")
    forward, params, inputs = forward_fn(small)
    ratio = (flops.forward_flops(small, passes=model_forward_passes(small))
             + flops.aaue_weight_product_flops(small)) / xla_flops(forward, params, inputs)
    assert 0.97 < ratio < 1.0


def test_backward_costs_twice_the_forward():
    cfg = model_config("tiny")
    forward, params, inputs = forward_fn(cfg, keys=("mlm_logits", "itm_logits"))

    def loss(variables, x):
        return sum(jnp.sum(v) for v in forward(variables, x).values())

    ratio = (flops.traced_matmul_flops(jax.grad(loss), params, inputs)
             / flops.traced_matmul_flops(loss, params, inputs))
    # 3 less the input gradient of the patch embedding (pixels need none): 2.991.
    assert flops.TRAIN_FACTOR - 0.02 < ratio <= flops.TRAIN_FACTOR


@pytest.mark.parametrize("losses", [("mlm", "itm"), ("mlm", "itm", "itc")])
def test_pretrain_passes_match_the_objective(losses):
    """objectives.pretrain_forward traced: its matmuls are the analytic pretraining count plus
    the work XLA removes as dead (the MLM fusion's last image layer and poolers)."""
    from mtower_jax.train.objectives import pretrain_forward

    cfg = tiny_config("manager")
    cfg.heads = ("mlm", "itm", "itc")
    model, batch_size = build_model(cfg), 4
    x = random_inputs(cfg, batch_size)
    params = jax.eval_shape(lambda rng: model.init(rng, **x), jax.random.PRNGKey(0))
    batch = dict(x, mlm_input_ids=x["input_ids"], mlm_labels=x["input_ids"],
                 record_index=np.arange(batch_size, dtype=np.int32))

    def forward(variables, batch, rng):
        drop, negatives = jax.random.split(rng)
        return model.apply(variables, batch, losses=losses, train=True, method=pretrain_forward,
                           rngs={"dropout": drop, "negatives": negatives})

    traced = flops.traced_matmul_flops(forward, params, batch, jax.random.PRNGKey(0))
    passes = flops.pretrain_passes(image_encodes_per_example=1, mlm_positions=cfg.max_text_len,
                                   itc_batch=batch_size if "itc" in losses else 0)
    dead = flops.fusion_flops(cfg) - flops.fusion_flops(cfg, text_only=True)
    per_call = 2 * flops.aaue_weight_product_flops(cfg)  # the MLM and the ITM fusion
    assert traced == batch_size * (flops.forward_flops(cfg, passes=passes) + dead) + per_call
    assert flops.pretrain_step_flops(
        cfg, batch_size, image_encodes_per_example=1, mlm_positions=cfg.max_text_len,
        itc_batch=passes["itc_batch"]) == 3 * batch_size * flops.forward_flops(cfg, passes=passes)


def test_managers_add_little_and_masked_mlm_saves_a_lot():
    for size in ("small", "base"):
        step = {tower: flops.pretrain_step_flops(model_config(size, tower), 1,
                                                 image_encodes_per_example=1,
                                                 mlm_positions=model_config(size).max_text_len)
                for tower in ("meter", "bridge", "manager")}
        # The bridge tower sends more layers through the transforms; managers add the AAUE
        # projections and attention (6% at base: the text managers' key_proj reads 325 tokens).
        assert step["meter"] < step["bridge"] < step["manager"] < 1.07 * step["bridge"]
    small = model_config("small")
    every = flops.pretrain_step_flops(small, 1, image_encodes_per_example=1,
                                      mlm_positions=small.max_text_len)
    masked = flops.pretrain_step_flops(small, 1, image_encodes_per_example=1,
                                       mlm_positions=round(0.15 * small.max_text_len))
    assert masked < 0.8 * every  # small's 50k-word decoder dominates its tiny encoders
    with pytest.raises(ValueError, match="unknown passes"):
        flops.forward_flops(small, passes=dict(text_encode=1))


def test_device_kinds_and_mfu():
    kinds = {"TPU v4": "tpu_v4", "TPU v5 lite": "tpu_v5e", "TPU v5": "tpu_v5p",
             "TPU v6 lite": "tpu_v6e", "NVIDIA A100-SXM4-80GB": "a100",
             "NVIDIA H100 80GB HBM3": "h100_sxm", "NVIDIA H100 PCIe": "h100_pcie",
             "NVIDIA H200": "h200", "TPU v4 lite": None, "cpu": None}
    assert {kind: flops.device_table_key(kind) for kind in kinds} == kinds
    assert flops.mfu(1e15, 2.0, 4, 250.0) == pytest.approx(0.5)


def test_cpu_peak_is_measured_and_cached():
    start = time.perf_counter()
    tflops = flops.measure_matmul_peak_tflops(jnp.float32, size=256, repeats=3)
    assert tflops > 0 and time.perf_counter() - start < 5
    cpu = jax.devices("cpu")[0]
    first = flops.peak_tflops(cpu, jnp.float32)
    start = time.perf_counter()
    assert flops.peak_tflops(cpu, "float32") == first > 0
    assert time.perf_counter() - start < 0.01  # the cache answers
