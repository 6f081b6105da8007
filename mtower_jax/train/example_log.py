"""Which examples each process read, step by step (`config.data.log_example_ids=True`).

    DIR/example_ids/process_<i>.jsonl    {"step": s, "record_index": [...], "text_index": [...]}

An example is the pair (record_index, text_index): its record in the split and which of the
record's texts. The files answer "did every process read its own, disjoint share, and did
a resumed run read what an uninterrupted one would have"; a resumed run appends.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np


class ExampleLog:
    def __init__(self, workdir: str):
        directory = os.path.join(workdir, "example_ids")
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f"process_{jax.process_index()}.jsonl")
        self._file = open(self.path, "a")

    def write(self, step: int, local_batch: dict) -> None:
        """The ids of this process's rows of step `step`'s batch."""
        ids = {k: np.asarray(local_batch[k]).tolist() for k in ("record_index", "text_index")}
        self._file.write(json.dumps({"step": step, **ids}) + "\n")

    def close(self) -> None:
        self._file.close()


def read(workdir: str) -> dict[int, list[dict]]:
    """{process index: its records, in order} of a run's example-id logs."""
    directory = os.path.join(workdir, "example_ids")
    out = {}
    for name in sorted(os.listdir(directory)):
        process = int(name.removeprefix("process_").removesuffix(".jsonl"))
        with open(os.path.join(directory, name)) as f:
            out[process] = [json.loads(line) for line in f]
    return out
