#!/usr/bin/env bash
# The GPU check: what se_kernels needs proven on a GPU, on a bare machine with no network (the
# lent H100 and H200 machines: Python 3.12, torch 2.11.0, triton 3.6.0, 16 cores), in calls of
# at most 8 minutes. Prepare on a CPU machine first, then run from the source tree, with
# .gpu/ beside it:
#
#   bash benchmarks/gpu_prepare.sh         # here: the prebuilt _C and missing wheels, in .gpu/
#   bash benchmarks/gpu_check.sh           # there, first call: the verdict and the tables
#   GPU_CHECK_STAGES="ctas1 grouped memcheck racecheck synccheck initcheck compile-max tests-slow small-batch" \
#     GPU_CHECK_BUDGET=470 bash benchmarks/gpu_check.sh     # second call: the rest
#
# setup and info run first, then the stages GPU_CHECK_STAGES names, in its order (default
# "tests block model": the first call). Stage (default cap in seconds):
#   setup (240)       the carried wheels of what the machine lacks, the prebuilt extension
#                     (or a 16-job build when it does not load), a visible GPU
#   info (45)         versions, nvidia-smi, se-kernels info, and se-kernels plan for this GPU
#                     (--gpu current) on the block stage's first ResNet-50 SE layer
#   tests (150)       the correctness verdict: cuda and triton against the fp64 reference,
#                     tests/test_cuda.py, tests/test_triton_gpu.py and the cuda rows of
#                     tests/test_backends.py marked cuda and not slow, on 8 workers
#   block (180)       ResNet-50 SE shapes, N = 256 and 32, bf16 channels_last, fwd and fwd+bwd;
#                     eager, torch.compile (mode default), cuda, triton; % of the copy bandwidth
#   model (120)       SE-ResNet-50 vs ResNet-50, training step and inference, N = 128, bf16
#                     autocast, channels_last
#   ctas1 (90)        the cuda rows of the first and last block shape with one pipeline CTA
#                     per SM (SE_KERNELS_CUDA_CTAS_PER_SM=1, the kernel built with
#                     __launch_bounds__(256, 1)), against the default measured in the same call
#   grouped (60)      the same with the grouped CUDA schedule (SE_KERNELS_CUDA_SCHEDULE=grouped)
#   compile-max (180) the block stage's cases, eager and torch.compile max-autotune-no-cudagraphs
#   small-batch (90)  N = 1 and 32 on all four networks against eager, where host overhead decides
#   tests-slow (240)  the GPU tests the first call leaves out: Triton on every option, dtype and
#                     odd shape (a fresh compile each), tied maxima, the Triton ops, AOTInductor,
#                     more than 2^31 elements, the stream ops and the act tail on the GPU's
#                     Triton and CUDA kernels
#   memcheck (120), racecheck (150), synccheck (90), initcheck (120)
#                     compute-sanitizer on tests/test_cuda.py's short workload
#
# Time: a stage runs under min(its cap, what is left of GPU_CHECK_BUDGET (default 470) -
# GPU_CHECK_KILL_AFTER (10) - GPU_CHECK_RESERVE (15)): at its cap the stage's processes get
# SIGTERM, KILL_AFTER seconds later SIGKILL, and the RESERVE is kept for the last copies, so
# the run ends within the budget. A stage left less than GPU_CHECK_MIN_STAGE (10) is skipped.
# GPU_CHECK_CAPS="block=60 tests=90" overrides caps. Give the device call a limit of at least
# the budget plus 10 s.
# Results: the stages write as they go (the bench a CSV row and the markdown per case, pytest
# a line per test), and after every stage what is there, a stopped stage's rows too, is
# copied to $OUT (default /tmp/se_kernels_gpu_check): at most 8 files, ready to commit under
# benchmarks/results/: summary.txt, env.txt, logs.tar.gz (everything), then each stage's
# table or log in stage order (<stage>.md of a bench stage, <stage>.txt of a tests stage),
# then the bench stages' <stage>.csv while places are left (first call: tests.txt, block.md,
# model.md, block.csv, model.csv). The summary is printed last.
#
# GPU_CHECK_DEVICE=cpu rehearses the run on a CPU machine (tests/test_gpu_check.py does, with
# a short budget): the same stages, budget and files, with three CPU tests, the bench on the
# CPU with small shapes, and the stages that need a GPU (compile-max, small-batch,
# tests-slow, the sanitizers) noted as skipped. Exit status: 0 when every stage ran and
# passed, else 1 (2: bad settings).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
OUT=${OUT:-/tmp/se_kernels_gpu_check}
mkdir -p "$OUT"
work=$(mktemp -d)
budget=${GPU_CHECK_BUDGET:-470}
kill_after=${GPU_CHECK_KILL_AFTER:-10}
reserve=${GPU_CHECK_RESERVE:-15}
min_stage=${GPU_CHECK_MIN_STAGE:-10}
device=${GPU_CHECK_DEVICE:-cuda}
stages=${GPU_CHECK_STAGES:-tests block model}
start=$SECONDS
summary=$OUT/summary.txt
: > "$summary"
export PYTHONUNBUFFERED=1 PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
python=${PYTHON:-python3}

