#!/usr/bin/env bash
# One device call: build with the default CUDA architectures, run the test suite on the GPU
# (skips become failures), compute-sanitizer on a small run of each kernel, then the benchmark.
# Usage (on the GPU machine, repo root): bash bench/gpu_run.sh [bench args...]
set -uo pipefail
OUT=${OUT:-/tmp/jax_nf4_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps . 2>&1 | tail -2
echo "build: $(( $(date +%s) - start )) s"
(cd /tmp && python3 -c "import jax, jax_nf4; print(jax.__version__, jax.devices(), 'cuda:', jax_nf4.cuda_available())")
REPO=$PWD
# From outside the checkout, so that the installed package (with its compiled modules) is imported.
(cd /tmp && JAX_NF4_REQUIRE_GPU=1 python3 -m pytest -q -p no:cacheprovider --rootdir="$REPO" \
  -c "$REPO/pyproject.toml" "$REPO/tests" 2>&1) | tee "$OUT/pytest.log" | tail -15
for tool in memcheck racecheck; do
  XLA_PYTHON_CLIENT_PREALLOCATE=false compute-sanitizer --tool $tool --error-exitcode 9 python3 bench/sanitize_kernels.py \
    > "$OUT/sanitize_$tool.log" 2>&1
  echo "compute-sanitizer $tool: exit $? ($(grep -c ': ok' "$OUT/sanitize_$tool.log") ok cases," \
       "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log" | tail -1))"
done
(cd /tmp && python3 -c "import flax, optax; print('flax', flax.__version__, 'optax', optax.__version__)") \
  || echo "flax/optax missing on this machine: tests/test_flax.py skips"
for example in inference qlora_finetune; do
  python3 examples/$example.py > "$OUT/example_$example.log" 2>&1
  echo "examples/$example.py: exit $? | $(tail -1 "$OUT/example_$example.log")"
done
python3 bench/bench_matmul.py --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.txt"
