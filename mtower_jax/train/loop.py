"""The training run of any task (pretraining or fine-tuning), top to bottom:

    config     config.task picks the forward (train/tasks); fine-tuning epochs become
               total_steps from the train split's size
    mesh       from config.mesh (train/mesh.py), config.logical_axis_rules map the
               parameters and activations onto it (models/partitioning.py)
    data       grain iterator of this process's rows of the train split (data/pipeline.py);
               a checkpoint from another process count resumes at step x batch
    state      resume from DIR/checkpoints, else init_from (heads fresh, position table
               and token types adapted: train/init_from.py), else fresh init
    step       jit(train_step) with explicit shardings, the state donated
    loop       each step: host batch -> global arrays -> step; the previous step's
               metrics are fetched while this one runs (no host sync on the critical
               path); log / eval / checkpoint on schedule
    eval       every eval split (train/evaluation.py); the last evaluation also writes
               DIR/eval_<split>.json
    preemption SIGTERM -> checkpoint at the next step boundary, exit 0

`evaluate_only` is `--mode=eval`: the newest checkpoint (or init_from) on every eval split.
"""
import copy
import logging
import math
import os
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtower_jax.data import pipeline
from mtower_jax.models.partitioning import resolve_rules
from mtower_jax.train import flops, mesh as mesh_lib
from mtower_jax.train.checkpoints import Checkpoints
from mtower_jax.train.evaluation import Evaluator
from mtower_jax.train.example_log import ExampleLog
from mtower_jax.train.init_from import load_init_params
from mtower_jax.train.metrics import MetricsWriter
from mtower_jax.train.state import create_train_state
from mtower_jax.train.step import jit_train_step
from mtower_jax.train.tasks import get_task

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


def resolve_total_steps(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` whose total_steps is set: config.epochs passes over the train
    split when total_steps is 0 (fine-tuning), else total_steps as given."""
    config = copy.deepcopy(config)
    if config.total_steps <= 0:
        epochs = config.get("epochs", 0)
        if epochs <= 0:
            raise ValueError("config.total_steps must be > 0, or config.epochs > 0 to derive it")
        examples = pipeline.num_examples(config, config.get("task", "pretrain"),
                                         config.data.train_split)
        config.total_steps = max(1, math.ceil(epochs * examples / config.batch_size))
        logging.info("%s epochs of %d examples at batch %d: %d steps", epochs, examples,
                     config.batch_size, config.total_steps)
    return config


def _scalars(metrics: dict, prefix: str) -> dict:
    """The numeric entries of an evaluation's metrics, keyed '<split>/<name>'."""
    return {f"{prefix}/{k}": float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def evaluate_splits(config, evaluator: Evaluator, params, step: int, *, final: bool) -> dict:
    """Every split of config.data.eval_splits; `final` evaluations read whole splits and
    write DIR/eval_<split>.json."""
    out = {}
    for split in config.data.eval_splits:
        metrics = evaluator.evaluate(params, split, 0 if final else config.eval_steps)
        if final:
            evaluator.write(split, step, metrics)
        out.update(_scalars(metrics, split))
    return out


def _mean_metrics(window: list[dict]) -> dict:
    return {k: float(np.mean([m[k] for m in window])) for k in window[0]}


def _run_context(config, workdir):
    if config.on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"config.on_nonfinite={config.on_nonfinite!r}; choose from "
                         f"{NONFINITE_POLICIES}")
    get_task(config)  # config.task and config.losses agree
    os.makedirs(workdir, exist_ok=True)
    return mesh_lib.make_mesh(config.mesh), resolve_rules(config.logical_axis_rules)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) training to config.total_steps; returns the last logged metrics."""
    mesh, rules = _run_context(config, workdir)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        config = resolve_total_steps(config)
        write_config(config, workdir)
        return _train(config, workdir, mesh, rules)


def evaluate_only(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """`--mode=eval`: the newest checkpoint in DIR (else config.init_from) on every eval
    split; writes DIR/eval_<split>.json and returns {split: metrics}."""
    mesh, rules = _run_context(config, workdir)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        config = copy.deepcopy(config)
        config.total_steps = max(config.total_steps, 1)  # the optimizer is built, not used
        model, _, abstract_state, init = create_train_state(config, mesh, rules)
        checkpoints = Checkpoints(workdir, keep=config.keep_checkpoints)
        try:
            if checkpoints.latest_step() is None and not config.init_from:
                raise ValueError(f"nothing to evaluate: {checkpoints.directory} holds no "
                                 "checkpoint and config.init_from is empty")
            state = _initial_state(config, checkpoints, abstract_state, init, None)
        finally:
            checkpoints.close()
        step = int(jax.device_get(state["step"]))
        evaluator = Evaluator(config, model, mesh, workdir)
        results = {}
        for split in config.data.eval_splits:
            results[split] = evaluator.evaluate(state["params"], split)
            path = evaluator.write(split, step, results[split])
            logging.info("%s: %s -> %s", split, results[split], path)
        return results


def _train_data(config, task, checkpoints: Checkpoints):
    """(train iterator, whether the checkpoint restores its position). A checkpoint written
    by a different number of processes has no iterator state for this one: every process
    then starts at global position step x batch (the same global batches follow)."""
    resume, start = checkpoints.latest_step(), 0
    if resume is not None and not checkpoints.has_data_state(resume):
        start = resume * config.batch_size
        logging.warning("checkpoint %d holds no data position for process %d of %d (written "
                        "by another process count): reading from global example %d", resume,
                        jax.process_index(), jax.process_count(), start)
    data = pipeline.task_data(config, task.name, config.data.train_split, train=True,
                              start=start)
    return iter(data), start == 0


def _train(config, workdir, mesh, rules) -> dict:
    task = get_task(config)
    model, tx, abstract_state, init = create_train_state(config, mesh, rules)
    warning = mesh_lib.report_replicated(abstract_state["params"], mesh)
    if warning:
        logging.warning(warning)
    checkpoints = Checkpoints(workdir, keep=config.keep_checkpoints)
    data_iter, restore_position = _train_data(config, task, checkpoints)
    state = _initial_state(config, checkpoints, abstract_state, init,
                           data_iter if restore_position else None)
    example_log = ExampleLog(workdir) if config.data.get("log_example_ids") else None
    train_step = jit_train_step(config, model, tx, abstract_state, mesh)
    evaluator = Evaluator(config, model, mesh, workdir)

    step = int(jax.device_get(state["step"]))
    base_rng = jax.device_get(state["rng"])  # a host copy: the state buffers are donated
    writer = MetricsWriter(workdir, total_steps=config.total_steps,
                           is_main_process=jax.process_index() == 0)
    step_flops = flops.train_step_flops(config)
    peak = flops.peak_tflops(jax.local_devices()[0], jnp.dtype(config.model.dtype))
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
            local_batch = next(data_iter)
            if example_log:
                example_log.write(step + 1, local_batch)
            batch = mesh_lib.global_batch(local_batch, mesh)
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
            if config.eval_every >= 0 and (at_end or (
                    config.eval_every and step % config.eval_every == 0)):
                writer.write(step, evaluate_splits(config, evaluator, state["params"], step,
                                                   final=at_end))
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
        if example_log:
            example_log.close()
    return last
