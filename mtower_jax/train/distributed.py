"""Multi-controller start-up: one Python process per host, joined by `jax.distributed`.

    explicit  --coordinator_address=HOST:PORT --num_processes=N --process_id=I
              (any cluster; two local CPU processes over 127.0.0.1 in the tests)
    TPU pod   nothing to pass: on a Cloud TPU VM jax finds the workers from the metadata
              server (`gcloud compute tpus tpu-vm ssh --worker=all` starts one per host)
    SLURM     nothing to pass inside `srun` with more than one task: jax reads SLURM_*
              (coordinator = the first node of the step; launch/slurm.sbatch passes the
              flags explicitly instead, so both routes agree)
    otherwise one process

It must run before anything touches a device (`jax.devices()` fixes the backend).
"""
from __future__ import annotations

import glob
import logging
import os

import jax


def _on_cloud_tpu_vm() -> bool:
    """A Cloud TPU VM exposes its chips as /dev/accel* (v2-v5e) or /dev/vfio/N (v5p, v6e)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _in_slurm_step() -> bool:
    """Inside `srun` with several tasks (a plain `sbatch` shell or one task: one process)."""
    return "SLURM_STEP_NODELIST" in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> str:
    """Joins the processes of this run; returns how ('explicit', 'tpu', 'slurm', 'single')."""
    given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
             "--process_id": process_id}
    if any(v is not None for v in given.values()):
        missing = [name for name, v in given.items() if v is None]
        if missing:
            raise ValueError(f"multi-process run: also pass {', '.join(missing)} (all three of "
                             f"{', '.join(given)} go together)")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} must be in [0, {num_processes})")
        how = "explicit"
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    elif _on_cloud_tpu_vm():
        how = "tpu"
        jax.distributed.initialize()
    elif _in_slurm_step():
        how = "slurm"
        jax.distributed.initialize()
    else:
        return "single"
    logging.info("jax.distributed (%s): process %d of %d, %d local / %d global devices", how,
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    return how
