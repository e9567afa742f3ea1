#!/usr/bin/env bash
# The GPU check: everything se_kernels needs proven on a GPU, in one run that fits 8 minutes
# on a bare machine with no network (the lent H200 machines: Python 3.12, torch 2.11.0,
# triton 3.6.0, 16 cores). Prepare on a CPU machine first, then run from the source tree:
#
#   bash benchmarks/gpu_prepare.sh         # prebuilt _C and missing wheels into .gpu/
#   bash benchmarks/gpu_check.sh           # on the GPU machine, .gpu/ beside the sources
#
# Stages run in priority order, each under its own time cap and all under one budget
# (GPU_CHECK_BUDGET seconds, default 470), so a slow stage costs the later ones, never the
# whole run:
#   1 setup       wheels, the prebuilt extension (or a 16-job build when it does not load)
#   2 info        versions, nvidia-smi, se-kernels info, se-kernels plan for ResNet-50's
#                 first SE layer
#   3 tests       the GPU tests: cuda and triton vs the fp64 reference, CUDA graphs,
#                 > 2^31 elements, streams, a second device where present, AOTInductor
#   4 block       ResNet-50 SE shapes, N = 256 and 32, bf16 channels_last, fwd and fwd+bwd,
#                 eager / torch.compile / cuda / triton, % of the copy bandwidth
#   5 grouped     the block stage's cuda rows again on the grouped CUDA schedule
#                 (SE_KERNELS_CUDA_SCHEDULE=grouped), eager alongside as the common yardstick
#   6 small-batch N = 1 and 32 against eager, where host overhead decides
#   7 model       SE-ResNet-50 vs ResNet-50, training step and inference, N = 128, bf16
#                 autocast, channels_last
#   8 sanitizer   compute-sanitizer memcheck, racecheck, synccheck, initcheck on a short run
# GPU_CHECK_STAGES="memcheck racecheck" (say) runs setup, info and those stages only: a
# second run for what the budget cut from the first.
# Results go to $OUT (default /tmp/se_kernels_gpu_check): at most 8 files, ready to commit
# under benchmarks/results/: summary.txt, env.txt, tests.txt, block.md, block.csv,
# model.md, model.csv and logs.tar.gz (everything else). The summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
OUT=${OUT:-/tmp/se_kernels_gpu_check}
mkdir -p "$OUT"
work=$(mktemp -d)
budget=${GPU_CHECK_BUDGET:-470}
start=$SECONDS
summary=$OUT/summary.txt
: > "$summary"
export PYTHONUNBUFFERED=1 PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
python=${PYTHON:-python3}

note() { echo "$*" | tee -a "$summary"; }

# stage NAME CAP COMMAND...: runs COMMAND under min(CAP, what is left of the budget),
# logging to $work/NAME.log, and notes its status and duration in the summary.
stage() {
  local name=$1 cap=$2; shift 2
  if [ -n "${GPU_CHECK_STAGES:-}" ] && [[ " setup info $GPU_CHECK_STAGES " != *" $name "* ]]; then
    return 0
  fi
  local left=$(( budget - (SECONDS - start) ))
  (( cap > left )) && cap=$left
  if (( cap < 10 )); then
    note "$(printf '%-12s skipped: the budget is spent' "$name")"
    return 1
  fi
  echo "== $(date -u +%H:%M:%S) $name (cap ${cap}s)"
  local t0=$SECONDS status
  if declare -F "$1" > /dev/null; then  # a function of this script: timeout needs a process
    timeout --kill-after=10 "$cap" bash -c '"$@"' stage "$@" > "$work/$name.log" 2>&1
  else
    timeout --kill-after=10 "$cap" "$@" > "$work/$name.log" 2>&1
  fi
  status=$?
  tail -25 "$work/$name.log"
  local verdict=ok
  (( status == 124 || status == 137 )) && verdict="timed out"
  (( status != 0 && status != 124 && status != 137 )) && verdict="failed (exit $status)"
  note "$(printf '%-12s %-20s %4ds' "$name" "$verdict" $(( SECONDS - t0 )))"
  return $status
}

extension_ok() {
  "$python" -c "import sys, se_kernels.backends.native as n; \
sys.exit(0 if n.EXTENSION_ERROR is None and n.has_kernel('cuda') else 1)"
}

