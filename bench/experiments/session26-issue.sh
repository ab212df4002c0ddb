#!/usr/bin/env bash
# Session 26: ab_late_issue (HEAD + bp-issue-after-first-use.patch) against HEAD in one call:
# builds, the tree's GEMV GPU tests, then alternating A/B (A, E, A, E) at M = 1, 8.
set -uo pipefail
W=${OUT:-/tmp/jax_nf4_out}/w; mkdir -p "$W"
REPO=$PWD
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
for t in . ab_late_issue; do sed -i 's/"80-real;86-real;89-real;90a-real;90-virtual"/"90a-real"/' $t/CMakeLists.txt; done
python3 -m pip install --no-build-isolation --no-deps --target /tmp/ab_E ./ab_late_issue > $W/build_E.log 2>&1 & bp=$!
OUT=$W bash bench/gpu_run.sh build 2>&1 | tail -1
wait $bp; el "builds done"; ls /tmp/ab_E/jax_nf4/*.so > /dev/null || tail -5 $W/build_E.log
R=$REPO/ab_late_issue
(cd /tmp && PYTHONPATH=/tmp/ab_E XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_NF4_REQUIRE_GPU=1 timeout 200 \
  python3 -m pytest -q -x -p no:cacheprovider --rootdir=$R -c $R/pyproject.toml $R/tests/test_ops.py \
  $R/tests/test_double_quant.py \
  -k "gpu and (gemv_grid or matmul_rows or block_sizes or matmul_shapes or stacked or back_to_back or double_quant)" \
  2>&1) > $W/tests_E.log
el "E GEMV tests: $(tail -1 $W/tests_E.log)"
cp bench/bench_matmul.py /tmp/bm.py
S="--kernel-times --shapes 4096x4096,8192x8192,28672x8192 --rows 1,8"
for r in 1 2; do
  timeout 60 python3 bench/bench_matmul.py $S --json $W/A$r.json > $W/A$r.txt 2>&1; el "A$r rc $?"
  (cd /tmp && PYTHONPATH=/tmp/ab_E timeout 60 python3 /tmp/bm.py $S --json $W/E$r.json > $W/E$r.txt 2>&1)
  el "E$r rc $?"
done
for r in 1 2; do python3 bench/ab_compare.py $W/A$r.json $W/E$r.json | grep -v quantize; done
