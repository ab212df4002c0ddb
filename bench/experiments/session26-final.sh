#!/usr/bin/env bash
# Session 26's second device call: HEAD's GPU kernel tests and memcheck, the lane-table form
# on every shape (ab_lane_all = HEAD + bp-lane-table-everywhere.patch: its GEMV GPU tests and
# an alternating A/B on 4096^2, the one benchmark shape where the choice changes), and HEAD's
# GEMV benchmark rows (M = 1 / 8, kernel times) on the four shapes.
set -uo pipefail
W=${OUT:-/tmp/jax_nf4_out}/w; mkdir -p "$W"
REPO=$PWD
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
for t in . ab_lane_all; do sed -i 's/"80-real;86-real;89-real;90a-real;90-virtual"/"90a-real"/' $t/CMakeLists.txt; done
python3 -m pip install --no-build-isolation --no-deps --target /tmp/ab_lane_all ./ab_lane_all \
  > $W/build_lane_all.log 2>&1 & bp=$!
OUT=$W bash bench/gpu_run.sh build 2>&1 | tail -2
wait $bp; el "builds done"; ls /tmp/ab_lane_all/jax_nf4/*.so > /dev/null || tail -5 $W/build_lane_all.log
(cd /tmp && XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_NF4_REQUIRE_GPU=1 timeout 330 python3 -m pytest -q \
  -p no:cacheprovider --rootdir=$REPO -c $REPO/pyproject.toml $REPO/tests/test_ops.py \
  $REPO/tests/test_double_quant.py -k gpu 2>&1) > $W/tests_main.log &
(XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS=--xla_gpu_autotune_level=0 timeout 330 \
  compute-sanitizer --tool memcheck --error-exitcode 9 python3 bench/sanitize_kernels.py matmul \
  > $W/memcheck_main.log 2>&1; echo "exit $?" >> $W/memcheck_main.log) &
R=$REPO/ab_lane_all
(cd /tmp && PYTHONPATH=/tmp/ab_lane_all XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_NF4_REQUIRE_GPU=1 timeout 330 \
  python3 -m pytest -q -p no:cacheprovider --rootdir=$R -c $R/pyproject.toml $R/tests/test_ops.py \
  $R/tests/test_double_quant.py \
  -k "gpu and (gemv_grid or matmul_rows or block_sizes or matmul_shapes or stacked or back_to_back or double_quant)" \
  2>&1) > $W/tests_lane_all.log &
wait
el "main GPU kernel tests: $(tail -1 $W/tests_main.log)"
el "main memcheck: $(grep -c ': ok' $W/memcheck_main.log) ok, $(grep 'ERROR SUMMARY' $W/memcheck_main.log | tail -1), $(tail -1 $W/memcheck_main.log)"
el "lane_all GEMV tests: $(tail -1 $W/tests_lane_all.log)"
cp bench/bench_matmul.py /tmp/bm.py
S="--kernel-times --shapes 4096x4096 --rows 1,8"
for r in 1 2; do
  timeout 40 python3 bench/bench_matmul.py $S --json $W/s_A$r.json > $W/s_A$r.txt 2>&1; el "A$r rc $?"
  (cd /tmp && PYTHONPATH=/tmp/ab_lane_all timeout 40 python3 /tmp/bm.py $S --json $W/s_L$r.json \
    > $W/s_L$r.txt 2>&1); el "lane_all$r rc $?"
done
timeout 90 python3 bench/bench_matmul.py --kernel-times --shapes 4096x4096,8192x8192,14336x4096,28672x8192 \
  --rows 1,8 --json $W/bench_head.json > $W/bench_head.txt 2>&1; el "head bench rc $?"
for r in 1 2; do python3 bench/ab_compare.py $W/s_A$r.json $W/s_L$r.json | grep -v quantize; done
cat $W/bench_head.txt | tail -30
