"""Training tasks: what a step's forward computes and what its denominators are.

    task        forward                                terms (loss sum, count, correct)
    pretrain    objectives.pretrain_forward            mlm, itm (, itc)
    vqa         classification.classification_forward vqa      (correct = VQA score)
    nlvr2       classification.classification_forward nlvr2
    snli_ve     classification.classification_forward snli_ve
    retrieval   retrieval.retrieval_forward            itc, itm (3 pairs per example)

A forward is a model method, `model.apply(variables, batch, losses=config.losses,
train=..., method=forward, rngs=...)`, returning (terms, predictions); predictions are
per-example arrays evaluation keeps (VQA answers for the submission file). `denominators`
gives each term's full-batch count, which gradient accumulation divides by.
`forward_options` adds what the forward takes from the run rather than the batch: the
groups its ITM negatives are drawn within (`config.data.itm_negatives='shard'`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from mtower_jax.data.masking import IGNORE
from mtower_jax.train.mesh import batch_shards
from mtower_jax.train.objectives import pretrain_forward
from mtower_jax.train.tasks.classification import CLASSIFICATION_TASKS, classification_forward
from mtower_jax.train.tasks.retrieval import retrieval_forward


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    forward: Callable
    losses: tuple[str, ...]  # the terms it can compute; config.losses picks among them
    pairs_per_example: dict  # ITM of retrieval scores 3 pairs per example
    batch_negatives: bool = False  # its ITM negatives are other examples of the batch


def denominators(batch: dict, losses: tuple[str, ...], task: Task) -> dict:
    """Full-batch counts each term is averaged over: examples, or masked tokens for MLM."""
    batch_size = jnp.float32(batch["input_ids"].shape[0])
    counts = {name: batch_size * task.pairs_per_example.get(name, 1) for name in losses}
    if "mlm" in losses:
        counts["mlm"] = jnp.maximum(jnp.sum(batch["mlm_labels"] != IGNORE), 1).astype(jnp.float32)
    return counts


TASKS = {
    "pretrain": Task("pretrain", pretrain_forward, ("mlm", "itm", "itc"), {}, True),
    "retrieval": Task("retrieval", retrieval_forward, ("itc", "itm"), {"itm": 3}, True),
    **{name: Task(name, classification_forward, (name,), {}) for name in CLASSIFICATION_TASKS},
}


def get_task(config) -> Task:
    """config.task (default 'pretrain'), with config.losses checked against it."""
    name = config.get("task", "pretrain")
    if name not in TASKS:
        raise ValueError(f"config.task={name!r} is not one of {tuple(TASKS)}")
    task = TASKS[name]
    unknown = [n for n in config.losses if n not in task.losses]
    if unknown or not config.losses:
        raise ValueError(f"config.losses={tuple(config.losses)}: task {name!r} computes "
                         f"{task.losses}")
    # Each term is read off the head of its name; without it the forward fails mid-trace.
    headless = [n for n in config.losses if n not in config.model.heads]
    if headless:
        heads = tuple(config.model.heads) + tuple(headless)
        raise ValueError(f"config.losses={tuple(config.losses)} needs the head(s) {headless}, "
                         f"but config.model.heads={tuple(config.model.heads)}; add them: "
                         f'--config.model.heads="{heads!r}"')
    return task


def forward_options(config, mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> dict:
    """Keyword arguments of config.task's forward besides (batch, losses, train): with
    config.data.itm_negatives='shard', `itm_negative_groups` = the batch's shards on `mesh`
    (mesh.batch_shards), so that each example's negative comes from its own device's rows
    (run_checks.check_mesh checks that every shard holds two examples or more)."""
    if not get_task(config).batch_negatives or config.data.get("itm_negatives") != "shard":
        return {}
    return {"itm_negative_groups": 1 if mesh.empty else batch_shards(mesh.shape)}
