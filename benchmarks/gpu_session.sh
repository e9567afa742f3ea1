#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in phases that each fit one device call
# (10 minutes). Logs and results go to $OUT, which the device tool brings back; commit the
# results under benchmarks/results/ (a GPU result not committed is lost).
#
#   bash benchmarks/gpu_session.sh test     build, se-kernels info, the GPU tests    (~6 min)
#   bash benchmarks/gpu_session.sh check    the slow GPU tests and compute-sanitizer (~8 min)
#   bash benchmarks/gpu_session.sh bench    the quick GPU suite, then ResNet-50 fwd/bwd at
#                                           N=32 and N=256, bf16 and fp32            (~9 min)
#
# Each phase builds the extension first if this machine does not have it yet (a fresh
# machine starts bare; a warm one keeps the build).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/se_kernels_gpu_session}
mkdir -p "$OUT"
phase=${1:-test}
log="$OUT/$phase.log"

step() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$log"; }

build() {
  if python -c "import se_kernels.backends.native as n, sys; sys.exit(0 if n.EXTENSION_ERROR is None and n.has_kernel('cuda') else 1)" 2>/dev/null; then
    return 0
  fi
  step "build (MAX_JOBS=16, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0})"
  { date -u; nvidia-smi; nvcc --version; python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/env.txt" 2>&1
  MAX_JOBS=16 pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || {
    tail -40 "$OUT/build.log"; exit 1; }
  python -m se_kernels info | tee "$OUT/info.txt"
}

build
case "$phase" in
  test)
    step "GPU tests: cuda and triton backends vs the fp64 reference, graph capture, determinism, compile"
    timeout 480 python -m pytest tests/test_backends.py tests/test_cuda.py tests/test_triton.py \
      -k "cuda or triton" -m "not slow" -q -rs --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.txt" | tail -30
    ;;
  check)
    step "slow GPU tests (> 2^31 elements)"
    timeout 240 python -m pytest tests/test_cuda.py tests/test_triton.py -m "cuda and slow" -q -rs 2>&1 | tee "$OUT/gpu-slow-tests.txt" | tail -15
    for tool in memcheck racecheck synccheck; do
      step "compute-sanitizer --tool $tool"
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 150 compute-sanitizer --tool "$tool" --error-exitcode 99 \
        python tests/test_cuda.py > "$OUT/sanitizer-$tool.txt" 2>&1
      echo "exit $?" | tee -a "$OUT/sanitizer-$tool.txt" | tee -a "$log"
      tail -5 "$OUT/sanitizer-$tool.txt"
    done
    ;;
  bench)
    step "quick GPU suite"
    timeout 200 se-kernels bench --device cuda --quick --out "$OUT/results" 2>&1 | tail -40
    step "ResNet-50 stages, N=32 and 256, bf16 and fp32, channels_last and NCHW, fwd and fwd+bwd"
    timeout 330 se-kernels bench --device cuda --suite resnet50 --batch 32,256 --dtype bf16,fp32 \
      --layout channels_last,nchw --modes fwd,fwd+bwd --backends eager,compile-max,cuda,triton \
      --out "$OUT/results" 2>&1 | tail -60
    ;;
  *)
    echo "usage: $0 test|check|bench" >&2
    exit 2
    ;;
esac
step "done; files in $OUT"
