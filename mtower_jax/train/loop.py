"""The pretraining run, top to bottom:

    mesh, rules        from config.mesh (train/mesh.py)
    data               grain iterators of the train and eval splits (data/pipeline.py)
    state              resume from DIR/checkpoints, else init_from, else fresh init
    step               jit(train_step) with explicit shardings, the state donated
    loop               each step: host batch -> global arrays -> step; the previous
                       step's metrics are fetched while this one runs (no host sync
                       on the critical path); log / eval / checkpoint on schedule
    preemption         SIGTERM -> checkpoint at the next step boundary, exit 0
"""
import logging
import os
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtower_jax.data import pipeline
from mtower_jax.models.partitioning import DEFAULT_RULES
from mtower_jax.train import flops, mesh as mesh_lib
from mtower_jax.train.checkpoints import Checkpoints
from mtower_jax.train.init_from import load_init_params
from mtower_jax.train.metrics import MetricsWriter
from mtower_jax.train.state import create_train_state
from mtower_jax.train.step import make_eval_step, make_train_step

NONFINITE_POLICIES = ("skip", "stop")


class NonFiniteLossError(FloatingPointError):
    """config.on_nonfinite='stop' and a step produced a NaN / Inf loss or gradient."""


class _Preemption:
    """Turns SIGTERM into a flag the loop checks at each step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM: saving a checkpoint at the end of this step, then exiting")
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def check_nonfinite(values: dict, step: int, policy: str, skipped_so_far: int) -> int:
    """1 if step `step` was skipped for a NaN / Inf (policy 'skip'), else 0; raises under
    policy 'stop', naming the step."""
    if not values["nonfinite"]:
        return 0
    if policy == "stop":
        raise NonFiniteLossError(
            f"step {step}: non-finite loss or gradient (loss={values['loss']}, "
            f"grad_norm={values['grad_norm']}); the params are those after step {step - 1}. "
            "Set config.on_nonfinite='skip' to skip such steps instead")
    logging.warning("step %d: non-finite loss or gradient; update skipped (%d so far)", step,
                    skipped_so_far + 1)
    return 1


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def _initial_state(config, checkpoints, abstract_state, init, data_iter) -> dict:
    step = checkpoints.latest_step()
    if step is not None:
        logging.info("resuming from %s/%d", checkpoints.directory, step)
        return checkpoints.restore(step, abstract_state, data_iter)
    if config.init_from:
        fresh = jax.device_get(init()["params"])
        return init(load_init_params(config.init_from, fresh))
    return init()


def evaluate(config, eval_step, params, mesh, eval_data) -> dict:
    """MLM / ITM (/ ITC) loss and accuracy over config.eval_steps batches of `eval_data`
    (the eval split in order: the same batches and negatives every time)."""
    it = iter(eval_data)
    totals = {}
    for i in range(config.eval_steps):
        try:
            batch = mesh_lib.global_batch(next(it), mesh)
        except StopIteration:
            break
        terms = jax.device_get(eval_step(params, batch, jax.random.PRNGKey(i)))
        for name, values in terms.items():
            totals[name] = np.add(totals.get(name, 0.0), np.asarray(values, np.float64))
    out = {}
    for name, (loss_sum, count, correct) in totals.items():
        out[f"eval_loss_{name}"] = float(loss_sum / count)
        out[f"eval_acc_{name}"] = float(correct / count)
    return out


def _mean_metrics(window: list[dict]) -> dict:
    return {k: float(np.mean([m[k] for m in window])) for k in window[0]}


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) pretraining to config.total_steps; returns the last logged metrics."""
    if config.on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"config.on_nonfinite={config.on_nonfinite!r}; choose from "
                         f"{NONFINITE_POLICIES}")
    os.makedirs(workdir, exist_ok=True)
    write_config(config, workdir)
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = DEFAULT_RULES
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return _train(config, workdir, mesh, rules)


def _train(config, workdir, mesh, rules) -> dict:
    data_iter = iter(pipeline.pretrain_data(config, config.data.train_split, train=True))
    model, tx, abstract_state, init = create_train_state(config, mesh, rules)
    checkpoints = Checkpoints(workdir, keep=config.keep_checkpoints)
    state = _initial_state(config, checkpoints, abstract_state, init, data_iter)
    state_shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    train_step = jax.jit(make_train_step(config, model, tx),
                         in_shardings=(state_shardings, batch_sharding, replicated),
                         out_shardings=(state_shardings, replicated), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(config, model))
    eval_data = (pipeline.pretrain_data(config, config.data.eval_split, train=False)
                 if config.eval_every else None)  # opened once, iterated afresh each eval

    step = int(jax.device_get(state["step"]))
    base_rng = jax.device_get(state["rng"])  # a host copy: the state buffers are donated
    writer = MetricsWriter(workdir, total_steps=config.total_steps,
                           is_main_process=jax.process_index() == 0)
    dataset_negatives = config.data.itm_negatives == "dataset"
    step_flops = flops.pretrain_step_flops(
        config.model, config.batch_size, image_encodes_per_example=2 if dataset_negatives else 1,
        mlm_positions=config.model.max_text_len)
    peak = flops.peak_tflops(jax.devices()[0], jnp.dtype(config.model.dtype))
    preemption = _Preemption()
    window, pending, skipped, last = [], None, 0, {}
    window_start = time.perf_counter()

    def collect(metrics_step: int, metrics) -> None:
        """Host side of one finished step's metrics (fetched one step late)."""
        nonlocal skipped
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        skipped += check_nonfinite(values, metrics_step, config.on_nonfinite, skipped)
        window.append(values)

    try:
        while step < config.total_steps:
            batch = mesh_lib.global_batch(next(data_iter), mesh)
            state, metrics = train_step(state, batch, jax.random.fold_in(base_rng, step))
            step += 1
            if pending is not None:
                collect(*pending)
            pending = (step, metrics)
            at_end = step == config.total_steps
            if step % config.log_every == 0 or at_end:
                collect(*pending)
                pending = None
                seconds = (time.perf_counter() - window_start) / len(window)
                last = _mean_metrics(window)
                last.update(skipped_steps=skipped,
                            examples_per_s=config.batch_size / seconds,
                            tflops=step_flops / seconds / 1e12,
                            mfu=flops.mfu(step_flops, seconds, jax.device_count(), peak))
                writer.write(step, last)
                window, window_start = [], time.perf_counter()
            if config.eval_every and (step % config.eval_every == 0 or at_end):
                writer.write(step, evaluate(config, eval_step, state["params"], mesh, eval_data))
                window_start = time.perf_counter()  # examples/s counts training time only
            if step % config.checkpoint_every == 0 or at_end or preemption.requested:
                checkpoints.save(step, state, data_iter, force=True)
            if preemption.requested:
                checkpoints.wait()
                logging.warning("preempted: checkpoint of step %d written; exiting", step)
                break
        if pending is not None:
            collect(*pending)
    finally:
        checkpoints.close()
        writer.close()
        preemption.restore()
    return last
