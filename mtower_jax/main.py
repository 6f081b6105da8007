"""The main job: `python -m mtower_jax.main --config=CONFIG_FILE:ARGS --workdir=DIR`.

    python -m mtower_jax.main --config=configs/pretrain.py:model=tiny,data=synthetic \
        --workdir=runs/pretrain --config.total_steps=300 --config.mesh.fsdp=2
    python -m mtower_jax.main --config=configs/vqav2.py:model=tiny --workdir=runs/vqa \
        --config.init_from=runs/pretrain
    python -m mtower_jax.main --config=configs/vqav2.py:model=tiny --workdir=runs/vqa --mode=eval

Multi-process (one process per host; train/distributed.py): pass
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` to every process, or
nothing on a TPU pod or inside a multi-task `srun` (found automatically). launch/ has the
TPU-pod, GPU-node and SLURM launchers.

`--mode=train` (default) trains, or resumes, to config.total_steps and evaluates at the end;
`--mode=eval` evaluates the newest checkpoint in DIR (else config.init_from) on every split
of config.data.eval_splits and writes DIR/eval_<split>.json.

Config files are Python that runs in this process: only use ones you trust. Values given
on the command line (`--config.x=y`) are parsed and type-checked against the locked config.
The run writes DIR/config.json, DIR/metrics.jsonl, DIR/tensorboard/ and DIR/checkpoints/,
and resumes from the newest complete checkpoint in DIR. SIGTERM saves a checkpoint at the
next step boundary and exits 0 (within config.preemption_grace_s). A checkpoint that cannot
be written (disk full, read-only DIR) ends the run with exit code 1 and says why;
docs/RELIABILITY.md lists the faults tested.
"""
import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mtower_jax import config_args
from mtower_jax.train import distributed, loop
from mtower_jax.train.checkpoints import CheckpointWriteError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file[:args]: Python that runs in this process (only files you "
    "trust); --config.KEY=VALUE overrides are type-checked against it.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, logs).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (and resume), or only "
                          "evaluate the newest checkpoint / config.init_from.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's "
                                   "coordinator service (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(std_logging.Filter):
    """Drops INFO chatter of Orbax (a dozen lines per save); its warnings still show."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if _MODE.value == "eval":
        loop.evaluate_only(_CONFIG.value, _WORKDIR.value)
        return
    try:
        loop.train(_CONFIG.value, _WORKDIR.value)
    except CheckpointWriteError as e:
        logging.error("%s", e)
        logging.flush()
        sys.stderr.flush()
        # Orbax leaves threads waiting on the failed write (up to its 600 s timeout), and
        # the interpreter would wait for them before exiting.
        os._exit(1)


if __name__ == "__main__":  # grain worker processes re-import this module
    app.run(main, flags_parser=config_args.parse_flags)
