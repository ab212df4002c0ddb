#!/usr/bin/env bash
# Session 26's last device call: ab_shfl (HEAD + quad-shuffle-width4.patch) against HEAD: its
# GPU kernel tests and memcheck, then the A/B in alternating order (A, shfl, A, shfl) on
# 4096^2, 8192^2 and 28672x8192 at M = 1, 8 (byte-pair GEMV) and 16 (tiled kernel).
set -uo pipefail
W=${OUT:-/tmp/jax_nf4_out}/w; mkdir -p "$W"
REPO=$PWD
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
for t in . ab_shfl; do sed -i 's/"80-real;86-real;89-real;90a-real;90-virtual"/"90a-real"/' $t/CMakeLists.txt; done
python3 -m pip install --no-build-isolation --no-deps --target /tmp/ab_shfl ./ab_shfl > $W/build_shfl.log 2>&1 & bp=$!
OUT=$W bash bench/gpu_run.sh build 2>&1 | tail -2
wait $bp; el "builds done"; ls /tmp/ab_shfl/jax_nf4/*.so > /dev/null || tail -5 $W/build_shfl.log
R=$REPO/ab_shfl
(cd /tmp && PYTHONPATH=/tmp/ab_shfl XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_NF4_REQUIRE_GPU=1 timeout 330 \
  python3 -m pytest -q -p no:cacheprovider --rootdir=$R -c $R/pyproject.toml $R/tests/test_ops.py \
  $R/tests/test_double_quant.py -k gpu 2>&1) > $W/tests_shfl.log &
(PYTHONPATH=/tmp/ab_shfl XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS=--xla_gpu_autotune_level=0 timeout 330 \
  compute-sanitizer --tool memcheck --error-exitcode 9 python3 $R/bench/sanitize_kernels.py matmul \
  > $W/memcheck_shfl.log 2>&1; echo "exit $?" >> $W/memcheck_shfl.log) &
wait
el "shfl GPU kernel tests: $(tail -1 $W/tests_shfl.log)"
el "shfl memcheck: $(grep -c ': ok' $W/memcheck_shfl.log) ok, $(grep 'ERROR SUMMARY' $W/memcheck_shfl.log | tail -1), $(tail -1 $W/memcheck_shfl.log)"
cp bench/bench_matmul.py /tmp/bm.py
S="--kernel-times --shapes 4096x4096,8192x8192,28672x8192 --rows 1,8,16"
for r in 1 2; do
  timeout 70 python3 bench/bench_matmul.py $S --json $W/A$r.json > $W/A$r.txt 2>&1; el "A$r rc $?"
  (cd /tmp && PYTHONPATH=/tmp/ab_shfl timeout 70 python3 /tmp/bm.py $S --json $W/S$r.json > $W/S$r.txt 2>&1)
  el "shfl$r rc $?"
done
for r in 1 2; do python3 bench/ab_compare.py $W/A$r.json $W/S$r.json | grep -v quantize; done
