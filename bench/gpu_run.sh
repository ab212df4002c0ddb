#!/usr/bin/env bash
# The GPU run, in stages that fit the device tool's 10-minute calls:
#   bash bench/gpu_run.sh STAGE[,STAGE...] [bench args]
# Stages:
#   build      pip install of this checkout (default CUDA architectures, or JAX_NF4_ARCHS, e.g.
#              90a-real: one architecture builds in about half the time; JAX_NF4_LINEINFO=1 adds
#              -lineinfo, so that the profile stage can attribute stalls to source lines)
#   tests      the whole test suite with GPU skips turned into failures
#   quick      the GPU cases of the kernel tests only
#   sanitize   compute-sanitizer memcheck + racecheck over every kernel path
#   examples   examples/inference.py and examples/qlora_finetune.py
#   bench      the kernel benchmark table (args go to bench/bench_matmul.py)
#   decode     bench/bench_decode.py (8B decode, 70B shard timing)
#   attention  bench/bench_attention.py (one decode-attention step: the kernel against XLA's)
#   tp         bench/bench_decode.py (d): 70B decoding on 1 GPU and tensor-parallel on all GPUs,
#              then again with TP_XLA_FLAGS (default: XLA command buffers for the decode step)
#   profile    Nsight Compute on the M = 1 GEMV of 28672x8192 and 4096x4096 and the tiled
#              kernel at M = 64 (speed of light, memory workload, warp stalls, and per source
#              line with a JAX_NF4_LINEINFO=1 build; the kernel's own duration, without launch
#              gaps); the full reports go to $OUT/ncu_*.ncu-rep. PROFILE_CASES="SHAPE:M[:dq] ..."
#              picks other cases (:dq for double-quantized scales); to profile an A/B tree's
#              build, PYTHONPATH=/tmp/ab_NAME PROFILE_TAG=NAME_ (prefixes the report names);
#              PROFILE_ARGS="--copies 8" chains the calls over weight copies as the benchmark
#              does, with e.g. PROFILE_NCU_ARGS="--cache-control none --launch-skip 8
#              --launch-count 2" for the chain's steady state (default: one call, caches flushed)
#   probe      bench/wgmma_probe.cu: the wgmma register-A / descriptor conventions (sm_90a)
#   floor      bench/read_floor.cu: the read-only floor for the benchmark's weight byte counts, and
#              the byte-pair GEMV's access pattern (layout A, tile-major) read without arithmetic
#   ab         this checkout (A, installed by `build`: run `build,ab` on a fresh machine) against
#              other trees given as the first bench arg, comma-separated (untracked folders in
#              the checkout with distinct names: `bash bench/ab_tree.sh x PATCH...` makes ab_x,
#              HEAD plus patches; or `git archive BRANCH | tar -x -C ab_x`): each built into
#              /tmp/ab_NAME in parallel (JAX_NF4_ARCHS as for build), their GPU kernel tests
#              side by side with A's (AB_TESTS=0 skips them; AB_TEST_K="EXPR" narrows them to
#              pytest -k "gpu and (EXPR)"; AB_MEMCHECK=1 adds compute-sanitizer memcheck of the
#              matmul cases for A and each tree), then the bench (the other args) for A and each
#              in turn, AB_ROUNDS times (default 1; alternating A, trees, A, trees, ... so that
#              drift shows), and bench/ab_compare.py's table per round (AB_BENCH=0: no bench)
#   check      = build,tests,sanitize,examples
# Logs go to $OUT (the device tool's output folder) or /tmp/jax_nf4_out.
set -uo pipefail
stages=${1:-check}
shift || true
OUT=${OUT:-/tmp/jax_nf4_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
REPO=$PWD

cmake_flags() {  # the pip -C options of JAX_NF4_ARCHS and JAX_NF4_LINEINFO
  [[ -n ${JAX_NF4_ARCHS:-} ]] && echo "-C cmake.define.CMAKE_CUDA_ARCHITECTURES=$JAX_NF4_ARCHS"
  [[ ${JAX_NF4_LINEINFO:-0} == 1 ]] && echo "-C cmake.define.CMAKE_CUDA_FLAGS=-lineinfo"
  return 0
}

build() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  local start=$(date +%s)
  python3 -m pip install --no-build-isolation --no-deps $(cmake_flags) . 2>&1 | tail -1
  echo "build: $(( $(date +%s) - start )) s"
  # From outside the checkout, so that the installed package (with its compiled modules) is used.
  (cd /tmp && python3 -c "import jax, jax_nf4; print(jax.__version__, jax.devices(), 'cuda:', jax_nf4.cuda_available())")
}

pytest_gpu() {  # pytest_gpu ROOT LOG ARGS...: tree ROOT's tests from outside it, GPU skips failing
  local root=$1 log=$2; shift 2
  (cd /tmp && JAX_NF4_REQUIRE_GPU=1 python3 -m pytest -q -p no:cacheprovider --rootdir="$root" \
    -c "$root/pyproject.toml" "$@" 2>&1) | tee "$OUT/$log" | tail -8
}

