#!/usr/bin/env bash
# Train on one GPU machine: one process drives all of its GPUs (JAX's devices are the local
# GPUs; config.mesh spreads the batch over them), so no jax.distributed set-up is involved.
#   WORKDIR=runs/base launch/gpu_node.sh --config.total_steps=1000
#   GPUS=0,1 CONFIG=configs/vqav2.py:model=base WORKDIR=runs/vqa launch/gpu_node.sh
# Extra arguments go to `python -m mtower_jax.main` after --config and --workdir.
# Variables:
#   CONFIG     config file[:args] (default: configs/pretrain.py:model=base)
#   WORKDIR    the run directory (required); rerunning resumes from its checkpoints
#   GPUS       CUDA_VISIBLE_DEVICES, e.g. 0,1,2,3 (default: every GPU of the machine)
#   VENV       the virtual environment (default: .venv); launch/install.sh gpu creates it or
#              adds the CUDA wheels (requirements-gpu.txt) when they are missing
#   XLA_FLAGS  extra XLA flags, after the defaults in launch/lib.sh (gpu_env)
#   XLA_PYTHON_CLIENT_MEM_FRACTION  GPU memory JAX may take (default: 0.9)
#   DRY_RUN    1: print the commands (+ ...) and run none
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/lib.sh

CONFIG=${CONFIG:-configs/pretrain.py:model=base}
WORKDIR=${WORKDIR:?set WORKDIR, the run directory}
VENV=${VENV:-.venv}

VENV=$VENV launch/install.sh gpu
gpu_env
if [ -n "${GPUS:-}" ]; then GPU_ENV+=("CUDA_VISIBLE_DEVICES=$GPUS"); fi
run_exec env "${GPU_ENV[@]}" "$VENV/bin/python" -m mtower_jax.main \
  "--config=$CONFIG" "--workdir=$WORKDIR" "$@"
