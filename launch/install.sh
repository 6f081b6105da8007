#!/usr/bin/env bash
# Install the project's requirements for one platform into a virtual environment:
#   launch/install.sh gpu        # requirements.txt + requirements-gpu.txt (CUDA wheels)
#   launch/install.sh tpu        # requirements.txt + requirements-tpu.txt (libtpu)
# gpu_node.sh and slurm.sbatch run it before every launch and tpu_pod.sh on every TPU worker;
# it is a no-op when nothing changed. A stamp in the venv records which requirement files (and
# their checksums) were installed, so a CPU-only venv from `make install` gets the accelerator
# wheels instead of silently running on the CPU.
# Variables:
#   VENV            the virtual environment (default: .venv)
#   PYTHON          interpreter that creates it (default: the first of python3.13, python3.12,
#                   python3.11, python3 that is Python >= 3.11, which jax 0.10 requires)
#   INSTALL_PYTHON  1: when no such Python exists, apt-get python3.11 from the deadsnakes PPA
#                   (Cloud TPU VM images are Ubuntu 22.04, whose python3 is 3.10)
#   DRY_RUN         1: print the commands (+ ...) and run none
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/lib.sh

platform=${1:?usage: launch/install.sh gpu|tpu}
case $platform in
  gpu | tpu) requirements=(requirements.txt "requirements-$platform.txt") ;;
  *) die "unknown platform '$platform' (gpu or tpu)" ;;
esac
VENV=${VENV:-.venv}
stamp="$VENV/.launch-installed"
want="$(cksum "${requirements[@]}")"
up_to_date() { [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; }
if up_to_date; then exit 0; fi

python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

find_python() {
  local candidate
  for candidate in ${PYTHON:-python3.13 python3.12 python3.11 python3}; do
    if command -v "$candidate" >/dev/null && python_ok "$candidate"; then
      echo "$candidate"
      return
    fi
  done
}

# One installer at a time per venv: the tasks of a SLURM job array share it on a shared disk.
if ! is_dry && command -v flock >/dev/null; then
  mkdir -p "$VENV"
  exec 9>"$VENV/.install.lock"
  flock 9
  if up_to_date; then exit 0; fi  # another task installed it while this one waited
fi

if [ ! -x "$VENV/bin/python" ]; then
  python=$(find_python)
  if [ -z "$python" ] && [ "${INSTALL_PYTHON:-0}" = 1 ]; then
    # Waits for the dpkg lock, which a fresh VM's unattended upgrades hold for a while.
    apt=(sudo apt-get -o DPkg::Lock::Timeout=600 -yq)
    run sudo add-apt-repository -y ppa:deadsnakes/ppa
    run "${apt[@]}" update
    run "${apt[@]}" install python3.11 python3.11-venv
    python=python3.11
  fi
  [ -n "$python" ] || die "no Python >= 3.11 found; set PYTHON (or INSTALL_PYTHON=1 on Ubuntu)"
  run "$python" -m venv "$VENV"
  run "$VENV/bin/python" -m pip install -q --upgrade pip
fi
pip_requirements=()
for file in "${requirements[@]}"; do pip_requirements+=(-r "$file"); done
run "$VENV/bin/python" -m pip install -q "${pip_requirements[@]}"
is_dry || echo "$want" >"$stamp"
