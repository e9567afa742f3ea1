"""Builds se_kernels._C.

The CPU kernels are always built. The CUDA kernels (csrc/cuda/) are built when a CUDA
toolkit and a CUDA build of torch are present, or when FORCE_CUDA=1; no GPU is needed.

Environment:
  TORCH_CUDA_ARCH_LIST  archs to compile, e.g. "8.0;9.0" (default) or "9.0a" (Hopper-only
                        code paths); archs this nvcc cannot build are dropped with a warning.
                        PTX is embedded for the newest arch so newer GPUs can JIT it.
  CUDA_HOME             the toolkit; found from torch's CUDA version or nvcc otherwise.
  FORCE_CUDA=1          fail rather than skip when CUDA cannot be built.
  SE_KERNELS_NO_CUDA=1  build the CPU kernels only.
  MAX_JOBS              parallel compile jobs (ninja).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import warnings
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
DEFAULT_ARCH_LIST = "8.0;9.0"

# (arch, first nvcc that builds it, first nvcc that no longer does)
ARCH_NVCC_RANGE = {
    "7.5": ((10, 0), None),
    "8.0": ((11, 0), None),
    "8.6": ((11, 1), None),
    "8.7": ((11, 4), None),
    "8.9": ((11, 8), None),
    "9.0": ((11, 8), None),
    "9.0a": ((12, 0), None),
    "10.0": ((12, 8), None),
    "10.0a": ((12, 8), None),
    "12.0": ((12, 8), None),
    "12.0a": ((12, 8), None),
}


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


def find_cuda_home(torch_cuda: str | None) -> Path | None:
    """The CUDA toolkit root. /usr/local/bin/nvcc may be a wrapper script, from which
    torch would guess CUDA_HOME=/usr/local and then miss the headers, so look for a real
    toolkit (bin/nvcc next to include/cuda_runtime.h)."""

    def is_toolkit(path: Path) -> bool:
        return (path / "bin" / "nvcc").exists() and (path / "include" / "cuda_runtime.h").exists()

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if torch_cuda:
        candidates.append(f"/usr/local/cuda-{torch_cuda}")
    candidates.append("/usr/local/cuda")
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for candidate in candidates:
        if candidate and is_toolkit(Path(candidate)):
            return Path(candidate)
    return None


def nvcc_version(cuda_home: Path) -> tuple[int, int]:
    text = subprocess.check_output([str(cuda_home / "bin" / "nvcc"), "--version"], text=True)
    match = re.search(r"release (\d+)\.(\d+)", text)
    if not match:
        raise RuntimeError(f"se_kernels: cannot read the nvcc version from: {text!r}")
    return int(match.group(1)), int(match.group(2))


def cuda_gencode_flags(arch_list: str, nvcc: tuple[int, int]) -> tuple[list[str], list[str]]:
    """nvcc -gencode flags for TORCH_CUDA_ARCH_LIST, and the list of what they embed."""
    requested = [a for a in re.split(r"[;\s,]+", arch_list.strip()) if a]
    archs: list[tuple[str, bool]] = []
    for entry in requested:
        arch, ptx = (entry[: -len("+PTX")], True) if entry.endswith("+PTX") else (entry, False)
        if arch not in ARCH_NVCC_RANGE:
            raise RuntimeError(
                f"se_kernels: TORCH_CUDA_ARCH_LIST entry {entry!r} is not one of "
                f"{sorted(ARCH_NVCC_RANGE)} (optionally with +PTX)")
        first, last = ARCH_NVCC_RANGE[arch]
        if nvcc < first or (last is not None and nvcc >= last):
            warnings.warn(f"se_kernels: nvcc {nvcc[0]}.{nvcc[1]} cannot build arch {arch}; skipped")
            continue
        archs.append((arch, ptx))
    if not archs:
        raise RuntimeError(f"se_kernels: no arch in TORCH_CUDA_ARCH_LIST={arch_list!r} can be "
                           f"built by nvcc {nvcc[0]}.{nvcc[1]}")
    # Embed PTX for the newest portable arch so GPUs newer than the list can still JIT it.
    newest = max((a for a, _ in archs if not a.endswith("a")), default=None,
                 key=lambda a: float(a))
    flags, embedded = [], []
    for arch, ptx in archs:
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        embedded.append(f"sm_{num}")
        if ptx or arch == newest:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
            embedded.append(f"compute_{num}")
    return flags, embedded


def cpu_avx2_library(torch) -> list:
    """On x86-64, the CPU kernels again with AVX2/FMA/F16C, as a static library with its
    own flags (the extension keeps the baseline flags, so it loads on any CPU); the
    kernels pick it at run time where the CPU has AVX2."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    from torch.utils.cpp_extension import include_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [("se_kernels_cpu_avx2", {
        "sources": ["csrc/cpu/kernels_avx2.cpp"],
        # build_clib tracks neither includes nor flags: rebuild when the kernels' headers or
        # this file (which holds the flags) change.
        "obj_deps": {"": ["csrc/cpu/kernels_impl.h", "csrc/cpu/stream_impl.h", "csrc/cpu/mlp_impl.h",
                          "csrc/cpu/kernels.h", "csrc/se_common.h", "csrc/se_options.h", "setup.py"]},
        "include_dirs": include_paths(),
        "macros": [("CPU_CAPABILITY", "AVX2"), ("CPU_CAPABILITY_AVX2", None)],
        "cflags": ["-O3", "-std=c++20", "-fPIC", "-fopenmp", "-Werror=switch", "-mavx2", "-mfma", "-mf16c",
                   f"-D_GLIBCXX_USE_CXX11_ABI={abi}"],
    })]


