"""The pure training step `(state, batch, rng) -> (state, metrics)` of any task
(train/tasks: config.task picks the forward), and its eval twin.

Gradient accumulation: the global batch is split into `grad_accum_steps` micro-batches
(example i goes to micro-batch i mod k, so each stays spread over all devices); each
micro-batch's loss is divided by the *full* batch's counts (masked tokens for MLM, examples
for ITM / ITC), so the summed gradients are the full-batch gradients.

The forward's options (tasks.forward_options: ITM negatives drawn per device shard) are
read off the mesh in use, `jax.set_mesh(mesh)`, when the step is made.

Non-finite guard: if the loss or any gradient is NaN / Inf, params and optimizer state are
kept bit-for-bit (a `lax.cond` skips the update), the step counter still advances (the batch
is consumed) and `metrics['nonfinite'] = 1`; the loop counts it or stops, per
`config.on_nonfinite`.
"""
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mtower_jax.train.mesh import batch_sharding
from mtower_jax.train.optimizer import learning_rate_schedule
from mtower_jax.train.tasks import denominators, forward_options, get_task


def _micro_batches(batch: dict, k: int) -> dict:
    """[B, ...] -> [k, B / k, ...] with example i in micro-batch i mod k."""
    def split(x):
        return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def _metrics(terms: dict, counts: dict) -> dict:
    """Losses and accuracies from summed (loss, count, correct) terms."""
    out = {}
    for name, (loss_sum, _, correct) in terms.items():
        out[f"loss_{name}"] = loss_sum / counts[name]
        out[f"acc_{name}"] = correct / counts[name]
    out["loss"] = sum(out[f"loss_{name}"] for name in terms)
    return out


def make_train_step(config: ml_collections.ConfigDict, model, tx: optax.GradientTransformation
                    ) -> Callable:
    task, losses, k = get_task(config), tuple(config.losses), int(config.grad_accum_steps)
    options = forward_options(config, jax.sharding.get_abstract_mesh())
    schedule = learning_rate_schedule(config.optimizer.lr, config.total_steps,
                                      config.optimizer.warmup_fraction)

    def micro_grads(params, micro: dict, rng: jax.Array, counts: dict):
        def loss_fn(p):
            dropout_rng, negatives_rng = jax.random.split(rng)
            terms, _ = model.apply({"params": p}, micro, losses=losses, train=True,
                                   method=task.forward, **options,
                                   rngs={"dropout": dropout_rng, "negatives": negatives_rng})
            return sum(terms[n][0] / counts[n] for n in losses), terms
        return jax.grad(loss_fn, has_aux=True)(params)

    def train_step(state: dict, batch: dict, rng: jax.Array) -> tuple[dict, dict]:
        params, counts = state["params"], denominators(batch, losses, task)
        if k == 1:
            grads, terms = micro_grads(params, batch, rng, counts)
        else:
            def body(carry, xs):
                micro, micro_rng = xs
                g, t = micro_grads(params, micro, micro_rng, counts)
                return jax.tree.map(jnp.add, carry, (g, t)), None
            zeros = jax.eval_shape(micro_grads, params, jax.tree.map(lambda x: x[0], (
                _micro_batches(batch, k))), rng, counts)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
            (grads, terms), _ = jax.lax.scan(
                body, zeros, (_micro_batches(batch, k), jax.random.split(rng, k)))
        metrics = _metrics(terms, counts)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

        def update(old: dict) -> dict:
            updates, opt_state = tx.update(grads, old["opt_state"], old["params"])
            return {"params": optax.apply_updates(old["params"], updates), "opt_state": opt_state}

        # A branch, not where(finite, new, old) per leaf: that read every old leaf twice and
        # made XLA copy the donated optimizer state (0.12 s of a 1.97 s CPU step at `small`).
        kept = jax.lax.cond(finite, update, lambda old: old,
                            {"params": params, "opt_state": state["opt_state"]})
        metrics.update(grad_norm=grad_norm, lr=schedule(state["step"]),
                       nonfinite=1 - finite.astype(jnp.int32))
        return {**state, **kept, "step": state["step"] + 1}, metrics

    return train_step


def jit_train_step(config: ml_collections.ConfigDict, model, tx: optax.GradientTransformation,
                   abstract_state: dict, mesh: jax.sharding.Mesh):
    """jit(train_step) with the state's shardings (`abstract_state`, from
    create_train_state), the batch split along its first dim, the rng and metrics
    replicated, and the old state's buffers donated to the new one."""
    state_shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(make_train_step(config, model, tx),
                   in_shardings=(state_shardings, batch_sharding(mesh), replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


def make_eval_step(config: ml_collections.ConfigDict, model) -> Callable:
    """(params, batch, rng) -> (summed terms {name: (loss_sum, count, correct)}, per-example
    predictions) on a held-out batch (the rng only draws pretraining's ITM negatives)."""
    task, losses = get_task(config), tuple(config.losses)
    options = forward_options(config, jax.sharding.get_abstract_mesh())

    def eval_step(params, batch: dict, rng: jax.Array) -> tuple[dict, dict]:
        return model.apply({"params": params}, batch, losses=losses, train=False,
                           method=task.forward, **options, rngs={"negatives": rng})
    return eval_step
