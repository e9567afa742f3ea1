"""The standalone library that CMakeLists.txt builds: loaded with torch.ops.load_library in a
process where se_kernels._C cannot be imported, it serves the cpu backend's kernels.

The library (CPU kernels only) is built once per source state into the temp directory and
reused: one to three minutes on 2 cores the first time."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import se_kernels

from helpers import run_python

ROOT = Path(__file__).resolve().parent.parent
CMAKE_MINIMUM = (3, 26)  # CMakeLists.txt's cmake_minimum_required


def cmake_version(cmake: str) -> tuple[int, ...]:
    first = subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return tuple(int(part) for part in first.split()[-1].split("-")[0].split(".")[:2])


def cuda_configuration() -> list[str]:
    """torch's CMake config insists on the CUDA toolkit and nvrtc when torch is a CUDA build,
    even for a CPU-only library."""
    if torch.version.cuda is None:
        return []
    root = next((r for r in (os.environ.get("CUDA_HOME"), f"/usr/local/cuda-{torch.version.cuda}",
                             "/usr/local/cuda") if r and Path(r, "include", "cuda_runtime.h").exists()),
                None)
    if root is None:
        pytest.skip("torch is a CUDA build and its CMake config needs the CUDA toolkit, "
                    "which is not installed here (set CUDA_HOME)")
    args = [f"-DCUDA_TOOLKIT_ROOT_DIR={root}"]
    if not Path(root, "lib64", "libnvrtc.so").exists():
        try:
            import nvidia
            nvrtc = sorted(p for d in nvidia.__path__ for p in Path(d).glob("*/lib/libnvrtc.so*"))
        except ImportError:
            nvrtc = []
        if not nvrtc:
            pytest.skip(f"torch's CMake config needs libnvrtc, in neither {root} nor torch's wheels")
        args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
    return args


@pytest.fixture(scope="module")
def cmake_library() -> Path:
    # The test extra's pip cmake (next to this Python) before the system's, often too old.
    found = [str(c) for c in (Path(sys.executable).parent / "cmake", shutil.which("cmake"))
             if c and Path(c).exists()]
    if not found:
        pytest.skip("cmake is not installed (pip install cmake)")
    cmake = next((c for c in found if cmake_version(c) >= CMAKE_MINIMUM), None)
    if cmake is None:
        pytest.skip(f"CMakeLists.txt needs cmake >= 3.26, found {cmake_version(found[0])} "
                    "(pip install cmake)")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    sources = [ROOT / "CMakeLists.txt", *sorted((ROOT / "csrc").rglob("*"))]
    digest = hashlib.sha256(torch.__version__.encode())
    for path in sources:
        if path.is_file():
            digest.update(path.read_bytes())
    build = Path(tempfile.gettempdir()) / f"se_kernels_cmake_{digest.hexdigest()[:16]}"
    library = build / "libse_kernels_ops.so"
    if not library.exists():
        env = dict(os.environ, TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
        configure = [cmake, "-S", str(ROOT), "-B", str(build), "-DSE_KERNELS_CUDA=OFF",
                     f"-DPython3_EXECUTABLE={sys.executable}", *cuda_configuration()]
        for command in (configure, [cmake, "--build", str(build), "-j", "2"]):
            result = subprocess.run(command, capture_output=True, text=True, env=env)
            assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    assert library.exists()
    return library


# Runs in a fresh process where `import se_kernels._C` fails.
SCRIPT = """
import sys
sys.modules["se_kernels._C"] = None  # the extension is absent
sys.path.insert(0, sys.argv[2])      # tests/, for helpers
import torch
import se_kernels
from se_kernels.backends import native
from helpers import Case, check_against_reference, make_inputs
from se_kernels.call import make_call

assert native.EXTENSION_ERROR is not None, "se_kernels._C was imported"
assert not native.has_kernel("cpu"), "CPU kernels registered before the library was loaded"
torch.ops.load_library(sys.argv[1])
assert native.has_kernel("cpu")
t = make_inputs(Case(n=1, c=4, h=2, w=2, s=1), "cpu")
call = make_call(t["x"], t["w1"], t["b1"], t["w2"], t["b2"])
assert se_kernels.select(call).name == "cpu", se_kernels.explain(call)
for case in (Case(n=2, c=24, h=5, w=7, s=6, residual=True, out_activation="relu", pool="avgmax"),
             Case(n=3, c=40, h=6, w=6, s=5, layout="channels_last", activation="silu",
                  gate="hardsigmoid", pool="max", dtype=torch.bfloat16)):
    check_against_reference(case, "cpu", "cpu")
print("cmake library ok")
"""


def test_kernels_from_the_cmake_library_serve_the_cpu_backend(cmake_library):
    package_root = str(Path(se_kernels.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [package_root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    result = run_python("-c", SCRIPT, str(cmake_library), str(ROOT / "tests"), env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "cmake library ok" in result.stdout