def write_build_info(info: dict) -> None:
    """What was built, for `se-kernels info` (the file is generated, not tracked)."""
    lines = ['"""Generated by setup.py: what se_kernels._C was built with."""', "", "BUILD = {"]
    lines += [f"    {key!r}: {value!r}," for key, value in info.items()]
    lines += ["}", ""]
    (ROOT / "se_kernels" / "_build_info.py").write_text("\n".join(lines))


def extensions():
    import torch

    cuda_home = None
    cuda_sources = sorted(str(p) for pattern in ("*.cu", "*.cpp") for p in Path("csrc/cuda").glob(pattern))
    want_cuda = bool(cuda_sources) and not _truthy("SE_KERNELS_NO_CUDA")
    if want_cuda:
        cuda_home = find_cuda_home(torch.version.cuda)
        reasons = []
        if torch.version.cuda is None:
            reasons.append(f"torch {torch.__version__} is not a CUDA build")
        if cuda_home is None:
            reasons.append("no CUDA toolkit found (set CUDA_HOME)")
        if reasons:
            if _truthy("FORCE_CUDA"):
                raise RuntimeError("se_kernels: FORCE_CUDA=1 but " + "; ".join(reasons))
            print("se_kernels: building without CUDA kernels: " + "; ".join(reasons))
            want_cuda = False
    if want_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME once, when imported.
        os.environ["CUDA_HOME"] = str(cuda_home)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/module.cpp", "csrc/se_common.cpp", "csrc/cuda_schedule.cpp",
               "csrc/cpu/se_cpu.cpp", "csrc/cpu/stream_cpu.cpp", "csrc/cpu/form_cpu.cpp",
               "csrc/cpu/tail_cpu.cpp", "csrc/cpu/fc_layer_cpu.cpp",
               "csrc/cpu/kernels_default.cpp"]
    libraries = cpu_avx2_library(torch)
    # at::parallel_for is an inline OpenMP region: without -fopenmp it runs on one thread.
    # The OpenMP runtime linked is torch's own (its libgomp.so.1 is loaded first).
    # -Werror=switch: an option value without its case in a switch is a compile error
    # (csrc/se_options.h).
    cxx_flags = ["-O3", "-fopenmp", "-Werror=switch"] + (["-DSE_KERNELS_CPU_AVX2"] if libraries else [])
    link_flags = ["-fopenmp"]
    info = {"torch": torch.__version__, "cpu_avx2": bool(libraries), "cuda": False, "nvcc": None,
            "cuda_archs": []}
    if want_cuda:
        nvcc = nvcc_version(cuda_home)
        torch_major = int(torch.version.cuda.split(".")[0])
        if nvcc[0] != torch_major:
            raise RuntimeError(
                f"se_kernels: nvcc {nvcc[0]}.{nvcc[1]} at {cuda_home} and torch "
                f"{torch.__version__} (CUDA {torch.version.cuda}) differ in CUDA major version; "
                f"point CUDA_HOME at a CUDA {torch_major}.x toolkit or install a torch built "
                f"for CUDA {nvcc[0]}")
        gencode, embedded = cuda_gencode_flags(
            os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST), nvcc)
        info.update(cuda=True, nvcc=f"{nvcc[0]}.{nvcc[1]}", cuda_archs=embedded)
        write_build_info(info)
        return libraries, [CUDAExtension(
            "se_kernels._C", sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags + ["-DSE_KERNELS_WITH_CUDA"],
                                "nvcc": ["-O3", "-DSE_KERNELS_WITH_CUDA", "-Xcompiler=-Werror=switch",
                                         *gencode]},
            extra_link_args=link_flags,
        )], BuildExtension
    write_build_info(info)
    return (libraries,
            [CppExtension("se_kernels._C", sources, extra_compile_args={"cxx": cxx_flags},
                          extra_link_args=link_flags)],
            BuildExtension)


def build_ext_with_libraries(build_ext):
    """build_ext that builds the static libraries it links first: `setup.py build_ext`
    and editable installs do not run build_clib on their own."""

    class BuildExt(build_ext):
        def run(self):
            if self.distribution.has_c_libraries():
                self.run_command("build_clib")
            super().run()

    return BuildExt


libraries, ext_modules, build_ext = extensions()
setup(libraries=libraries, ext_modules=ext_modules,
      cmdclass={"build_ext": build_ext_with_libraries(build_ext.with_options(use_ninja=True))})
