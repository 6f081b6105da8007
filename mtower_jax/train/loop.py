"""The training run of any task (pretraining or fine-tuning), top to bottom:

    config     config.task picks the forward (train/tasks); fine-tuning epochs become
               total_steps from the train split's size
    mesh       from config.mesh (train/mesh.py), config.logical_axis_rules map the
               parameters and activations onto it (models/partitioning.py)
    data       grain iterator of this process's rows of the train split (data/pipeline.py);
               a checkpoint from another process count resumes at step x batch
    state      resume from the newest intact checkpoint in DIR/checkpoints (damaged ones
               are moved aside, another config's is an error: train/checkpoints.py), else
               init_from (heads fresh, position table and token types adapted:
               train/init_from.py), else fresh init
    step       jit(train_step) with explicit shardings, the state donated
    loop       each step: host batch -> global arrays -> step; the previous step's
               metrics are fetched while this one runs (no host sync on the critical
               path); log / eval / checkpoint on schedule
    eval       every eval split (train/evaluation.py); the last evaluation also writes
               DIR/eval_<split>.json
    preemption SIGTERM -> checkpoint at the next step boundary, exit 0; a watchdog ends
               the process config.preemption_grace_s after the signal (train/preemption.py)
    failures   a checkpoint write that fails (disk full, read-only) stops the run at the
               next step boundary with CheckpointWriteError

`evaluate_only` is `--mode=eval`: the newest checkpoint (or init_from) on every eval split.
"""
import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtower_jax.data import pipeline
from mtower_jax.models.partitioning import resolve_rules
from mtower_jax.train import flops, mesh as mesh_lib, run_checks
from mtower_jax.train.checkpoints import (Checkpoints, describe_differences,
                                          overrides_to_match)
from mtower_jax.train.evaluation import Evaluator
from mtower_jax.train.example_log import ExampleLog
from mtower_jax.train.init_from import load_init_params
from mtower_jax.train.metrics import MetricsWriter
from mtower_jax.train.preemption import Preemption
from mtower_jax.train.state import create_train_state
from mtower_jax.train.step import jit_train_step
from mtower_jax.train.tasks import get_task


class NonFiniteLossError(FloatingPointError):
    """config.on_nonfinite='stop' and a step produced a NaN / Inf loss or gradient."""


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


def _checkpoints(config: ml_collections.ConfigDict, workdir: str) -> Checkpoints:
    return Checkpoints(workdir, keep=config.keep_checkpoints,
                       config=json.loads(config.to_json_best_effort()))


def _initial_state(config: ml_collections.ConfigDict, checkpoints: Checkpoints,
                   abstract_state: dict, init: Callable,
                   make_iterator: Callable | None = None) -> tuple:
    """(state, iterator): the newest intact checkpoint's (with the iterator where it was),
    else init_from's params, else a fresh init (with a fresh iterator)."""
    restored = checkpoints.restore_newest(abstract_state, make_iterator)
    if restored is not None:
        step, state, iterator = restored
        logging.info("resuming from %s/%d", checkpoints.directory, step)
        return state, iterator
    iterator = make_iterator(None)[0] if make_iterator else None
    if config.init_from:
        fresh = jax.device_get(init()["params"])
        return init(load_init_params(config.init_from, fresh, config.model)), iterator
    return init(), iterator


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


