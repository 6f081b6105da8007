"""Analytic model FLOPs, per-device peak throughput, and model FLOPs utilisation (MFU).

Convention (PaLM / Chinchilla MFU): only matrix multiplications count, 2 FLOPs per
multiply-add, and a training step costs 3x its forward pass (the backward pass computes a
gradient for both operands of every matmul, 2x the forward):

    dense   x [n, a] @ W [a, b]                       2 n a b
    attn    Lq queries over Lk keys, width D          4 Lq D^2 (Q, out) + 4 Lk D^2 (K, V)
                                                      + 4 Lq Lk D (scores Q K^T, weighted sum P V)
    FFN     L tokens, width D, hidden F               4 L D F
    train   3 x forward;    MFU = step FLOPs / (step seconds * devices * peak FLOP/s)

Not counted: embedding gathers, LayerNorm, softmax, activations, residual adds, the
managers' expert mix sum_n alpha_n X_n and the losses (elementwise; XLA's own count includes
them, hence its larger total, see tests/test_flops.py), the AAUE managers' [D, D] weight
products (`aaue_weight_product_flops`: once per fusion call, whatever the batch; 0.2% of a
`small` step at batch 32), and recomputation: of
`model.remat`, and of the MLM logits, which the blockwise loss (models/vocab_decoder.py)
makes again in its backward pass (MFU counts the model's FLOPs, not the hardware's).
Padding tokens cost the same as real ones: the model always runs on `max_text_len` tokens. `model.scan_layers` changes
nothing: a scanned encoder does the same matmuls, num_layers times (traced_matmul_flops counts
a scan body `length` times; XLA's cost_analysis counts it once).

The work of one example is described by `passes`, a dict of counts per example:

    text_encodes       RoBERTa passes over max_text_len tokens
    image_encodes      CLIP-ViT passes over 1 + (image_size / patch_size)^2 tokens
    fusions            cross-modal passes whose every output is computed (model.__call__)
    prepared_fusions   cross-modal passes (every output computed) on images whose transform
                       prepare_image took (ITM in pretraining and retrieval)
    text_only_fusions  cross-modal passes of which only the text stream's output is read
                       (MLM): its last text layer runs for the mlm_positions queries, and XLA
                       drops the last image-stream layer and the poolers as dead code
    image_prepares     image transforms into the cross-modal width taken once, outside the
                       fusions (Backbone.prepare_image): prepared and text-only fusions
                       read prepared images, so their own image transform is not counted
    mlm_positions      text positions run through the MLM head: the cap k of masked
                       positions objectives.py gathers (config.mlm_max_predictions), or
                       max_text_len when it decodes every position
    itm                ITM head applications
    itc_batch          ITC: the batch one similarity matrix covers (0: no ITC); per example the
                       two projections and one row of the [B, B] similarity
"""
from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtower_jax.data.examples import mlm_max_predictions
from mtower_jax.models.towers import num_uni_modal_inputs

PASS_KEYS = ("text_encodes", "image_encodes", "fusions", "prepared_fusions", "text_only_fusions",
             "image_prepares", "mlm_positions",
             "itm", "itc_batch")
TRAIN_FACTOR = 3  # forward + backward (2x forward)