# name default-cap kind: kind says what a stage leaves for $OUT (tests: a log; bench: a table)
# and whether a CPU rehearsal runs it (gpu: skipped there).
STAGES="
setup 240 always
info 45 always
tests 150 tests
block 180 bench
model 120 bench
ctas1 90 bench
grouped 60 bench
compile-max 180 bench,gpu
small-batch 90 bench,gpu
tests-slow 240 tests,gpu
memcheck 120 gpu
racecheck 150 gpu
synccheck 90 gpu
initcheck 120 gpu
"
stage_field() {  # stage_field NAME FIELD: 2 = default cap, 3 = kind
  awk -v n="$1" -v f="$2" '$1 == n { print $f }' <<< "$STAGES"
}

note() { echo "$*" | tee -a "$summary"; }

case $device in
  cuda|cpu) ;;
  *) echo "gpu_check: GPU_CHECK_DEVICE must be cuda or cpu, got '$device'" >&2; exit 2 ;;
esac
for name in $stages; do
  if [ -z "$(stage_field "$name" 2)" ] || [ "$(stage_field "$name" 3)" = always ]; then
    echo "gpu_check: unknown stage '$name' in GPU_CHECK_STAGES (setup and info always run);" \
      "stages:" $(awk '$3 != "always" && NF { print $1 }' <<< "$STAGES") >&2
    exit 2
  fi
done
[ "$device" = cpu ] && note "rehearsal on the CPU (GPU_CHECK_DEVICE=cpu): no GPU result here"

# The files that come back, in priority order: summary, env, each stage's table or log,
# the archive, then the bench stages' CSVs while fewer than 8.
returned="summary.txt env.txt logs.tar.gz"
for name in $stages; do
  case $(stage_field "$name" 3) in
    tests*) returned+=" $name.txt" ;;
    bench*) returned+=" $name.md" ;;
  esac
done
for name in $stages; do
  [[ $(stage_field "$name" 3) == bench* ]] && returned+=" $name.csv"
done
returned=$(tr ' ' '\n' <<< "$returned" | head -8 | tr '\n' ' ')

# publish: copies what the stages have written so far into $OUT (a stage's rows even when
# it was stopped), and the archive of everything.
publish() {
  local name file
  [ -f "$work/info.log" ] && cp "$work/info.log" "$OUT/env.txt"
  for name in $stages; do
    case $(stage_field "$name" 3) in
      tests*)
        [ -f "$work/$name.log" ] && [[ " $returned " == *" $name.txt "* ]] \
          && cp "$work/$name.log" "$OUT/$name.txt" ;;
      bench*)
        for ext in md csv; do
          file=$(find "$work/$name" -maxdepth 1 -name "*.$ext" 2>/dev/null | sort | head -1)
          [ -n "$file" ] && [[ " $returned " == *" $name.$ext "* ]] && cp "$file" "$OUT/$name.$ext"
        done ;;
    esac
  done
  tar -czf "$OUT/logs.tar.gz.partial" -C "$work" . 2>/dev/null \
    && mv "$OUT/logs.tar.gz.partial" "$OUT/logs.tar.gz"
}

# What a stage left, for its summary line.
stage_detail() {
  local name=$1 file rows results
  case $(stage_field "$name" 3) in
    tests*)
      results=$work/$name.results
      [ -f "$results" ] || return 0
      awk '$2 != "started" { split($2, o, ":"); count[o[1]]++; done[$NF] = 1 }
           $2 == "started" { started[$NF] = 1 }
           END { for (t in started) if (!(t in done)) stuck++
                 printf "%d passed, %d failed, %d skipped", count["passed"],
                        count["failed"] + count["error"], count["skipped"]
                 if (stuck) printf ", %d started without a result", stuck }' "$results" ;;
    bench*)
      file=$(find "$work/$name" -maxdepth 1 -name "*.csv" 2>/dev/null | sort | head -1)
      [ -n "$file" ] || { echo "no rows"; return 0; }
      rows=$(( $(wc -l < "$file") - 1 ))
      echo "$rows rows in $name.csv" ;;
  esac
}