setup() {
  if compgen -G ".gpu/wheels/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/se_kernels_site .gpu/wheels/*.whl || return 1
  fi
  local here
  here=$(find csrc setup.py -type f | sort | xargs sha256sum | sha256sum | cut -d' ' -f1)
  if [ -f .gpu/prebuilt/SOURCE_HASH ] && [ "$(cat .gpu/prebuilt/SOURCE_HASH)" = "$here" ]; then
    cp .gpu/prebuilt/_C.*.so .gpu/prebuilt/_build_info.py se_kernels/
    if extension_ok; then
      echo "prebuilt extension loads"
      return 0
    fi
    echo "prebuilt extension does not load here:"
    "$python" -c "import se_kernels.backends.native as n; print(n.EXTENSION_ERROR)"
    rm -f se_kernels/_C.*.so
  else
    echo "no prebuilt extension for these sources (run benchmarks/gpu_prepare.sh)"
  fi
  echo "building with 16 jobs"
  FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 \
    "$python" setup.py -q build_ext --inplace && extension_ok
}

versions() {
  date -u +"%Y-%m-%d %H:%M UTC"
  echo "command: bash benchmarks/gpu_check.sh"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
    --format=csv || true
  nvcc --version | tail -2 || true
  "$python" -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
  "$python" -m se_kernels info
  # What the plans predict for the block stage's shapes, beside what it measures.
  for backend in cuda triton; do
    for n in 256 32; do
      "$python" -m se_kernels plan --backend "$backend" --shape "$n,256,56,56" \
        --residual --out-activation relu
    done
  done
}

export -f setup versions extension_ok
export python
# ---------------------------------------------------------------------------------------
export PATH=$PATH:/tmp/se_kernels_site/bin PYTHONPATH=$PYTHONPATH:/tmp/se_kernels_site
ready=1
if ! stage setup 300 setup; then
  note "setup failed: the GPU stages cannot run"
  ready=
elif ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  note "no CUDA GPU visible: the GPU stages cannot run"
  ready=
fi
stage info 60 versions
cp "$work/info.log" "$OUT/env.txt"

if [ -n "$ready" ]; then
  # The GPU tests (every test of the cuda and triton backends, the slow ones too), several
  # files at once (16 cores, one GPU); per-test timeouts turn a hang into a failure instead
  # of the end of the run.
  stage tests 180 "$python" -m pytest tests -k "(cuda or triton) and not compute_sanitizer" \
    -q -rs -p no:cacheprovider \
    -n 4 --dist loadfile --timeout 150 --junitxml="$work/tests.xml"
  cp "$work/tests.log" "$OUT/tests.txt"

  stage block 120 "$python" -m se_kernels bench --device cuda --suite resnet50 --batch 256,32 \
    --dtype bf16 --layout channels_last --modes fwd,fwd+bwd \
    --backends eager,compile-max,cuda,triton --out "$work/block"
  stage grouped 60 env SE_KERNELS_CUDA_SCHEDULE=grouped "$python" -m se_kernels bench \
    --device cuda --suite resnet50 --batch 256,32 --dtype bf16 --layout channels_last \
    --modes fwd,fwd+bwd --backends eager,cuda --out "$work/grouped"
  stage small-batch 60 "$python" -m se_kernels bench --device cuda --suite blocks --quick \
    --batch 1,32 --dtype bf16 --layout channels_last --modes fwd,fwd+bwd \
    --backends eager,auto,cuda,triton --out "$work/small-batch"
  stage model 80 "$python" -m se_kernels bench --device cuda --suite model --model-batch 128 \
    --out "$work/model"

  # compute-sanitizer on a short GPU workload (tests/test_cuda.py run as a script: both
  # directions, every option, split rows and L2 groups), the caching allocator off so that
  # memcheck and initcheck see every allocation's bounds.
  for tool in memcheck racecheck synccheck initcheck; do
    stage "$tool" 120 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" \
      --error-exitcode 99 "$python" tests/test_cuda.py
  done
fi

# At most 8 files come back: the tables by name, everything else in one archive.
for kind in block model; do
  for ext in md csv; do
    found=$(find "$work/$kind" -name "*.$ext" 2>/dev/null | head -1)
    [ -n "$found" ] && cp "$found" "$OUT/$kind.$ext"
  done
done
tar -czf "$OUT/logs.tar.gz" -C "$work" . 2>/dev/null
note "total $(( SECONDS - start ))s of a ${budget}s budget; files in $OUT"
echo
echo "== summary"
cat "$summary"
grep -E "passed|failed" "$work/tests.log" 2>/dev/null | tail -1
rm -rf "$work"
