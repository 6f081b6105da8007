"""Throughput of the full input pipeline (decode + augment + tokenize + mask + batch).

    python -m mtower_jax.data.bench --config=configs/pretrain.py:model=tiny \
        --sizes=288,384 --workers=0,1,2 --batches=20

Prints one JSON line per (image size, workers) with examples/s over the
timed batches after one warm-up batch. The synthetic world is rendered at each size, so it
measures the same work real data needs (PNG decode instead of JPEG).
"""
import json
import time

from absl import app, flags
from ml_collections import config_flags

from mtower_jax import config_args
from mtower_jax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", "configs/pretrain.py:model=tiny",
                                          "Config file[:args].")
_SIZES = flags.DEFINE_list("sizes", ["288", "384"], "Image sizes to measure.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "grain worker counts to measure.")
_BATCHES = flags.DEFINE_integer("batches", 20, "Timed batches per setting.")
_TASK = flags.DEFINE_enum("task", "pretrain", list(pipeline.SYNTHETIC_TASKS), "Pipeline.")


def measure(config, task: str, train: bool, batches: int) -> float:
    """Examples per second of `batches` batches after a warm-up batch."""
    it = iter(pipeline.task_data(config, task, "train", train=train))
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * config.batch_size / (time.perf_counter() - start)


def main(argv) -> None:
    del argv
    config = _CONFIG.value
    for size in map(int, _SIZES.value):
        config.model.vision.image_size = size
        for workers in map(int, _WORKERS.value):
            config.data.num_workers = workers
            rate = measure(config, _TASK.value, True, _BATCHES.value)
            print(json.dumps(dict(task=_TASK.value, image_size=size, workers=workers,
                                  batch_size=config.batch_size,
                                  examples_per_s=round(rate, 1))), flush=True)


if __name__ == "__main__":  # grain worker processes re-import this module
    app.run(main, flags_parser=config_args.parse_flags)  # overrides type-checked first