# stage NAME COMMAND...: runs COMMAND under min(the stage's cap, what is left of the budget
# less the kill margin and the reserve), logging to $work/NAME.log; notes its status,
# duration and results in the summary, then publishes.
stage() {
  local name=$1; shift
  local cap override
  cap=$(stage_field "$name" 2)
  for override in ${GPU_CHECK_CAPS:-}; do
    [ "${override%%=*}" = "$name" ] && cap=${override#*=}
  done
  local left=$(( budget - (SECONDS - start) - kill_after - reserve ))
  (( cap > left )) && cap=$left
  if (( cap < min_stage )); then
    incomplete=1
    note "$(printf '%-12s %-20s %4s  %s' "$name" "skipped" "" \
      "the budget is spent ($(( budget - (SECONDS - start) ))s left, ${kill_after}+${reserve}s kept)")"
    return 1
  fi
  echo "== $(date -u +%H:%M:%S) $name (cap ${cap}s, $(( budget - (SECONDS - start) ))s of the budget left)"
  local t0=$SECONDS status
  if declare -F "$1" > /dev/null; then  # a function of this script: timeout needs a process
    timeout --kill-after="$kill_after" "$cap" bash -c '"$@"' stage "$@" > "$work/$name.log" 2>&1
  else
    timeout --kill-after="$kill_after" "$cap" "$@" > "$work/$name.log" 2>&1
  fi
  status=$?
  (( status == 0 )) || incomplete=1
  tail -25 "$work/$name.log"
  local verdict=ok
  (( status == 124 || status == 137 )) && verdict="timed out"
  (( status != 0 && status != 124 && status != 137 )) && verdict="failed (exit $status)"
  note "$(printf '%-12s %-20s %4ds  %s' "$name" "$verdict" $(( SECONDS - t0 )) "$(stage_detail "$name")")"
  if [ -f "$work/$name.results" ]; then
    awk '$2 == "started" { started[$NF] = 1 } $2 != "started" { done[$NF] = 1 }
         END { for (t in started) if (!(t in done)) print "  started without a result: " t }' \
      "$work/$name.results" | sort | tee -a "$summary"
  fi
  publish
  return $status
}

skip() {  # skip NAME REASON [expected]: a stage not run; the run is incomplete unless expected
  [ -n "${3:-}" ] || incomplete=1
  note "$(printf '%-12s %-20s %4s  %s' "$1" "skipped" "" "$2")"
}

# ---- stage commands ----------------------------------------------------------------------

extension_ok() {
  "$python" -c "import sys, se_kernels.backends.native as n; \
sys.exit(0 if n.EXTENSION_ERROR is None and n.has_kernel('cuda') else 1)"
}

# Wheels carried in .gpu/wheels for what the machine lacks; a package the machine already
# has keeps its own version.
install_wheels() {
  local wheel name missing=()
  for wheel in .gpu/wheels/*.whl; do
    [ -f "$wheel" ] || continue
    name=$(basename "$wheel"); name=${name%%-*}
    "$python" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$name" \
      2> /dev/null || missing+=("$wheel")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing ${missing[*]##*/}"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/se_kernels_site "${missing[@]}"
}

setup() {
  if [ "$device" = cpu ]; then  # info says whether the extension loads
    echo "rehearsal: nothing to install or build; $("$python" --version)"
    return
  fi
  install_wheels || return 1
  local here loaded=
  here=$(find csrc setup.py -type f | sort | xargs sha256sum | sha256sum | cut -d' ' -f1)
  if [ -f .gpu/prebuilt/SOURCE_HASH ] && [ "$(cat .gpu/prebuilt/SOURCE_HASH)" = "$here" ]; then
    cp .gpu/prebuilt/_C.*.so .gpu/prebuilt/_build_info.py se_kernels/
    if extension_ok; then
      echo "prebuilt extension loads"
      loaded=1
    else
      echo "prebuilt extension does not load here:"
      "$python" -c "import se_kernels.backends.native as n; print(n.EXTENSION_ERROR)"
      rm -f se_kernels/_C.*.so
    fi
  else
    echo "no prebuilt extension for these sources (run benchmarks/gpu_prepare.sh)"
  fi
  if [ -z "$loaded" ]; then
    echo "building with 16 jobs"
    FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 \
      "$python" setup.py -q build_ext --inplace && extension_ok || return 1
  fi
  "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "no CUDA GPU visible to torch"; return 1; }
}

