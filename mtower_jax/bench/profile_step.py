"""Where a pretraining step's time goes: each part of the step jitted and timed on its own,
forward + backward, on the benchmark's batch (bench/train_step.py):

    python -m mtower_jax.bench.profile_step --model=small --tower=manager

    image encoder   encode_image(pixels), once per step
    text encoder    encode_text(ids) x 2 (masked text for MLM, clean text for ITM)
    fusion_mlm      fuse(...) read for MLM: the text stream's last layer at the masked
                    positions only (XLA drops the image stream's last layer and the poolers)
    fusion_itm      fuse(...) read for ITM: the poolers. Each fusion holds the transforms,
                    the managers / bridges and the cross-modal layers
    heads + losses  MLM head and loss at the masked positions (vocabulary blocks), ITM head
    optimizer       AdamW update of every parameter (optax, with the step's groups)

Each part's time is the median over `--repeats` calls; `step` is the whole jitted train step,
and `sum - step` what XLA saves by compiling the parts together (or loses). Prints one JSON
line of seconds per part, and their fractions of the sum.
"""
from __future__ import annotations

import json
import statistics
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from mtower_jax.bench.train_step import (OursRunner, bench_config, median_seconds,
                                         synthetic_batch)
from mtower_jax.train.objectives import cross_entropy_sum, masked_sums

_MODEL = flags.DEFINE_enum("model", "small", ["tiny", "small", "base", "large"], "Model size.")
_TOWER = flags.DEFINE_enum("tower", "manager", ["manager", "bridge", "meter"], "Tower.")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per part.")


def _sum_all(tree) -> jax.Array:
    """A scalar that reads every leaf (the backward pass then runs through all of them)."""
    return sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(tree)
               if jnp.issubdtype(x.dtype, jnp.floating))


def profile(model_size: str, tower: str, batch: int, dtype: str, repeats: int) -> dict:
    config = bench_config(model_size, tower, batch, dtype)
    runner = OursRunner(config, synthetic_batch(config))
    b, params = runner.batch, runner.state["params"]
    model = runner.model
    rngs = {"dropout": jax.random.PRNGKey(1), "negatives": jax.random.PRNGKey(2)}
    mask = b["attention_mask"]

    def apply(method, p, *args):
        return model.apply({"params": p}, *args, method=method, rngs=rngs)

    def grad_of(f: Callable, argnums: tuple[int, ...] = (0, 1)) -> Callable:
        """Forward + backward of f: gradients for the params and the float inputs."""
        return jax.jit(jax.grad(lambda p, *args: _sum_all(f(p, *args)), argnums=argnums))

    with runner.context():
        encode_image = lambda m, px: m.backbone.encode_image(px, True)
        encode_text = lambda m, ids, msk: m.backbone.encode_text(ids, msk, True)
        image = jax.jit(lambda p, px: apply(encode_image, p, px))(params, b["pixel_values"])
        text = jax.jit(lambda p, ids: apply(encode_text, p, ids, mask))(params, b["input_ids"])

        def fuse(p, encoded, **positions):  # as objectives.pretrain_forward reads them
            t, i = encoded
            return apply(lambda m, t, i: m.backbone.fuse(t, mask, i, True, **positions), p, t, i)
        mlm_read = dict(text_positions=b["mlm_positions"])
        mlm_feats = jax.jit(lambda p, e: fuse(p, e, **mlm_read))(params, (text, image))
        cls_feats = jax.jit(fuse)(params, (text, image))

        def heads(p, feats):
            text_feats, cls_feats = feats
            def forward(m, text_feats, cls_feats):
                labels = jnp.take_along_axis(b["mlm_labels"], b["mlm_positions"], axis=1)
                mlm = m.head("mlm")({"text_feats": text_feats,
                                     "mlm_labels": jnp.maximum(labels, 0)}, True)
                itm = m.head("itm")({"cls_feats": cls_feats}, True)["itm_logits"]
                valid = jnp.ones(labels.shape[0], bool)
                return (masked_sums(mlm["mlm_cross_entropy"], mlm["mlm_correct"], labels >= 0)[0]
                        + cross_entropy_sum(itm, b["record_index"] % 2, valid)[0])
            return apply(forward, p, text_feats, cls_feats)

        tx, opt_state = runner.tx, runner.state["opt_state"]
        update = jax.jit(lambda g, s, p: optax.apply_updates(p, tx.update(g, s, p)[0]))
        parts = {
            "image_encoder": (grad_of(lambda p, px: apply(encode_image, p, px)["outputs"]),
                              (params, b["pixel_values"]), 1),
            "text_encoder": (grad_of(lambda p, ids: apply(encode_text, p, ids, mask)["outputs"],
                                     argnums=(0,)), (params, b["input_ids"]), 2),
            "fusion_mlm": (grad_of(lambda p, e: fuse(p, e, **mlm_read)["text_feats"]),
                           (params, (text, image)), 1),
            "fusion_itm": (grad_of(lambda p, e: fuse(p, e)["cls_feats"]),
                           (params, (text, image)), 1),
            "heads_and_losses": (grad_of(heads), (params, (mlm_feats["text_feats"],
                                                           cls_feats["cls_feats"])), 1),
            "optimizer": (update, (params, opt_state, params), 1),
        }
        seconds = {name: times * median_seconds(fn, args, repeats)
                   for name, (fn, args, times) in parts.items()}
        step = statistics.median(runner.run(1) for _ in range(repeats))
    total = sum(seconds.values())
    return {"model": model_size, "tower": tower, "batch": batch, "dtype": dtype,
            "device": jax.local_devices()[0].device_kind, "seconds": seconds,
            "fractions": {k: v / total for k, v in seconds.items()},
            "sum_s": total, "step_s": step}


def main(argv: list[str]) -> None:
    del argv
    print(json.dumps(profile(_MODEL.value, _TOWER.value, _BATCH.value, _DTYPE.value,
                             _REPEATS.value)))


if __name__ == "__main__":
    app.run(main)