def _run_context(config, workdir, splits):
    """(mesh, rules) of a run, once its config and the data `splits` it reads check out:
    a bad config or a missing dataset writes nothing, not even DIR."""
    run_checks.check_run(config)
    pipeline.check_splits(config, config.get("task", "pretrain"), splits)
    mesh = mesh_lib.make_mesh(config.mesh)
    run_checks.check_mesh(config, mesh)
    os.makedirs(workdir, exist_ok=True)
    return mesh, resolve_rules(config.logical_axis_rules)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) training to config.total_steps; returns the last logged metrics."""
    splits = (config.data.train_split, *config.data.eval_splits)
    mesh, rules = _run_context(config, workdir, splits)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return _train(resolve_total_steps(config), workdir, mesh, rules)


def evaluate_only(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """`--mode=eval`: the newest checkpoint in DIR (else config.init_from) on every eval
    split; writes DIR/eval_<split>.json and returns {split: metrics}."""
    mesh, rules = _run_context(config, workdir, config.data.eval_splits)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        config = copy.deepcopy(config)
        config.total_steps = max(config.total_steps, 1)  # the optimizer is built, not used
        model, _, abstract_state, init = create_train_state(config, mesh, rules)
        checkpoints = _checkpoints(config, workdir)
        try:
            if checkpoints.latest_step() is None and not config.init_from:
                raise ValueError(f"nothing to evaluate: {checkpoints.directory} holds no "
                                 "checkpoint and config.init_from is empty")
            state, _ = _initial_state(config, checkpoints, abstract_state, init)
            restored = checkpoints.latest_step()
            differences = [] if restored is None else checkpoints.config_differences(restored)
        finally:
            checkpoints.close()
        _warn_of_eval_differences(differences)
        step = int(jax.device_get(state["step"]))
        evaluator = Evaluator(config, model, mesh, workdir)
        results = {}
        for split in config.data.eval_splits:
            results[split] = evaluator.evaluate(state["params"], split)
            path = evaluator.write(split, step, results[split])
            logging.info("%s: %s -> %s", split, results[split], path)
        return results


def _warn_of_eval_differences(differences: list[tuple[str, object, object]]) -> None:
    """`--mode=eval` takes its config from the command line. A checkpoint whose shapes or
    shapeless model fields differ is refused before this; other differences that change
    what is evaluated (the task, model.max_text_len, the tokenizer) are only warned of.
    Dropout is off in evaluation, so its rates are not listed."""
    relevant = [(key, theirs, ours) for key, theirs, ours in differences
                if (key.startswith("model.") and "dropout" not in key)
                or key in ("task", "data.tokenizer_dir")]
    if relevant:
        logging.warning(
            "evaluating a checkpoint under a config that differs from the one it was trained "
            "with (checkpoint -> this run): %s. To evaluate as trained, pass %s",
            "; ".join(describe_differences(relevant)), overrides_to_match(relevant))


def _train_data(config: ml_collections.ConfigDict, task, checkpoints: Checkpoints) -> Callable:
    """make_iterator(step) -> (train iterator, whether checkpoint `step` restores its
    position); step None: a fresh run. A checkpoint written by a different number of
    processes has no iterator state for this one: every process then starts at global
    position step x batch (the same global batches follow)."""
    def make_iterator(resume: int | None) -> tuple:
        start = 0
        if resume is not None and not checkpoints.has_data_state(resume):
            start = resume * config.batch_size
            logging.warning("checkpoint %d holds no data position for process %d of %d "
                            "(written by another process count): reading from global "
                            "example %d", resume, jax.process_index(), jax.process_count(),
                            start)
        data = pipeline.task_data(config, task.name, config.data.train_split, train=True,
                                  start=start)
        return iter(data), resume is not None and start == 0
    return make_iterator


def _train(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
           rules) -> dict:
    # First, so that a SIGTERM during start-up (restore, compile) also ends in exit 0.
    preemption = Preemption(config.get("preemption_grace_s", 25.0))
    try:
        return _train_steps(config, workdir, mesh, rules, preemption)
    finally:
        preemption.restore()


def _train_steps(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
                 rules, preemption: Preemption) -> dict:
    model, tx, abstract_state, init = create_train_state(config, mesh, rules)
    warning = mesh_lib.report_replicated(abstract_state["params"], mesh)
    if warning:
        logging.warning(warning)
    checkpoints = _checkpoints(config, workdir)
    try:
        return _loop(config, workdir, mesh, preemption, checkpoints, model, tx,
                     abstract_state, init)
    finally:
        checkpoints.close()  # waits for the last write; CheckpointWriteError if it failed


def _loop(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
          preemption: Preemption, checkpoints: Checkpoints, model: nn.Module, tx,
          abstract_state: dict, init: Callable) -> dict:
    state, data_iter = _initial_state(config, checkpoints, abstract_state, init,
                                      _train_data(config, get_task(config), checkpoints))
    step = int(jax.device_get(state["step"]))
    if step >= config.total_steps:  # a finished run started again (e.g. by a scheduler)
        logging.warning("the newest checkpoint is at step %d, config.total_steps=%d: nothing "
                        "to train; raise --config.total_steps to go on", step,
                        config.total_steps)
        return {}
    # Only now: a start that fails (a checkpoint of another config, missing data) or does
    # nothing must not replace the config.json of the run in DIR.
    write_config(config, workdir)
    example_log = ExampleLog(workdir) if config.data.get("log_example_ids") else None
    train_step = jit_train_step(config, model, tx, abstract_state, mesh)
    evaluator = Evaluator(config, model, mesh, workdir)

    base_rng = jax.device_get(state["rng"])  # a host copy: the state buffers are donated
    writer = MetricsWriter(workdir, total_steps=config.total_steps,
                           is_main_process=jax.process_index() == 0)
    step_flops = flops.train_step_flops(config)
    peak = flops.peak_tflops(jax.local_devices()[0], jnp.dtype(config.model.dtype))
    # The restored (or initial) state is on disk already: nothing is lost before step 1.
    preemption.step = preemption.saved_step = start_step = saved_at = step
    window, pending, skipped, last = [], None, 0, {}
    window_start = time.perf_counter()

    def collect(metrics_step: int, metrics) -> None:
        """Host side of one finished step's metrics (fetched one step late)."""
        nonlocal skipped
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        skipped += check_nonfinite(values, metrics_step, config.on_nonfinite, skipped)
        window.append(values)

    try:
        while step < config.total_steps and not preemption.requested:
            local_batch = next(data_iter)
            if example_log:
                example_log.write(step + 1, local_batch)
            batch = mesh_lib.global_batch(local_batch, mesh)
            state, metrics = train_step(state, batch, jax.random.fold_in(base_rng, step))
            step += 1
            preemption.step = step
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
            # Preempted: no periodic evaluation (the grace period is short); the final one
            # still runs, or a resumed run would have nothing left to evaluate.
            if config.eval_every >= 0 and (at_end or (
                    config.eval_every and step % config.eval_every == 0
                    and not preemption.requested)):
                writer.write(step, evaluate_splits(config, evaluator, state["params"], step,
                                                   final=at_end))
                window_start = time.perf_counter()  # examples/s counts training time only
            if step % config.checkpoint_every == 0 or at_end or preemption.requested:
                checkpoints.save(step, state, data_iter, force=True)
                saved_at = step
            else:
                checkpoints.poll()  # a failed background write stops the run here
        if pending is not None:
            collect(*pending)
        if preemption.requested:
            if step == start_step:
                logging.warning("preempted before the first step: nothing new to save; "
                                "exiting")
            else:
                if saved_at != step:  # SIGTERM arrived after this step's checkpoint check
                    checkpoints.save(step, state, data_iter, force=True)
                checkpoints.wait()
                preemption.saved_step = step
                logging.warning("preempted: checkpoint of step %d written; exiting", step)
    finally:
        writer.close()
        if example_log:
            example_log.close()
    return last