versions() {
  date -u +"%Y-%m-%d %H:%M UTC"
  echo "command: GPU_CHECK_STAGES=\"$stages\" GPU_CHECK_BUDGET=$budget bash benchmarks/gpu_check.sh"
  if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
      --format=csv || true
    nvcc --version | tail -2 || true
  fi
  # One process for the versions, se-kernels info and the plans of this GPU (a CPU
  # rehearsal plans for the h100 profile) for the block stage's first ResNet-50 SE layer,
  # beside what it measures.
  "$python" - "$([ "$device" = cuda ] && echo current || echo h100)" <<'EOF'
import sys

import numpy
import torch

from se_kernels import cli

try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton_version,
      "numpy", numpy.__version__, flush=True)
cli.main(["info"])
for backend in ("cuda", "triton"):
    for n in (256, 32):
        print(flush=True)
        cli.main(["plan", "--backend", backend, "--shape", f"{n},256,56,56", "--residual",
                  "--out-activation", "relu", "--gpu", sys.argv[1]])
EOF
}

# run_pytest NAME ARGS...: pytest with one line per test in the log as each finishes (-v),
# and in $work/NAME.results (tests/conftest.py: started, then the outcome and seconds).
# On the GPU: 8 workers of 2 threads (the fp64 reference runs on the CPU), and a per-test
# limit whose thread method also ends a test stuck in a CUDA call (the signal method waits
# for the call to return); xdist then replaces the worker and goes on.
run_pytest() {
  local name=$1; shift
  local extra=()
  if [ "$device" = cuda ]; then
    "$python" -c "import xdist" 2> /dev/null && extra+=(-n 8 --dist load)
    "$python" -c "import pytest_timeout" 2> /dev/null \
      && extra+=(--timeout "${GPU_CHECK_TEST_TIMEOUT:-120}" --timeout-method thread)
  fi
  SE_KERNELS_TEST_LOG=$work/$name.results OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} \
    "$python" -m pytest -p no:cacheprovider -v -rfEs --tb=short --durations=20 \
    "${extra[@]}" "$@"
}

tests_first() {
  if [ "$device" = cpu ]; then
    run_pytest tests tests/test_plan.py::test_decode_round_trip \
      tests/test_plan.py::test_writes_always_cost_dram tests/test_plan.py::test_floor_and_prediction
    return
  fi
  run_pytest tests tests/test_cuda.py tests/test_triton_gpu.py tests/test_backends.py \
    -m "cuda and not slow"
}

tests_slow() {
  local status=0
  # Triton on every option, dtype and odd shape (test_backends.py's triton rows; "triton"
  # matches only their parameter ids there), then the other GPU tests the first call leaves
  # out, then the slow ones (more than 2^31 elements); the sanitizers are stages of their own.
  run_pytest tests-slow tests/test_backends.py -k triton || status=1
  run_pytest tests-slow tests/test_ties.py tests/test_triton_ops.py tests/test_export.py \
    -m cuda || status=1
  run_pytest tests-slow tests/test_cuda.py tests/test_triton_gpu.py -m "cuda and slow" \
    --deselect tests/test_cuda.py::test_compute_sanitizer || status=1
  # The stream ops and the act tail (BatchNorm -> activation -> SE) on the GPU's kernels.
  run_pytest tests-slow tests/test_triton_stream.py || status=1
  run_pytest tests-slow tests/test_act_tail.py -k "gpu_kernels and not emulator" || status=1
  return $status
}

# The bench stages' arguments (word-split where used): the block stage's cases and peers,
# the cuda variants' cases (the first and last ResNet-50 SE shapes, shorter timing: a
# variant and the default both run in one stage) and the backend they vary, the model
# suite. The CPU rehearsal runs MobileNetV3's layers at batch 1 and 2 with the torch
# backend, 24 cases of at least 2 s each (the CPU timer's rounds), so that a short budget
# stops the stage between cases, and the variants on two of them.
if [ "$device" = cuda ]; then
  block_cases="--device cuda --suite resnet50 --batch 256,32 --dtype bf16 --layout channels_last
               --modes fwd,fwd+bwd"
  block_peers=eager,compile,cuda,triton
  variant_cases="$block_cases --quick"
  fused=cuda
  model_args="--device cuda --suite model --model-batch 128"
