#!/usr/bin/env bash
# The GPU run, in stages that fit the device tool's 10-minute calls:
#   bash bench/gpu_run.sh check          build (default CUDA architectures), the test suite with
#                                        GPU skips turned into failures, compute-sanitizer
#                                        memcheck + racecheck over every kernel path, examples
#   bash bench/gpu_run.sh quick          build, then the GPU cases of the kernel tests only
#   bash bench/gpu_run.sh bench [args]   the benchmark table (args go to bench/bench_matmul.py)
#   bash bench/gpu_run.sh all [args]     both
# Logs go to $OUT (the device tool's output folder) or /tmp/jax_nf4_out.
set -uo pipefail
stage=${1:-all}
shift || true
OUT=${OUT:-/tmp/jax_nf4_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
REPO=$PWD

build() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  local start=$(date +%s)
  python3 -m pip install --no-build-isolation --no-deps . 2>&1 | tail -1
  echo "build: $(( $(date +%s) - start )) s"
}

quick() {
  build
  (cd /tmp && JAX_NF4_REQUIRE_GPU=1 python3 -m pytest -q -x -p no:cacheprovider --rootdir="$REPO" \
    -c "$REPO/pyproject.toml" "$REPO/tests/test_ops.py" "$REPO/tests/test_double_quant.py" \
    -k gpu 2>&1) | tee "$OUT/pytest_quick.log" | tail -8
}

check() {
  build
  # From outside the checkout, so that the installed package (with its compiled modules) is used.
  (cd /tmp && python3 -c "import jax, jax_nf4; print(jax.__version__, jax.devices(), 'cuda:', jax_nf4.cuda_available())")
  (cd /tmp && python3 -c "import flax, optax; print('flax', flax.__version__, 'optax', optax.__version__)") \
    || echo "flax/optax missing on this machine: tests/test_flax.py and the examples skip"
  (cd /tmp && JAX_NF4_REQUIRE_GPU=1 python3 -m pytest -q -p no:cacheprovider --rootdir="$REPO" \
    -c "$REPO/pyproject.toml" "$REPO/tests" 2>&1) | tee "$OUT/pytest.log" | tail -8
  for tool in memcheck racecheck; do
    # XLA's GEMM autotuning is slow and has crashed under memcheck: our kernels are the target.
    XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS=--xla_gpu_autotune_level=0 \
      compute-sanitizer --tool $tool --error-exitcode 9 \
      python3 bench/sanitize_kernels.py > "$OUT/sanitize_$tool.log" 2>&1
    echo "compute-sanitizer $tool: exit $? ($(grep -c ': ok' "$OUT/sanitize_$tool.log") ok cases," \
         "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log" | tail -1))"
  done
  for example in inference qlora_finetune; do
    python3 examples/$example.py > "$OUT/example_$example.log" 2>&1
    echo "examples/$example.py: exit $? | $(tail -2 "$OUT/example_$example.log" | head -1)"
  done
}

bench() {
  python3 bench/bench_matmul.py --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.txt"
}

case $stage in
  check) check ;;
  quick) quick ;;
  bench) bench "$@" ;;
  all) check && bench "$@" ;;
  *) echo "usage: bash bench/gpu_run.sh [check|quick|bench|all] [bench args]" >&2; exit 2 ;;
esac
