#!/usr/bin/env bash
# Session 26: the two combinations of session 25's winners, in one device call:
#   ab_late_lean = HEAD + bp-dq-late-table-barrier + bp-lean-prologue
#   ab_lanelean  = HEAD + bp-dq-late-table-barrier-lane + bp-lean-prologue
# (make them with bench/ab_tree.sh). Builds beside main's, their GEMV GPU tests, then the A/B
# benchmark twice in alternating order (A, 1, 2, A, 1, 2) so drift shows.
set -uo pipefail
W=${OUT:-/tmp/jax_nf4_out}/w; mkdir -p "$W"
REPO=$PWD
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
TREES="late_lean lanelean"
for t in . $(for n in $TREES; do echo ab_$n; done); do
  sed -i 's/"80-real;86-real;89-real;90a-real;90-virtual"/"90a-real"/' $t/CMakeLists.txt
done
pids=()
for n in $TREES; do
  [[ -e /tmp/ab_$n/jax_nf4 ]] && continue
  python3 -m pip install --no-build-isolation --no-deps --target /tmp/ab_$n ./ab_$n \
    > $W/build_$n.log 2>&1 & pids+=($!)
done
(cd /tmp && python3 -c "import jax_nf4, sys; sys.exit(0 if jax_nf4.cuda_available() else 1)") 2>/dev/null \
  || OUT=$W bash bench/gpu_run.sh build 2>&1 | tail -2
for p in "${pids[@]}"; do wait $p; done
el "builds done"
for n in $TREES; do
  (cd /tmp && PYTHONPATH=/tmp/ab_$n XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_NF4_REQUIRE_GPU=1 timeout 300 \
    python3 -m pytest -q -p no:cacheprovider --rootdir=$REPO/ab_$n -c $REPO/ab_$n/pyproject.toml \
    $REPO/ab_$n/tests/test_ops.py $REPO/ab_$n/tests/test_double_quant.py \
    -k "gpu and (gemv_grid or matmul_rows or block_sizes or matmul_shapes or stacked or back_to_back or double_quant)" \
    2>&1) > $W/tests_$n.log &
done
wait
for n in $TREES; do el "$n GEMV tests: $(tail -1 $W/tests_$n.log)"; done
cp bench/bench_matmul.py /tmp/bm.py
B="--kernel-times --shapes 4096x4096,8192x8192,14336x4096,28672x8192 --rows 1,8"
for r in 1 2; do
  timeout 70 python3 bench/bench_matmul.py $B --json $W/bench_A$r.json > $W/bench_A$r.txt 2>&1; el "A$r rc $?"
  for n in $TREES; do
    (cd /tmp && PYTHONPATH=/tmp/ab_$n timeout 70 python3 /tmp/bm.py $B --json $W/bench_$n$r.json \
      > $W/bench_$n$r.txt 2>&1); el "$n$r rc $?"
  done
done
for r in 1 2; do
  python3 bench/ab_compare.py $W/bench_A$r.json $W/bench_late_lean$r.json $W/bench_lanelean$r.json | grep -v quantize
done
