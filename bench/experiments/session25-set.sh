#!/usr/bin/env bash
# The device run of session 25's prepared GEMV experiments (bench/NOTES.md "Next, as of session
# 25"), in two calls of under 10 minutes that share their builds while the machine stays warm:
#   bash bench/experiments/session25-set.sh tests   # builds, GPU tests, memcheck
#   bash bench/experiments/session25-set.sh bench   # builds what is missing, the A/B bench
# Make the trees first, on this machine (each is HEAD plus one patch):
#   for t in probe late late_lane builtin lean; do bash bench/ab_tree.sh $t \
#     bench/experiments/$(echo $t | sed 's/^probe$/probe-dq-table-distinct/; s/^late$/bp-dq-late-table-barrier/;
#       s/^late_lane$/bp-dq-late-table-barrier-lane/; s/^builtin$/bp-dq-builtin-map/; s/^lean$/bp-lean-prologue/').patch; done
# Logs go to $OUT/w (the device tool's output folder).
set -uo pipefail
stage=${1:?tests or bench}
W=${OUT:-/tmp/jax_nf4_out}/w; mkdir -p "$W"
REPO=$PWD
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
TREES="probe late late_lane builtin lean"
for t in . $(for n in $TREES; do echo ab_$n; done); do
  sed -i 's/"80-real;86-real;89-real;90a-real;90-virtual"/"90a-real"/' $t/CMakeLists.txt
done
# Builds: main into site-packages, each tree into /tmp/ab_NAME, in parallel (skipped if present).
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
for n in $TREES; do ls /tmp/ab_$n/jax_nf4/*.so > /dev/null 2>&1 || { echo "$n: build failed"; tail -5 $W/build_$n.log; }; done

gemv_tests() {  # gemv_tests NAME ROOT [PYTHONPATH]: the GEMV GPU tests of a tree
  (cd /tmp && PYTHONPATH=${3:-} XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_NF4_REQUIRE_GPU=1 timeout 400 \
    python3 -m pytest -q -p no:cacheprovider --rootdir=$2 -c $2/pyproject.toml $2/tests/test_ops.py \
    $2/tests/test_double_quant.py \
    -k "gpu and (gemv_grid or matmul_rows or block_sizes or matmul_shapes or stacked or back_to_back or double_quant)" \
    2>&1) > $W/tests_$1.log
}
memcheck() {  # memcheck NAME [PYTHONPATH]
  (PYTHONPATH=${2:-} XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS=--xla_gpu_autotune_level=0 timeout 400 \
    compute-sanitizer --tool memcheck --error-exitcode 9 python3 bench/sanitize_kernels.py matmul \
    > $W/memcheck_$1.log 2>&1; echo "exit $?" >> $W/memcheck_$1.log)
}

if [[ $stage == tests ]]; then
  # Main: every GPU kernel test (the new lane-table cases among them) and memcheck; the trees
  # with correct results (not the probe): their GEMV tests. (The benchmark's new dq value check
  # runs in the bench stage, on main's four shapes.)
  (cd /tmp && XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_NF4_REQUIRE_GPU=1 timeout 400 python3 -m pytest -q \
    -p no:cacheprovider --rootdir=$REPO -c $REPO/pyproject.toml $REPO/tests/test_ops.py \
    $REPO/tests/test_double_quant.py -k gpu 2>&1) > $W/tests_main.log &
  memcheck main &
  for n in late late_lane builtin lean; do gemv_tests $n $REPO/ab_$n /tmp/ab_$n & done
  wait
  el "main GPU kernel tests: $(tail -1 $W/tests_main.log)"
  el "main memcheck: $(grep -c ': ok' $W/memcheck_main.log) ok, $(grep 'ERROR SUMMARY' $W/memcheck_main.log | tail -1), $(tail -1 $W/memcheck_main.log)"
  for n in late late_lane builtin lean; do el "$n GEMV tests: $(tail -1 $W/tests_$n.log)"; done
elif [[ $stage == bench ]]; then
  cp bench/bench_matmul.py /tmp/bm.py
  B="--kernel-times --shapes 4096x4096,8192x8192,14336x4096,28672x8192 --rows 1,8"
  timeout 100 python3 bench/bench_matmul.py $B --json $W/bench_A.json > $W/bench_A.txt 2>&1; el "A bench rc $?"
  for n in late late_lane builtin lean; do
    (cd /tmp && PYTHONPATH=/tmp/ab_$n timeout 100 python3 /tmp/bm.py $B --json $W/bench_$n.json \
      > $W/bench_$n.txt 2>&1); el "$n bench rc $?"
  done
  P="--kernel-times --shapes 4096x4096 --rows 1,8 --no-check"
  timeout 40 python3 bench/bench_matmul.py $P --json $W/bench_A4.json > $W/bench_A4.txt 2>&1
  (cd /tmp && PYTHONPATH=/tmp/ab_probe timeout 40 python3 /tmp/bm.py $P --json $W/bench_probe.json \
    > $W/bench_probe.txt 2>&1); el "probe bench rc $?"
  python3 bench/ab_compare.py $W/bench_A.json $W/bench_late.json $W/bench_late_lane.json \
    $W/bench_builtin.json $W/bench_lean.json | grep -v quantize
  python3 bench/ab_compare.py $W/bench_A4.json $W/bench_probe.json | grep "dq matmul"
fi