kernel_tests() {  # kernel_tests ROOT LOG [K]: the GPU cases of tree ROOT's kernel tests (-k "gpu and (K)")
  pytest_gpu "$1" "$2" -x "$1/tests/test_ops.py" "$1/tests/test_double_quant.py" \
    -k "gpu${3:+ and ($3)}"
}

sanitized() {  # sanitized ROOT TOOL LOG [CASES]: compute-sanitizer TOOL over tree ROOT's
  # bench/sanitize_kernels.py (PYTHONPATH picks the build; CASES: matmul or attention, else all),
  # then one line: its exit status, the cases that passed, the sanitizer's summary. XLA's GEMM
  # autotuning is slow and has crashed under memcheck: our kernels are the target.
  XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS=--xla_gpu_autotune_level=0 \
    compute-sanitizer --tool "$2" --error-exitcode 9 \
    python3 "$1/bench/sanitize_kernels.py" ${4:-} > "$OUT/$3" 2>&1
  echo "exit $?: $(grep -c ': ok' "$OUT/$3") ok cases," \
       "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$3" | tail -1)"
}

tests() {
  (cd /tmp && python3 -c "import flax, optax; print('flax', flax.__version__, 'optax', optax.__version__)") \
    || echo "flax/optax missing on this machine: tests/test_flax.py and the examples skip"
  pytest_gpu "$REPO" pytest.log "$REPO/tests"
}

quick() {
  kernel_tests "$REPO" pytest_quick.log
}

sanitize() {
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do  # SANITIZE_TOOLS=memcheck: one of them
    echo "compute-sanitizer $tool: $(sanitized "$REPO" $tool "sanitize_$tool.log")"
  done
}

examples() {
  for example in inference qlora_finetune; do
    python3 examples/$example.py > "$OUT/example_$example.log" 2>&1
    echo "examples/$example.py: exit $? | $(tail -2 "$OUT/example_$example.log" | head -1)"
  done
}

bench() {
  python3 bench/bench_matmul.py --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.txt"
}

profile() {
  for case in ${PROFILE_CASES:-28672x8192:1 4096x4096:1 28672x8192:64}; do
    local shape rows dq name
    IFS=: read -r shape rows dq <<< "$case"
    name=ncu_${PROFILE_TAG:-}${shape}_m$rows${dq:+_dq}
    ncu --clock-control none -k regex:'Gemv|GemmTile|GemmWgmma' ${PROFILE_NCU_ARGS:---launch-skip 2 --launch-count 1} \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
      --section LaunchStats --section Occupancy --section SourceCounters \
      --import-source yes --export "$OUT/$name" --force-overwrite \
      python3 bench/profile_gemv.py --shape $shape --rows $rows ${dq:+--double-quant} \
      ${PROFILE_ARGS:-} > "/tmp/$name.log" 2>&1
    local rc=$?
    ncu --import "$OUT/$name.ncu-rep" > "$OUT/$name.txt" 2>&1
    echo "ncu $case: exit $rc | $(grep -E 'Duration|DRAM Throughput|Compute \(SM\)' \
      "$OUT/$name.txt" | tr -s ' ' | tr '\n' ';')"
  done
}

probe() {
  nvcc -std=c++17 -O2 -gencode arch=compute_90a,code=sm_90a bench/wgmma_probe.cu \
    -o /tmp/wgmma_probe && /tmp/wgmma_probe
  echo "wgmma probe: exit $?"
}

floor() {
  nvcc -O3 -std=c++17 -gencode arch=compute_90,code=sm_90 bench/read_floor.cu -o /tmp/read_floor \
    && /tmp/read_floor | tee "$OUT/read_floor.txt"
}

attention() {
  python3 bench/bench_attention.py --json "$OUT/attention.json" 2>&1 | tee "$OUT/attention.txt"
}

decode() {
  python3 bench/bench_decode.py --skip-tp --json "$OUT/decode.json" 2>&1 | tee "$OUT/decode.log"
}

tp() {  # the 70B NF4 model (44 GB) and a shard of it on GPU 0 at once: let XLA have 92%
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 python3 bench/bench_decode.py --skip-8b --skip-70b \
    --json "$OUT/decode_tp.json" 2>&1 | tee "$OUT/decode_tp.log"
  # Then tp = 1 and all GPUs with TP_XLA_FLAGS: by default XLA command buffers (CUDA graphs)
  # for the whole decode step, since at tp = 4 one host thread launching for four GPUs left
  # them 1.83 ms idle per token (session 7; its one-shot all-reduce kernel changed nothing:
  # TP_XLA_FLAGS=--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true reruns that).
  local graphs="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,COLLECTIVES"
  graphs+=",CONDITIONAL,WHILE --xla_gpu_graph_min_graph_size=1"
  local flags=${TP_XLA_FLAGS:-$graphs}
  echo "with $flags:"
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 XLA_FLAGS="${XLA_FLAGS:-} $flags" \
    python3 bench/bench_decode.py --skip-8b --skip-70b --tps "1,$(nvidia-smi -L | wc -l)" \
    --json "$OUT/decode_tp_flags.json" \
    2>&1 | tee "$OUT/decode_tp_flags.log"
}