else
  block_cases="--device cpu --suite mobilenetv3 --batch 1,2 --modes fwd,fwd+bwd --threads 1"
  block_peers=eager,torch
  variant_cases="--device cpu --suite mobilenetv3 --quick --batch 1 --modes fwd --threads 1"
  fused=torch
  model_args="--device cpu --suite model --quick --model-batch 2 --image-size 32 --backends torch
              --threads 1"
fi

bench() {  # bench NAME ARGS...: se-kernels bench writing to $work/NAME
  "$python" -m se_kernels bench --out "$work/$1" "${@:2}"
}

block() {
  # shellcheck disable=SC2086
  bench block $block_cases --backends "$block_peers"
}

model() {
  # shellcheck disable=SC2086
  bench model $model_args
}

# cuda_variant NAME VAR=VALUE: the block stage's cuda rows with VAR set, against the default
# measured in this call (cuda-base, run once per call), through bench --compare.
cuda_variant() {
  local base
  if [ ! -f "$work/cuda-base.done" ]; then
    rm -rf "$work/cuda-base"
    echo "== the default, for comparison"
    bench cuda-base $variant_cases --backends "eager,$fused" || return 1
    touch "$work/cuda-base.done"
  fi
  base=$(find "$work/cuda-base" -maxdepth 1 -name "*.csv" | head -1)
  echo "== $2"
  env "$2" "$python" -m se_kernels bench --out "$work/$1" $variant_cases \
    --backends "eager,$fused" --compare "$base"
}

# One pipeline CTA per SM (the kernel built with __launch_bounds__(256, 1): no spills, half
# the warps) against the default two.
ctas1() {
  cuda_variant ctas1 SE_KERNELS_CUDA_CTAS_PER_SM=1
}

grouped() {
  cuda_variant grouped SE_KERNELS_CUDA_SCHEDULE=grouped
}

compile_max() {
  bench compile-max $block_cases --backends eager,compile-max
}

small_batch() {
  bench small-batch --device cuda --suite blocks --quick --batch 1,32 --dtype bf16 \
    --layout channels_last --modes fwd,fwd+bwd --backends eager,auto,cuda,triton
}

# compute-sanitizer on a short GPU workload (tests/test_cuda.py run as a script: both
# schedules, every option, split rows and L2 groups), the caching allocator off so that
# memcheck and initcheck see every allocation's bounds.
sanitizer() {
  local tool=$1 sanitizer
  sanitizer=$(command -v compute-sanitizer) \
    || for sanitizer in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
                        /usr/local/cuda/bin/compute-sanitizer ""; do
         [ -x "$sanitizer" ] && break
       done
  [ -n "$sanitizer" ] || { echo "compute-sanitizer not found"; return 1; }
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" --error-exitcode 99 \
    "$python" tests/test_cuda.py
}

export -f setup versions extension_ok install_wheels run_pytest tests_first tests_slow bench \
  block model cuda_variant ctas1 grouped compile_max small_batch sanitizer
export python device work stages budget block_cases block_peers variant_cases fused model_args
# ---------------------------------------------------------------------------------------
export PATH=$PATH:/tmp/se_kernels_site/bin PYTHONPATH=$PYTHONPATH:/tmp/se_kernels_site
ready=1 incomplete=
if ! stage setup setup; then
  note "setup failed: the other stages cannot run"
  ready=
fi
stage info versions

for name in $stages; do
  kind=$(stage_field "$name" 3)
  if [ -z "$ready" ]; then
    skip "$name" "setup failed"
  elif [ "$device" = cpu ] && [[ $kind == *gpu* ]]; then
    skip "$name" "rehearsal on the CPU: needs a GPU" expected
  else
    case $name in
      tests) stage tests tests_first ;;
      tests-slow) stage tests-slow tests_slow ;;
      memcheck|racecheck|synccheck|initcheck) stage "$name" sanitizer "$name" ;;
      *) stage "$name" "${name//-/_}" ;;
    esac
  fi
done

publish
note "total $(( SECONDS - start ))s of a ${budget}s budget; files in $OUT: $(ls "$OUT" | paste -sd ' ')"
echo
echo "== summary"
cat "$summary"
rm -rf "$work"
# 0 when every stage ran and passed; 1 when one failed, timed out or was skipped.
[ -z "$incomplete" ]