def _dense(tokens: float, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def _attention(q_len: int, kv_len: int, width: int) -> float:
    return (_dense(q_len, width, 2 * width) + _dense(kv_len, width, 2 * width)
            + 4.0 * q_len * kv_len * width)


def _block(q_len: int, width: int, mlp_dim: int, *, cross_len: int = 0,
           kv_len: int | None = None) -> float:
    """One transformer layer of q_len tokens (queries) over kv_len (default q_len) keys;
    with cross_len, plus cross-attention to them."""
    cross = _attention(q_len, cross_len, width) if cross_len else 0.0
    self_attention = _attention(q_len, q_len if kv_len is None else kv_len, width)
    return self_attention + cross + _dense(q_len, width, 2 * mlp_dim)


def sequence_lengths(model_cfg: ml_collections.ConfigDict) -> tuple[int, int]:
    """(text tokens, image tokens) of one example: (max_text_len, 1 + patches)."""
    v = model_cfg.vision
    return model_cfg.max_text_len, (v.image_size // v.patch_size) ** 2 + 1


def text_encoder_flops(model_cfg: ml_collections.ConfigDict) -> float:
    t, (length, _) = model_cfg.text, sequence_lengths(model_cfg)
    return t.num_layers * _block(length, t.hidden_size, t.mlp_dim)


def image_encoder_flops(model_cfg: ml_collections.ConfigDict) -> float:
    v, (_, tokens) = model_cfg.vision, sequence_lengths(model_cfg)
    patch_embedding = _dense(tokens - 1, v.patch_size ** 2 * 3, v.hidden_size)
    return patch_embedding + v.num_layers * _block(tokens, v.hidden_size, v.mlp_dim)


def _aaue_flops(q_len: int, other_len: int, width: int, experts: int) -> float:
    """The shorter stream through W_q W_k^T (key_proj folded in, managers.AAUE; the [D, D]
    product, once per batch, is left out) and, when that is the other stream, its keys
    against b_q W_k^T; single-head scores and mix; controller([a ; c]) -> N."""
    if q_len <= other_len:
        projection = _dense(q_len, width, width)
    else:
        projection = _dense(other_len, width, width) + _dense(other_len, width, 1)
    return (projection + 4.0 * q_len * other_len * width
            + _dense(q_len, 2 * width, experts))


def aaue_weight_product_flops(model_cfg: ml_collections.ConfigDict) -> float:
    """Forward FLOPs of one fusion call's AAUE weight products, W_q W_k^T [D, D] and
    b_q W_k^T, one per AAUE manager of each stream: a per-call cost, not per example."""
    c = model_cfg.cross
    if model_cfg.tower != "manager" or model_cfg.manager.type != "AAUE":
        return 0.0
    return 2 * (c.num_layers - 1) * (2.0 * c.hidden_size ** 3 + 2.0 * c.hidden_size ** 2)


def image_transform_flops(model_cfg: ml_collections.ConfigDict) -> float:
    """The image stream's uni-modal -> cross-modal transform of the layers it sends across."""
    _, tokens = sequence_lengths(model_cfg)
    k = num_uni_modal_inputs(model_cfg)
    return _dense(k * tokens, model_cfg.vision.hidden_size, model_cfg.cross.hidden_size)


def fusion_flops(model_cfg: ml_collections.ConfigDict, *, text_only: bool = False,
                 text_queries: int | None = None, prepared_image: bool = False) -> float:
    """One cross-modal pass: transforms, managers, both co-attention stacks, poolers
    (prepared_image: without the image transform, which prepare_image took).

    text_only: only text_feats is read, so the last image-stream layer and both poolers are
    dead code (C^text_L reads the image stream's *input* to layer L, not its output).
    text_queries: the tokens the last text layer runs for (None: all; MLM: its positions).
    """
    c, t = model_cfg.cross, model_cfg.text
    length, tokens = sequence_lengths(model_cfg)
    d, k = c.hidden_size, num_uni_modal_inputs(model_cfg)
    flops = _dense(k * length, t.hidden_size, d)
    if not prepared_image:
        flops += image_transform_flops(model_cfg)
    text_layer = lambda q: _block(q, d, c.mlp_dim, cross_len=tokens, kv_len=length)
    image_layer = _block(tokens, d, c.mlp_dim, cross_len=length)
    flops += (c.num_layers - 1) * text_layer(length) + text_layer(
        length if text_queries is None else text_queries)
    flops += (c.num_layers - (1 if text_only else 0)) * image_layer
    if model_cfg.tower == "manager" and model_cfg.manager.type == "AAUE":
        n = model_cfg.manager.num_layers  # layer 1 is SAUE: elementwise only
        flops += (c.num_layers - 1) * (_aaue_flops(length, tokens, d, n)
                                       + _aaue_flops(tokens, length, d, n))
    if not text_only:
        flops += 2 * _dense(1, d, d)  # poolers on token 0
    return flops


def forward_flops_breakdown(model_cfg: ml_collections.ConfigDict, *,
                            passes: Mapping[str, float]) -> dict[str, float]:
    """Forward matmul FLOPs of one example by part, for the work `passes` describes."""
    unknown = set(passes) - set(PASS_KEYS)
    if unknown:
        raise ValueError(f"unknown passes keys {sorted(unknown)}; known: {PASS_KEYS}")
    p = {key: passes.get(key, 0) for key in PASS_KEYS}
    d, t, v = model_cfg.cross.hidden_size, model_cfg.text, model_cfg.vision
    mlm = _dense(1, d, d) + _dense(1, d, t.vocab_size)  # transform + decoder, per position
    itc = (_dense(1, t.hidden_size, model_cfg.itc_dim) + _dense(1, v.hidden_size, model_cfg.itc_dim)
           + 2.0 * p["itc_batch"] * model_cfg.itc_dim) if p["itc_batch"] else 0.0
    return {
        "text_encoder": p["text_encodes"] * text_encoder_flops(model_cfg),
        "image_encoder": p["image_encodes"] * image_encoder_flops(model_cfg),
        "fusion": (p["fusions"] * fusion_flops(model_cfg)
                   + p["prepared_fusions"] * fusion_flops(model_cfg, prepared_image=True)
                   + p["text_only_fusions"] * fusion_flops(
                       model_cfg, text_only=True, text_queries=int(p["mlm_positions"]) or None,
                       prepared_image=True)
                   + p["image_prepares"] * image_transform_flops(model_cfg)),
        "mlm_head": p["mlm_positions"] * mlm,
        "itm_head": p["itm"] * _dense(1, 2 * d, 2),
        "itc_head": itc,
    }


def forward_flops(model_cfg: ml_collections.ConfigDict, *, passes: Mapping[str, float]) -> float:
    """Forward matmul FLOPs of one example (see the module docstring for `passes`)."""
    return sum(forward_flops_breakdown(model_cfg, passes=passes).values())


def model_flops_per_example(model_cfg: ml_collections.ConfigDict, *,
                            passes: Mapping[str, float]) -> float:
    """Training FLOPs of one example: 3 x forward_flops."""
    return TRAIN_FACTOR * forward_flops(model_cfg, passes=passes)


def pretrain_passes(*, image_encodes_per_example: float, mlm_positions: float,
                    itc_batch: int = 0) -> dict[str, float]:
    """The per-example work of objectives.pretrain_forward with MLM + ITM (+ ITC): the masked
    and the clean text are encoded (2), MLM reads only the text stream of its fusion (the
    last layer at the masked positions), ITM fuses the clean text with its (maybe negative)
    image; the image transform is taken once per image encoding.
    image_encodes_per_example: 1 when negatives reuse the batch's encodings, 2 with dataset
    negatives."""
    return dict(text_encodes=2, image_encodes=image_encodes_per_example, prepared_fusions=1,
                text_only_fusions=1, image_prepares=image_encodes_per_example,
                mlm_positions=mlm_positions, itm=1, itc_batch=itc_batch)


def pretrain_step_flops(model_cfg: ml_collections.ConfigDict, batch_size: int, *,
                        image_encodes_per_example: float, mlm_positions: float,
                        itc_batch: int = 0) -> float:
    """Training FLOPs of one pretraining step over `batch_size` examples (global batch)."""
    passes = pretrain_passes(image_encodes_per_example=image_encodes_per_example,
                             mlm_positions=mlm_positions, itc_batch=itc_batch)
    return batch_size * model_flops_per_example(model_cfg, passes=passes)


def _mlm_positions(config: ml_collections.ConfigDict) -> int:
    """Positions per text the MLM head decodes: the cap k, else all max_text_len."""
    k = mlm_max_predictions(config)
    return config.model.max_text_len if k is None else k


def train_step_flops(config: ml_collections.ConfigDict) -> float:
    """Training FLOPs of one step of the run `config` (its task, losses and global batch).

    Fine-tuning passes per example: VQA / SNLI-VE one encode of each modality and one
    fusion; NLVR2 two images and two fusions; retrieval ITC over the batch plus ITM on three
    fusions (the positive and two hard negatives). Classifier heads are not counted (< 0.1%
    of a base step)."""
    task, batch, m = config.get("task", "pretrain"), config.batch_size, config.model
    if task == "pretrain":
        dataset_negatives = config.data.get("itm_negatives", "batch") == "dataset"
        return pretrain_step_flops(
            m, batch, image_encodes_per_example=2 if dataset_negatives else 1,
            mlm_positions=_mlm_positions(config) if "mlm" in config.losses else 0,
            itc_batch=batch if "itc" in config.losses else 0)
    passes = dict(text_encodes=1, image_encodes=1, fusions=1)
    if task == "nlvr2":
        passes.update(image_encodes=2, fusions=2)
    if task == "retrieval":
        passes.update(fusions=0, prepared_fusions=3, image_prepares=1, itm=3, itc_batch=batch)
    return batch * model_flops_per_example(m, passes=passes)


def traced_matmul_flops(fn: Callable[..., Any], *args, **kwargs) -> float:
    """2 x the multiply-adds of every dot_general in fn's jaxpr (einsum, @, tensordot...):
    the analytic convention applied to the traced program. Scan bodies count `length` times,
    a cond its most expensive branch, a while body once. Convolutions are not counted."""
    def count(jaxpr) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (lhs_contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
                    lhs[i] for i in lhs_contract)
                continue
            subs = [count(getattr(s, "jaxpr", s)) for value in eqn.params.values()
                    for s in (value if isinstance(value, tuple | list) else (value,))
                    if isinstance(s, jax.extend.core.Jaxpr | jax.extend.core.ClosedJaxpr)]
            if eqn.primitive.name == "cond":
                total += max(subs, default=0.0)
            else:
                total += sum(subs) * eqn.params.get("length", 1)  # scan repeats its body
        return total

    return count(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


# Dense (no sparsity) peak TFLOP/s per jax device. 'float32' is the rate JAX's *default*
# matmul precision reaches on float32 operands: one bfloat16 pass on TPU, TF32 tensor cores on
# NVIDIA Ampere and later (https://docs.jax.dev/en/latest/201/precision.html); full-float32
# precision ('highest') is several times slower. Sources: Google Cloud TPU system
# architecture pages, NVIDIA A100 / H100 / H200 datasheets (SXM unless named).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "tpu_v4": {"bfloat16": 275.0, "float32": 275.0},
    "tpu_v5e": {"bfloat16": 197.0, "float32": 197.0},
    "tpu_v5p": {"bfloat16": 459.0, "float32": 459.0},
    "tpu_v6e": {"bfloat16": 918.0, "float32": 918.0},
    "a100": {"bfloat16": 312.0, "float32": 156.0},
    "h100_sxm": {"bfloat16": 989.4, "float32": 494.7},
    "h100_pcie": {"bfloat16": 756.0, "float32": 378.0},
    "h200": {"bfloat16": 989.4, "float32": 494.7},
}

# jax `device_kind` strings (exact, lower case) of the TPU entries; a TPU v5e reports
# 'TPU v5 lite', a v5p 'TPU v5', a v6e 'TPU v6 lite'; 'TPU v4 lite' (v4i) is not a v4.
_TPU_KINDS = {"tpu v4": "tpu_v4", "tpu v5 lite": "tpu_v5e", "tpu v5e": "tpu_v5e",
              "tpu v5": "tpu_v5p", "tpu v5p": "tpu_v5p", "tpu v6 lite": "tpu_v6e",
              "tpu v6e": "tpu_v6e"}


def device_table_key(device_kind: str) -> str | None:
    """The PEAK_TFLOPS key of a jax device_kind ('NVIDIA H100 80GB HBM3' -> 'h100_sxm'), or
    None when the table does not hold it (CPUs, other accelerators)."""
    kind = device_kind.lower()
    if kind in _TPU_KINDS:
        return _TPU_KINDS[kind]
    if "h200" in kind:
        return "h200"
    if "h100" in kind:  # the SXM part reports 'NVIDIA H100 80GB HBM3'; NVL is neither
        return "h100_pcie" if "pcie" in kind else "h100_sxm" if ("hbm3" in kind or "sxm" in kind) \
            else None
    if "a100" in kind:  # SXM4 and PCIe share the peak
        return "a100"
    return None


def _dtype_name(dtype: Any) -> str:
    name = jnp.dtype(dtype).name
    if name not in ("bfloat16", "float32"):
        raise ValueError(f"peak tables hold bfloat16 and float32, not {name}")
    return name


def measure_matmul_peak_tflops(dtype: Any = jnp.float32, *, size: int | None = None,
                               repeats: int = 5, device: jax.Device | None = None) -> float:
    """Median TFLOP/s of a jitted [size, size] @ [size, size] matmul (2 size^3 FLOPs) on
    `device` (default: this process's first), after one warm-up call. An achievable peak: it
    includes dispatch, so size must be large enough for the matmul to dominate. Default: 2048
    on a CPU (34 GFLOP: 0.1-1 s), 8192 on an accelerator (1.1 TFLOP: ~1.4 ms on an H100; at
    2048 a GPU finishes in ~25 us and dispatch would understate its peak)."""
    device = device or jax.local_devices()[0]
    size = size or (2048 if device.platform == "cpu" else 8192)
    dtype = jnp.dtype(_dtype_name(dtype))
    rng = np.random.default_rng(0)
    a, b = (jax.device_put(rng.standard_normal((size, size), np.float32).astype(dtype), device)
            for _ in range(2))
    matmul = jax.jit(jnp.matmul)
    # A mesh of this one device: inside a run's `jax.set_mesh`, jit would otherwise expect
    # operands on all of the run's devices, most of them not this process's.
    with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ("device",))):
        matmul(a, b).block_until_ready()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            matmul(a, b).block_until_ready()
            seconds.append(time.perf_counter() - start)
    return 2.0 * size ** 3 / statistics.median(seconds) / 1e12


@functools.cache
def _measured_peak(device: jax.Device, dtype_name: str) -> float:
    return measure_matmul_peak_tflops(dtype_name, device=device)


def peak_tflops(device: jax.Device | None = None, dtype: Any = jnp.bfloat16) -> float:
    """Peak dense TFLOP/s of one device for matmuls in `dtype`: the table entry of its
    device_kind, else a measurement (cached per device and dtype; takes a few seconds)."""
    device = device or jax.local_devices()[0]
    name = _dtype_name(dtype)
    key = device_table_key(device.device_kind)
    return PEAK_TFLOPS[key][name] if key else _measured_peak(device, name)


def mfu(step_flops: float, step_seconds: float, num_devices: int, peak: float) -> float:
    """Model FLOPs utilisation: step_flops / (step_seconds * num_devices * peak * 1e12),
    with `peak` in TFLOP/s per device (peak_tflops)."""
    return step_flops / (step_seconds * num_devices * peak * 1e12)
