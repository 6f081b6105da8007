#!/usr/bin/env bash
# Train on a Cloud TPU slice (or several, NUM_SLICES) from this machine: create the TPU unless
# it exists, copy this checkout to every worker, install, and start
# `python -m mtower_jax.main` on all workers at once. Every worker is one JAX process; on a TPU
# VM jax.distributed finds the others by itself, so no coordinator flags are passed.
#   TPU_NAME=mt ZONE=us-east5-a WORKDIR=gs://bucket/runs/base launch/tpu_pod.sh
#   ... launch/tpu_pod.sh --config.total_steps=1000 --config.mesh.fsdp=8
# Extra arguments go to mtower_jax.main after --config and --workdir. The job runs in the
# foreground: it stops if this shell or its ssh sessions end (start it from tmux/screen).
# Variables:
#   TPU_NAME          the TPU VM, or with NUM_SLICES > 1 the queued resource (required)
#   ZONE              its zone (required), e.g. us-east5-a for v5p
#   PROJECT           its project (default: gcloud's configured project)
#   ACCELERATOR_TYPE  slice type when creating it (default: v5p-64, 32 chips, 8 workers)
#   RUNTIME_VERSION   TPU VM image when creating it (default: v2-alpha-tpuv5, the v5p one;
#                     v6e: v2-alpha-tpuv6e, v5e: v2-alpha-tpuv5-lite, v4: tpu-ubuntu2204-base)
#   CREATE_FLAGS      more flags for the create command, e.g. "--spot" or "--reserved"
#   NUM_SLICES        slices joined over the data-center network (default: 1). Above 1 the
#                     TPUs are a queued resource (Multislice needs one) whose nodes are named
#                     TPU_NAME-0, TPU_NAME-1, ..., and the run gets
#                     --config.mesh.dcn_data=NUM_SLICES (data parallel across slices)
#   CONFIG            config file[:args] (default: configs/pretrain.py:model=base)
#   WORKDIR           the run directory (required): a gs:// path, which every worker sees;
#                     rerunning resumes from its checkpoints
#   REMOTE_DIR        where the code goes on the workers, relative to the home directory
#                     (default: mtower_jax); its .venv is kept between launches
#   DRY_RUN           1: print the commands (+ ...) and run none; a dry run assumes the TPU
#                     does not exist, so it shows the create command too
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/lib.sh

TPU_NAME=${TPU_NAME:?set TPU_NAME}
ZONE=${ZONE:?set ZONE}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5p-64}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5}
NUM_SLICES=${NUM_SLICES:-1}
CONFIG=${CONFIG:-configs/pretrain.py:model=base}
WORKDIR=${WORKDIR:?set WORKDIR, a gs:// path}
REMOTE_DIR=${REMOTE_DIR:-mtower_jax}
case $WORKDIR in
  gs://*) ;;
  *) echo "tpu_pod.sh: warning: WORKDIR=$WORKDIR is not gs://; each worker writes its own" \
       "local copy, which only works on a single-host slice" >&2 ;;
esac
[[ $NUM_SLICES =~ ^[1-9][0-9]*$ ]] || die "NUM_SLICES=$NUM_SLICES is not a positive integer"

where=(--zone="$ZONE")
if [ -n "${PROJECT:-}" ]; then where+=(--project="$PROJECT"); fi
read -r -a create_flags <<<"${CREATE_FLAGS:-}"
# A single slice is a TPU VM; several are the nodes of one queued resource. The two gcloud
# groups take the same scp/ssh commands, with --node=all added for the queued resource.
if [ "$NUM_SLICES" -gt 1 ]; then
  gc=(gcloud compute tpus queued-resources)
  state_field=state.state ready=ACTIVE
  create=(--node-count="$NUM_SLICES" --node-prefix="$TPU_NAME" --runtime-version="$RUNTIME_VERSION")
  # ssh to a queued resource goes 64 workers at a time by default; the run must start on all.
  fanout=(--worker=all --node=all --batch-size=1024)
else
  gc=(gcloud compute tpus tpu-vm)
  state_field=state ready=READY
  create=(--version="$RUNTIME_VERSION")
  fanout=(--worker=all)
fi

tpu_state() { query "${gc[@]}" describe "$TPU_NAME" "${where[@]}" --format="value($state_field)"; }

# 1. Reuse the TPU if it exists, else create it; wait while it is being set up.
state=$(tpu_state)
if [ -z "$state" ]; then
  run "${gc[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
    "${create[@]}" ${create_flags[@]+"${create_flags[@]}"}
  is_dry || state=$(tpu_state)
fi
while ! is_dry && [ "$state" != "$ready" ]; do
  case $state in
    CREATING | STARTING | RESTARTING | REPAIRING | ACCEPTED | WAITING_FOR_RESOURCES | PROVISIONING)
      sleep 30 ;;
    *) die "$TPU_NAME is ${state:-gone}; delete it (${gc[*]} delete $TPU_NAME) and rerun" ;;
  esac
  state=$(tpu_state)
done

# 2. Copy the checkout (tracked files plus untracked ones that git does not ignore).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' file; do
  if [ -e "$file" ]; then printf '%s\0' "$file"; fi  # skip deleted, still-indexed files
done >"$tmp/files"
archive=mtower_jax-code.tar.gz  # in the remote home directory
run tar -czf "$tmp/$archive" --null -T "$tmp/files"
run "${gc[@]}" scp "$tmp/$archive" "$TPU_NAME:$archive" "${fanout[@]}" "${where[@]}"

# 3. Unpack over the previous copy (keeping its .venv) and install, on every worker.
dir=$(q "$REMOTE_DIR")
run "${gc[@]}" ssh "$TPU_NAME" "${fanout[@]}" "${where[@]}" --command="set -e; mkdir -p $dir;\
 tar -xzf $archive -C $dir; cd $dir; INSTALL_PYTHON=1 launch/install.sh tpu"

# 4. Start the run on every worker at once.
args=(--config="$CONFIG" --workdir="$WORKDIR")
if [ "$NUM_SLICES" -gt 1 ]; then args+=(--config.mesh.dcn_data="$NUM_SLICES"); fi
args+=("$@")
run "${gc[@]}" ssh "$TPU_NAME" "${fanout[@]}" "${where[@]}" \
  --command="cd $dir && exec .venv/bin/python -m mtower_jax.main $(q "${args[@]}")"
