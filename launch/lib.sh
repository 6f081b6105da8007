# Shared by the launch scripts; sourced, not run. Keep it bash 3.2-safe: tpu_pod.sh runs on
# laptops (macOS ships bash 3.2), so no mapfile and no "${empty_array[@]}" under `set -u`.
#
# DRY_RUN=1: every command a launcher would run is printed as "+ cmd" (quoted so that it can be
# pasted back into a shell) and nothing is run. The trace goes to stderr, like `set -x`, so that
# `state=$(query ...)` captures only the command's own output.

is_dry() { [ "${DRY_RUN:-0}" != 0 ]; }

# show CMD...: print "+ CMD" on stderr; words outside a safe set are single-quoted.
show() {
  local out="+" word sq="'" esc="'\\''"
  for word in "$@"; do
    case $word in
      "" | *[!A-Za-z0-9_./:=,@%+-]*) out="$out '${word//$sq/$esc}'" ;;
      *) out="$out $word" ;;
    esac
  done
  printf '%s\n' "$out" >&2
}

# run CMD...: trace CMD, then run it unless this is a dry run.
run() { show "$@"; is_dry || "$@"; }

# run_exec CMD...: like run, but CMD replaces this shell (it gets signals directly).
run_exec() {
  show "$@"
  if is_dry; then exit 0; fi
  exec "$@"
}

# query CMD...: a read-only question (e.g. gcloud describe): traced, its stderr and failure
# swallowed; prints CMD's stdout, nothing in a dry run (so a dry run assumes "nothing exists").
query() { show "$@"; is_dry || "$@" 2>/dev/null || true; }

die() { echo "$(basename "$0"): $*" >&2; exit 2; }

# q WORD...: the words shell-quoted for a command line that another shell runs (ssh --command).
q() {
  local quoted
  quoted=$(printf '%q ' "$@")
  printf '%s' "${quoted% }"
}

# gpu_env: sets GPU_ENV, the environment of a GPU training process, as VAR=value words for
# `env`. The latency-hiding scheduler lets XLA overlap collectives with compute; JAX's allocator
# takes 0.9 of GPU memory instead of its 0.75 default. The caller's XLA_FLAGS come last: a flag
# given twice takes its last value.
gpu_env() {
  GPU_ENV=("XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true${XLA_FLAGS:+ $XLA_FLAGS}"
           "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}")
}