ab() {  # ab DIR[,DIR...] [bench args]
  local dirs=(${1//,/ }); shift
  local i names=() pids=() jsons=()
  for i in "${!dirs[@]}"; do  # the builds in parallel, each into its own folder
    names+=("$(basename "${dirs[$i]}")"); names[$i]=${names[$i]#ab_}
    rm -rf "/tmp/ab_${names[$i]}"
    python3 -m pip install --no-build-isolation --no-deps $(cmake_flags) \
      --target "/tmp/ab_${names[$i]}" "$REPO/${dirs[$i]}" > "$OUT/ab_build_${names[$i]}.log" 2>&1 &
    pids+=($!)
  done
  for i in "${!dirs[@]}"; do
    wait "${pids[$i]}" || { echo "build of ${dirs[$i]} failed:"
                            tail -5 "$OUT/ab_build_${names[$i]}.log"; return 1; }
  done
  for i in "${!dirs[@]}"; do
    (cd /tmp && PYTHONPATH="/tmp/ab_${names[$i]}" python3 -c \
      "import jax_nf4; print('${names[$i]} is', jax_nf4.__file__)")
  done
  if [[ ${AB_TESTS:-1} == 1 || ${AB_MEMCHECK:-0} == 1 ]]; then
    # The checks of A and the trees side by side (no XLA preallocation, so that they share the
    # GPU), before any timing: kernel tests unless AB_TESTS=0 (e.g. trees of tested commits),
    # memcheck with AB_MEMCHECK=1; their summaries are printed when all are done.
    local roots=("$REPO") tags=(A) paths=("")
    for i in "${!dirs[@]}"; do
      roots+=("$REPO/${dirs[$i]}"); tags+=("${names[$i]}"); paths+=("/tmp/ab_${names[$i]}")
    done
    if [[ ${AB_TESTS:-1} == 1 ]]; then
      for i in "${!roots[@]}"; do
        (XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH="${paths[$i]}" kernel_tests \
          "${roots[$i]}" "ab_tests_${tags[$i]}.log" "${AB_TEST_K:-}" > /dev/null
         echo "${tags[$i]}'s GPU kernel tests: $(tail -1 "$OUT/ab_tests_${tags[$i]}.log")") \
          > "$OUT/ab_check_${tags[$i]}_tests.txt" &
      done
    fi
    if [[ ${AB_MEMCHECK:-0} == 1 ]]; then
      # At most two memchecks at once: with three beside the tests, the third process crashed
      # (exit 139, no error reported) at the same case in two of three calls of session 27.
      local lane
      for lane in 0 1; do
        for i in "${!roots[@]}"; do
          (( i % 2 == lane )) || continue
          echo "${tags[$i]}'s memcheck: $(PYTHONPATH="${paths[$i]}" sanitized \
            "${roots[$i]}" memcheck "ab_memcheck_${tags[$i]}.log" matmul)" \
            > "$OUT/ab_check_${tags[$i]}_memcheck.txt"
        done &
      done
    fi
    wait
    cat "$OUT"/ab_check_*.txt && rm -f "$OUT"/ab_check_*.txt
  fi
  if [[ ${AB_BENCH:-1} == 1 ]]; then
    local round
    for (( round = 1; round <= ${AB_ROUNDS:-1}; round++ )); do
      local tag=""
      (( ${AB_ROUNDS:-1} > 1 )) && tag=_r$round
      jsons=("$OUT/ab_A$tag.json")
      python3 bench/bench_matmul.py --json "$OUT/ab_A$tag.json" "$@" > "$OUT/ab_bench_A$tag.txt" 2>&1
      for i in "${!dirs[@]}"; do
        local name=${names[$i]}
        PYTHONPATH="/tmp/ab_$name" python3 bench/bench_matmul.py --json "$OUT/ab_$name$tag.json" \
          "$@" > "$OUT/ab_bench_$name$tag.txt" 2>&1 || tail -3 "$OUT/ab_bench_$name$tag.txt"
        jsons+=("$OUT/ab_$name$tag.json")
      done
      python3 bench/ab_compare.py "${jsons[@]}" | tee "$OUT/ab$tag.md"
    done
  fi
  # The device tool brings back a handful of files: the logs travel as one archive.
  (cd "$OUT" && shopt -s nullglob && logs=(ab_build_*.log ab_tests_*.log ab_memcheck_*.log \
    ab_bench_*.txt) && (( ${#logs[@]} )) && tar -czf ab_logs.tar.gz "${logs[@]}" && rm -f "${logs[@]}")
}

[[ $stages == check ]] && stages=build,tests,sanitize,examples
for stage in ${stages//,/ }; do
  case $stage in
    build|tests|quick|sanitize|examples|attention|decode|tp|profile|probe|floor) $stage ;;
    bench) bench "$@" ;;
    ab) ab "$@" ;;
    *) echo "usage: bash bench/gpu_run.sh STAGE[,STAGE...] [bench args]" \
            "(build tests quick sanitize examples bench ab attention decode tp profile probe floor check)" >&2; exit 2 ;;
  esac
done
