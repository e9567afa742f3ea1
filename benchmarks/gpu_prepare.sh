#!/usr/bin/env bash
# Prepares, on a CPU machine, what benchmarks/gpu_check.sh needs on a bare GPU machine with
# no network: se_kernels._C prebuilt for that machine's stack and the wheels of the test
# dependencies it lacks. Everything goes to .gpu/ (ignored by git), which travels with the
# check:
#
#   bash benchmarks/gpu_prepare.sh          # here, once per change to csrc/ or setup.py
#   bash benchmarks/gpu_check.sh            # there, with .gpu/ beside the source tree
#
# The target stack defaults to the lent H200 machines' (Python 3.12, torch 2.11.0, sm_90);
# override with GPU_PYTHON=/path/to/python3.x, GPU_TORCH=2.11.0, GPU_ARCHS="9.0".
# The build needs a CUDA toolkit whose major version matches torch's (CUDA 13 for
# torch 2.11.0 from PyPI) and runs in a virtual environment cached under
# ${XDG_CACHE_HOME:-~/.cache}/se_kernels (about 4 GB the first time).
set -euo pipefail
cd "$(dirname "$0")/.."

torch_version=${GPU_TORCH:-2.11.0}
archs=${GPU_ARCHS:-9.0}
python=${GPU_PYTHON:-$(tools/find_python.sh 3.12)} || {
  echo "gpu_prepare: set GPU_PYTHON=/path/to/python3.12" >&2; exit 2; }
pyver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
pytag=cpython-${pyver/./}

venv=${XDG_CACHE_HOME:-$HOME/.cache}/se_kernels/gpu-build-py$pyver-torch$torch_version
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$torch_version')" 2>/dev/null; then
  echo "== build environment: $venv (Python $pyver, torch $torch_version)"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q "torch==$torch_version" setuptools wheel ninja
fi

mkdir -p .gpu/prebuilt .gpu/wheels
rm -f .gpu/prebuilt/*

# Build from a copy of the files that travel (tracked and untracked, not ignored), so the
# cp3xx extension and its build record never land in this source tree.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$work"
echo "== build se_kernels._C for sm ${archs} against torch $torch_version ($pytag)"
(cd "$work" && FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$archs" MAX_JOBS=${MAX_JOBS:-2} \
   "$venv/bin/python" setup.py -q build_ext --inplace > "$work/build.log" 2>&1) || {
  tail -40 "$work/build.log"; exit 1; }
cp "$work"/se_kernels/_C.$pytag-*.so "$work"/se_kernels/_build_info.py .gpu/prebuilt/
# What the check compares to know the binary is of these sources.
find csrc setup.py -type f | sort | xargs sha256sum | sha256sum | cut -d' ' -f1 > .gpu/prebuilt/SOURCE_HASH

# expecttest (torch.library.opcheck imports it) is not on the lent machines' image; the
# pytest plugins the check runs the tests with (pytest-xdist and its execnet, pytest-timeout)
# are, and travel in case an image lacks them: gpu_check.sh installs a carried wheel only
# where the machine has no such package, so the image's own versions stay.
echo "== wheels the GPU machine may lack"
rm -f .gpu/wheels/*
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/wheels expecttest pytest-timeout pytest-xdist execnet

du -sh .gpu | sed 's/^/== .gpu: /'
ls -l .gpu/prebuilt .gpu/wheels
