#!/usr/bin/env bash
# The next session's first device work (bench/NOTES.md "Next, as of session 26"), in two calls
# of under 10 minutes sharing their builds while the machine stays warm:
#   bash bench/experiments/session27-set.sh tests   # builds; main's GPU kernel tests and
#                                                   # memcheck (96d4239 never ran as a whole);
#                                                   # the two trees' GEMV tests and memcheck
#   bash bench/experiments/session27-set.sh bench   # A/B at M = 1, 8, two alternating runs
# Make the trees first, on this machine:
#   for t in nt1 all; do bash bench/ab_tree.sh late_$t bench/experiments/bp-late-issue-$t.patch; done
# Logs go to $OUT/w; wrap: `timeout 585 bash ...; tar -czf $OUT/logs.tgz -C $OUT w` (the device
# tool returns at most 8 files).
set -uo pipefail
stage=${1:?tests or bench}
W=${OUT:-/tmp/jax_nf4_out}/w; mkdir -p "$W"
REPO=$PWD
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
TREES="late_nt1 late_all"
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
  || OUT=$W bash bench/gpu_run.sh build 2>&1 | tail -1
for p in "${pids[@]}"; do wait $p; done
el "builds done"
for n in $TREES; do ls /tmp/ab_$n/jax_nf4/*.so > /dev/null 2>&1 || { echo "$n: build failed"; tail -5 $W/build_$n.log; }; done

memcheck() {  # memcheck NAME [PYTHONPATH]
  (PYTHONPATH=${2:-} XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS=--xla_gpu_autotune_level=0 timeout 330 \
    compute-sanitizer --tool memcheck --error-exitcode 9 python3 bench/sanitize_kernels.py matmul \
    > $W/memcheck_$1.log 2>&1; echo "exit $?" >> $W/memcheck_$1.log)
}
if [[ $stage == tests ]]; then
  (cd /tmp && XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_NF4_REQUIRE_GPU=1 timeout 330 python3 -m pytest -q \
    -p no:cacheprovider --rootdir=$REPO -c $REPO/pyproject.toml $REPO/tests/test_ops.py \
    $REPO/tests/test_double_quant.py -k gpu 2>&1) > $W/tests_main.log &
  memcheck main &
  for n in $TREES; do
    R=$REPO/ab_$n
    (cd /tmp && PYTHONPATH=/tmp/ab_$n XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_NF4_REQUIRE_GPU=1 timeout 330 \
      python3 -m pytest -q -p no:cacheprovider --rootdir=$R -c $R/pyproject.toml $R/tests/test_ops.py \
      $R/tests/test_double_quant.py \
      -k "gpu and (gemv_grid or matmul_rows or block_sizes or matmul_shapes or stacked or back_to_back or double_quant)" \
      2>&1) > $W/tests_$n.log &
    memcheck $n /tmp/ab_$n &
  done
  wait
  el "main GPU kernel tests: $(tail -1 $W/tests_main.log)"
  for n in main $TREES; do
    el "$n memcheck: $(grep -c ': ok' $W/memcheck_$n.log) ok, $(grep 'ERROR SUMMARY' $W/memcheck_$n.log | tail -1), $(tail -1 $W/memcheck_$n.log)"
  done
  for n in $TREES; do el "$n GEMV tests: $(tail -1 $W/tests_$n.log)"; done
elif [[ $stage == bench ]]; then
  cp bench/bench_matmul.py /tmp/bm.py
  B="--kernel-times --shapes 4096x4096,8192x8192,14336x4096,28672x8192 --rows 1,8"
  for r in 1 2; do
    timeout 70 python3 bench/bench_matmul.py $B --json $W/A$r.json > $W/A$r.txt 2>&1; el "A$r rc $?"
    for n in $TREES; do
      (cd /tmp && PYTHONPATH=/tmp/ab_$n timeout 70 python3 /tmp/bm.py $B --json $W/${n}$r.json \
        > $W/${n}$r.txt 2>&1); el "$n$r rc $?"
    done
  done
  for r in 1 2; do
    python3 bench/ab_compare.py $W/A$r.json $W/late_nt1$r.json $W/late_all$r.json | grep -v quantize
  done
fi
