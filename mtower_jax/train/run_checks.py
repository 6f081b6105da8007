"""The training values of a run config, checked before anything is built or written.

A value out of range would otherwise surface late and far from its cause: a ZeroDivisionError
at the first log line (`log_every=0`), a reshape error inside the traced step
(`grad_accum_steps` not dividing the batch), a checkpoint that Orbax never finalises
(`keep_checkpoints=0`), or no error at all (a negative learning rate trains uphill).
`validate` raises one ValueError listing every such value with its rule. The model part is
checked by `models.config.validate`, the task and its losses by `train.tasks.get_task`;
`check_run` makes all three checks, as a run does before it writes anything (and a sweep for
each of its runs before it launches one). `check_mesh` checks what depends on the devices.
"""
from __future__ import annotations

import ml_collections

from mtower_jax.data.examples import ITM_NEGATIVES
from mtower_jax.models.config import validate as validate_model
from mtower_jax.train.evaluation import eval_batch_size
from mtower_jax.train.tasks import forward_options, get_task

NONFINITE_POLICIES = ("skip", "stop")  # a step with a non-finite loss: skipped, or the run stops


def check_run(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError at the first of the task, the model and the training values that
    has a problem (each message lists all of its own)."""
    get_task(config)  # config.task and config.losses agree
    validate(config)
    validate_model(config.model)


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming each out-of-range training value of `config` (pretraining or
    fine-tuning), or returns None."""
    errors = []

    def need(ok: bool, key: str, value, rule: str) -> None:
        if not ok:
            errors.append(f"config.{key}={value!r} {rule}")

    batch, accum = config.batch_size, config.get("grad_accum_steps", 1)
    need(batch > 0, "batch_size", batch, "must be > 0 (the global batch)")
    need(accum >= 1, "grad_accum_steps", accum, "must be >= 1")
    if batch > 0 and accum >= 1:
        need(batch % accum == 0, "grad_accum_steps", accum,
             f"must divide config.batch_size={batch}: each micro-batch is batch_size / "
             "grad_accum_steps examples")

    opt = config.optimizer
    need(opt.lr > 0, "optimizer.lr", opt.lr, "must be > 0 (the peak learning rate)")
    need(0 <= opt.warmup_fraction <= 1, "optimizer.warmup_fraction", opt.warmup_fraction,
         "must be in [0, 1] (the share of total_steps spent warming up)")
    need(opt.weight_decay >= 0, "optimizer.weight_decay", opt.weight_decay, "must be >= 0")
    for key in ("b1", "b2"):
        need(0 <= opt[key] < 1, f"optimizer.{key}", opt[key], "must be in [0, 1)")
    need(opt.eps > 0, "optimizer.eps", opt.eps, "must be > 0")
    need(opt.grad_clip_norm >= 0, "optimizer.grad_clip_norm", opt.grad_clip_norm,
         "must be >= 0 (0: no clipping)")
    for group, factor in opt.lr_multipliers.items():
        need(factor > 0, f"optimizer.lr_multipliers.{group}", factor, "must be > 0")

    need(config.on_nonfinite in NONFINITE_POLICIES, "on_nonfinite", config.on_nonfinite,
         f"must be one of {NONFINITE_POLICIES}")
    seed = config.get("seed", 0)
    need(0 <= seed < 2**32, "seed", seed, "must be in [0, 2^32)")
    if "mlm" in config.get("losses", ()):
        p = config.get("mlm_probability", 0.15)
        need(0 < p <= 1, "mlm_probability", p, "must be in (0, 1] (the share of tokens masked)")
    for key in ("log_every", "checkpoint_every"):
        need(config[key] > 0, key, config[key], "must be > 0 (steps)")
    need(config.keep_checkpoints >= 1, "keep_checkpoints", config.keep_checkpoints,
         "must be >= 1: a run resumes from its newest checkpoint")
    need(config.eval_every >= -1, "eval_every", config.eval_every,
         "must be > 0 (steps), 0 (only at the end) or -1 (never)")
    need(config.get("eval_steps", 0) >= 0, "eval_steps", config.get("eval_steps", 0),
         "must be >= 0 (batches per periodic evaluation; 0: the whole split)")
    need(config.get("eval_batch_size", 0) >= 0, "eval_batch_size",
         config.get("eval_batch_size", 0), "must be >= 0 (0: config.batch_size)")
    negatives = config.data.get("itm_negatives", "batch")
    need(negatives in ITM_NEGATIVES, "data.itm_negatives", negatives,
         f"must be one of {ITM_NEGATIVES}")
    need(not (config.get("task") == "retrieval" and negatives == "dataset"),
         "data.itm_negatives", negatives,
         "does not apply to retrieval, whose hard negatives come from the batch's ITC "
         "similarities: use 'batch' or 'shard'")
    if errors:
        raise ValueError("the run config has invalid values; fix them with "
                         "--config.KEY=VALUE:\n  " + "\n  ".join(errors))


def check_mesh(config: ml_collections.ConfigDict, mesh, evaluates: bool = True) -> None:
    """Raises ValueError if the batches cannot be drawn from on `mesh`: with
    data.itm_negatives='shard', every training micro-batch and (if the run `evaluates`)
    evaluation batch must split into the mesh's batch shards with two examples or more in
    each (one has no negative)."""
    groups = forward_options(config, mesh).get("itm_negative_groups", 1)
    if groups == 1:
        return
    batches = {"batch_size / grad_accum_steps":
               config.batch_size // config.get("grad_accum_steps", 1)}
    if evaluates:
        batches["eval_batch_size"] = eval_batch_size(config)
    bad = {name: size for name, size in batches.items() if size % groups or size < 2 * groups}
    if bad:
        raise ValueError(
            f"config.data.itm_negatives='shard' draws each ITM negative within the example's "
            f"own shard of the batch ({groups} shards: mesh data x fsdp), so every batch must "
            f"split into {groups} groups of 2 examples or more; these do not: {bad}. Use "
            f"multiples of {groups} that are >= {2 * groups}, or itm_negatives='batch'")
