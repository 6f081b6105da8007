#!/usr/bin/env bash
# Run an mtower_jax command on this machine with the project's virtual environment.
#
#   launch/local.sh summary --config=configs/pretrain.py:model=base
#   DEVICES=8 launch/local.sh tools.forward --config=configs/pretrain.py:model=tiny
#   launch/local.sh main --config=configs/pretrain.py:model=tiny --workdir=runs/tiny
#
# Variables:
#   DEVICES   on a CPU-only machine, expose this many host devices to JAX (for mesh tests)
#   VENV      the virtual environment to use (default: .venv, created by `make install`)
#   DRY_RUN   1: print the commands (+ ...) and run none
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/lib.sh
module=${1:?usage: launch/local.sh MODULE [ARGS...]  (e.g. summary, tools.forward)}
shift
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || run make install
cmd=("$VENV/bin/python" -m "mtower_jax.${module}" "$@")
if [ -n "${DEVICES:-}" ]; then
  cmd=(env "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=${DEVICES}"
       "${cmd[@]}")
fi
run_exec "${cmd[@]}"
