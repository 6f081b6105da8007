"""Evaluation of a task on its eval splits, during training and in `--mode=eval`.

    pretrain            loss and accuracy of each term (MLM, ITM, ITC) over eval_steps batches
    vqa                 VQA accuracy (mean score of the argmax answer); every split also
                        writes DIR/vqa_submission_<split>.json = [{"question_id", "answer"}]
                        (test-dev has no answers: only the file is produced)
    nlvr2, snli_ve      accuracy
    retrieval           IR / TR R@1/5/10 and their mean (retrieval_eval.py)

The split is read once, in order. Every batch has the same shape (one compile): the last one
is padded with copies of its first example, which the `valid` feature excludes from every
sum. All processes run the same number of batches (the count comes from the split's size),
a process whose slice ran out feeding all-padding batches.
"""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mtower_jax.data import pipeline
from mtower_jax.train import mesh as mesh_lib
from mtower_jax.train.step import make_eval_step


def eval_batch_size(config: ml_collections.ConfigDict) -> int:
    return int(config.get("eval_batch_size", 0) or config.batch_size)


def padded_batches(batches, local_size: int, num_batches: int):
    """Local batches of exactly `local_size` rows with `valid` [rows] float32 (0 = padding);
    exactly `num_batches` of them, all-padding ones after the data ends."""
    batches, template = iter(batches), None
    for _ in range(num_batches):
        batch = next(batches, None)
        if batch is None:
            if template is None:
                raise ValueError("this process's slice of the eval split is empty; use fewer "
                                 "processes or a larger split")
            yield {**template, "valid": np.zeros(local_size, np.float32)}
            continue
        n = len(batch["input_ids"])
        fill = np.zeros(local_size - n, np.int64)  # padding rows repeat row 0
        template = {k: np.concatenate([v, np.asarray(v)[fill]]) for k, v in batch.items()}
        template["valid"] = (np.arange(local_size) < n).astype(np.float32)
        yield template


HOST_FEATURES = ("question_id",)


def gather(x) -> np.ndarray:
    """A batch-sharded global array, or each process's rows of a host array -> all rows on
    every process (host numpy), in process order."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _metrics_from_terms(totals: dict) -> dict:
    out = {}
    for name, (loss_sum, count, correct) in totals.items():
        out[f"loss_{name}"] = float(loss_sum / max(count, 1))
        out[f"acc_{name}"] = float(correct / max(count, 1))
    return out


class Evaluator:
    """Holds each eval split's pipeline (opened once) and the jitted eval step.

    `evaluate(params, split, max_batches)` -> metrics dict; `write(split, step, metrics)`
    writes DIR/eval_<split>.json.
    """

    def __init__(self, config: ml_collections.ConfigDict, model, mesh, workdir: str):
        self.config, self.model, self.mesh, self.workdir = config, model, mesh, workdir
        self.task = config.get("task", "pretrain")
        self.batch_size = eval_batch_size(config)
        if self.batch_size % jax.device_count():
            raise ValueError(f"eval batch size {self.batch_size} is not divisible by the "
                             f"{jax.device_count()} devices; set config.eval_batch_size")
        pipeline.check_splits(config, self.task, config.data.eval_splits)
        self.eval_step = jax.jit(make_eval_step(config, model))
        self._data = {}
        self._retrieval = None

    def _split_data(self, split: str):
        if split not in self._data:
            self._data[split] = (
                pipeline.task_data(self.config, self.task, split, train=False,
                                   batch_size=self.batch_size),
                pipeline.num_examples(self.config, self.task, split))
        return self._data[split]

    def evaluate(self, params, split: str, max_batches: int = 0) -> dict:
        """Metrics of `params` on `split`; max_batches > 0 stops after that many batches."""
        if self.task == "retrieval":
            from mtower_jax.train.tasks.retrieval_eval import RetrievalEvaluator
            if self._retrieval is None:
                self._retrieval = RetrievalEvaluator(self.config, self.model, self.mesh)
            return self._retrieval.evaluate(params, split)
        data, examples = self._split_data(split)
        whole = math.ceil(examples / self.batch_size)
        num_batches = min(whole, max_batches) if max_batches else whole
        local = self.batch_size // jax.process_count()
        totals, predictions = {}, []
        for i, batch in enumerate(padded_batches(iter(data), local, num_batches)):
            # Ids stay on the host: int64 question ids would be cut to int32 on the device.
            host = {k: batch.pop(k) for k in HOST_FEATURES if k in batch}
            terms, preds = self.eval_step(params, mesh_lib.global_batch(batch, self.mesh),
                                          jax.random.PRNGKey(i))
            # Summed on the device, fetched once after the loop: no host sync per batch.
            totals = terms if i == 0 else jax.tree.map(jnp.add, totals, terms)
            if preds:  # process order matches the global batch's row order
                predictions.append({k: gather(v) for k, v in preds.items()} |
                                   {k: gather(v) for k, v in host.items()} |
                                   {"valid": gather(batch["valid"])})
        totals = {k: np.asarray(jax.device_get(v), np.float64) for k, v in totals.items()}
        metrics = _metrics_from_terms(totals)
        counted = [name for name in totals if name != "mlm"]  # MLM counts tokens
        metrics["examples"] = int(totals[counted[0]][1]) if counted else 0
        if self.task in ("vqa", "nlvr2", "snli_ve"):
            metrics = {"accuracy": metrics[f"acc_{self.task}"],
                       "loss": metrics[f"loss_{self.task}"], "examples": metrics["examples"]}
        if self.task == "vqa":
            metrics.update(self._vqa_submission(split, predictions, num_batches == whole))
        return metrics

    def _vqa_submission(self, split: str, predictions: list[dict], whole: bool) -> dict:
        """Writes DIR/vqa_submission_<split>.json when the evaluation read the `whole` split
        (a periodic one of eval_steps batches would leave a partial file to upload); the
        accuracy and loss are None when no question of the split has an answer (test-dev,
        test: its targets are all zero)."""
        vocabulary = pipeline.answer_vocabulary(self.config)
        rows, answered = [], False
        for chunk in predictions:
            keep = chunk["valid"] > 0
            answered |= bool(np.any(chunk["answered"][keep]))
            rows += [{"question_id": int(q), "answer": vocabulary[int(p)]}
                     for q, p in zip(chunk["question_id"][keep], chunk["prediction"][keep])]
        unanswered = {} if answered else {"accuracy": None, "loss": None}
        if not whole:
            return unanswered
        path = os.path.join(self.workdir, f"vqa_submission_{split}.json")
        if jax.process_index() == 0:
            with open(path, "w") as f:
                json.dump(rows, f)
        return {"submission": path} | unanswered

    def write(self, split: str, step: int, metrics: dict) -> str:
        """DIR/eval_<split>.json: the split, the step evaluated, the task and `metrics`."""
        path = os.path.join(self.workdir, f"eval_{split}.json")
        if jax.process_index() == 0:
            with open(path, "w") as f:
                json.dump({"split": split, "step": step, "task": self.task, **metrics}, f,
                          indent=2)
        return path

