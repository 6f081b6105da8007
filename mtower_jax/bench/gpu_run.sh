#!/usr/bin/env bash
# Issue 9's GPU measurements in two device calls of under 10 minutes each, from the repo root:
#
#   bash mtower_jax/bench/gpu_run.sh probe          # env, compile time per XLA setting, attention tests
#   bash mtower_jax/bench/gpu_run.sh base SETTING   # base, bfloat16: bridge + manager, then explicit attention
#
# Why two stages: the first H100 lease never saw a step, because compiling small's init took
# over 150 s (9.5 s on a laptop CPU) and base's step over 250 s, with XLA's warnings filtered
# out. `probe` keeps those warnings and, under each SETTING, times the first calls of two
# trivial programs and one small bfloat16 step's compile:
#   default      the image as it is
#   cuda_dir     the image's CUDA toolkit (/usr/local/cuda: ptxas) on PATH and named to XLA;
#                without ptxas XLA falls back to the driver's PTX compiler
#   no_autotune  cuda_dir, and no GEMM / fusion autotuning (--xla_gpu_autotune_level=0)
# and `base` runs the benchmark under the SETTING that compiled fastest.
#
# Logs and JSON go to $OUT (the device tool's folder that comes back) or runs/gpu_run. The
# device image lacks ml_collections: carry it as a wheel in .whl (BENCHMARKS.md "GPU").
# A CPU dry run of the script itself:
#   PLATFORM=cpu PROBE_MODEL=tiny BASE_MODEL=tiny BATCH=8 bash mtower_jax/bench/gpu_run.sh probe
set -uo pipefail
usage="usage: gpu_run.sh probe | base SETTING (SETTING: default | cuda_dir | no_autotune)"
stage=${1:-} setting=${2:-default}
case $stage:$setting in
  probe:default|base:default|base:cuda_dir|base:no_autotune) ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
out=${OUT:-runs/gpu_run}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export JAX_PLATFORMS=${PLATFORM:-cuda} TF_CPP_MIN_LOG_LEVEL=0
probe_model=${PROBE_MODEL:-small} base_model=${BASE_MODEL:-base} batch=${BATCH:-128}

if [ -d .whl ]; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

# Runs "$@" with SETTING's environment (in a subshell: settings do not leak into each other).
with_setting() {
  local name=$1; shift
  (
    case $name in
      default) ;;
      cuda_dir|no_autotune)
        export PATH=/usr/local/cuda/bin:$PATH
        export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_cuda_data_dir=/usr/local/cuda"
        if [ "$name" = no_autotune ]; then
          export XLA_FLAGS="$XLA_FLAGS --xla_gpu_autotune_level=0"
        fi ;;
    esac
    "$@"
  )
}

bench() {  # bench SETTING TIMEOUT LOG ARGS...: one train_step benchmark, its JSON appended
  local name=$1 limit=$2 log=$3; shift 3
  echo "== $name: train_step $*" | tee -a "$log"
  local line rc
  line=$(JAX_LOG_COMPILES=1 with_setting "$name" timeout "$limit" "$python" \
    -m mtower_jax.bench.train_step --dtype=bfloat16 --vs=none "$@" 2>>"$log")
  rc=$?
  # The result line, tagged with the setting it ran under.
  [ -n "$line" ] && printf '{"setting": "%s", %s\n' "$name" "${line#\{}" >>"$out/results.jsonl"
  grep -E '^\[bench\]|Finished XLA compilation|ptxas|[Ww]arning|[Ee]rror' "$log" | tail -n 20
  echo "== $name: exit $rc$([ $rc = 124 ] && echo ", stopped at $limit s")" | tee -a "$log"
}

first_compiles='
import time, jax, jax.numpy as jnp
for name, fn in [("ones [256, 256]", lambda: jnp.ones((256, 256))),
                 ("matmul [1024]^2", lambda: jnp.ones((1024, 1024)) @ jnp.ones((1024, 1024)))]:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    print(f"first call of {name}: {time.perf_counter() - start:.2f} s", flush=True)'

case $stage in
  probe)
    {
      nvidia-smi -L
      "$python" -c "import jax, jaxlib, flax, optax; print('jax', jax.__version__, 'jaxlib',
jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
      echo "ptxas on PATH: $(command -v ptxas || echo none)"
      ls -d /usr/local/cuda*/bin/ptxas 2>/dev/null || echo "no /usr/local/cuda*/bin/ptxas"
      "$python" -m pip list 2>/dev/null | grep -i -E '^(jax|nvidia-cuda-nvcc|nvidia-cudnn)'
    } 2>&1 | tee "$out/env.txt"
    for name in default cuda_dir no_autotune; do
      # A trivial program first: a pathological toolchain shows in seconds, not minutes.
      with_setting "$name" timeout 30 "$python" -c "$first_compiles" 2>>"$out/probe_$name.log" |
        sed "s/^/== $name: /"
      bench "$name" 100 "$out/probe_$name.log" --model="$probe_model" --batch="$batch" \
        --manager=false --rounds=1 --steps=1
    done
    echo "== attention tests"
    with_setting cuda_dir timeout 150 "$python" -m pytest -q -p no:cacheprovider \
      tests/test_attention.py >"$out/attention.log" 2>&1
    echo "== attention tests: exit $?"; tail -n 15 "$out/attention.log"
    ;;
  base)
    bench "$setting" 360 "$out/base.log" --model="$base_model" --batch="$batch"
    bench "$setting" 180 "$out/base.log" --model="$base_model" --batch="$batch" \
      --manager=false --rounds=3 --override=model.attention_impl=explicit
    ;;
esac
echo "== results ($out/results.jsonl)"
cat "$out/results.jsonl" 2>/dev/null
