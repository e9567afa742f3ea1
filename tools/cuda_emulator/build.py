"""Builds and loads the CUDA emulator's extensions (README.md beside this file), and defines
the GPU the emulated kernels are planned for and the emulator's schedules.

    python tools/cuda_emulator/build.py             # build both extensions; errors in full
    python tools/cuda_emulator/build.py checks      # or se_kernels: one of them

The extensions are compiled as host C++ by torch.utils.cpp_extension into
TORCH_EXTENSIONS_DIR (torch's own cache when unset); ninja recompiles what a changed
source or header touches:

    se_kernels   binding/: csrc/cuda's kernels on the emulator, torch.ops.se_kernels_emu
                 (with csrc/se_common.cpp, the stream ops' argument checks)
    checks       planted_bugs.cpp: a kernel per check and its twin, torch.ops.cuda_emulator

Both need the CUDA toolkit's headers, not nvcc or a GPU: from CUDA_HOME or CUDA_PATH, else
/usr/local/cuda-<torch's CUDA version>, else /usr/local/cuda.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run as a script: this repository's se_kernels

from se_kernels.schedule import GPUS  # noqa: E402

# The GPU the binding's plans are made for unless a test sets another: an H100's SM count
# and L2, as `se-kernels plan`'s h100 profile has them.
EMULATED_DEVICE = (GPUS["h100"].sm_count, GPUS["h100"].l2_bytes)

# -Werror=switch: a switch over an option that misses a value fails the build, as in the
# real builds (the kernels' switches have no default, se_cuda_options.cuh). The __CUDA_NO_*
# macros are those of the real CUDA build too (setup.py, CMakeLists.txt): the half types
# without their implicit operators and conversions.
CFLAGS = ("-O1", "-Wno-attributes", "-Wno-unknown-pragmas", "-Werror=switch",
          "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
          "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__")

SE_KERNELS_SOURCES = (*(HERE / "binding" / name for name in
                        ("emulated_forward.cpp", "emulated_backward.cpp", "emulated_ops.cpp",
                         "emulated_stream.cpp", "emulated_stream_ops.cpp")),
                      ROOT / "csrc" / "se_common.cpp")  # the stream ops' checks and tensors
CHECKS_SOURCES = (HERE / "planted_bugs.cpp",)


class CudaHeadersMissing(RuntimeError):
    """The CUDA toolkit's headers are not where the build looks for them."""


def cuda_include_dir() -> Path | None:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if torch.version.cuda:
        candidates.append(f"/usr/local/cuda-{torch.version.cuda}")
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if root and (Path(root) / "include" / "cuda_runtime.h").exists():
            return Path(root) / "include"
    return None


def build(name: str, sources, extra_cflags=(), verbose: bool = False) -> None:
    """Compiles `sources` with the emulator's flags (plus `extra_cflags`) into extension
    `name` and loads it into this process; its ops register with torch.ops. Raises
    CudaHeadersMissing, or torch's RuntimeError with the compiler's output."""
    include = cuda_include_dir()
    if include is None:
        raise CudaHeadersMissing("the CUDA emulator needs the CUDA toolkit's headers "
                                 "(set CUDA_HOME)")
    from torch.utils.cpp_extension import load

    load(name=name, sources=[str(s) for s in sources], extra_include_paths=[str(include)],
         extra_cflags=[*CFLAGS, *extra_cflags], is_python_module=False, verbose=verbose)


def load_or_skip(loader):
    """loader() in a pytest fixture: a skip, with the reason, where the CUDA toolkit's
    headers are missing."""
    import pytest

    try:
        return loader()
    except CudaHeadersMissing as error:
        pytest.skip(str(error))


_stream_library = None  # the stream ops' schemas in se_kernels_emu, defined once


def _define_stream_ops() -> None:
    """se_kernels_emu's stream ops take the schemas of se_kernels' (se_kernels/_stream_ops.py);
    the binding registers their CPU kernels."""
    global _stream_library
    if _stream_library is None:
        from se_kernels._stream_ops import ACT_SCHEMAS, SCHEMAS

        library = torch.library.Library("se_kernels_emu", "FRAGMENT")  # noqa: TOR901 - kept
        for name, schema in {**SCHEMAS, **ACT_SCHEMAS}.items():
            library.define(name + schema)
        _stream_library = library


def load_se_kernels(verbose: bool = False):
    """torch.ops.se_kernels_emu: csrc/cuda's plans and kernels on the emulator, set to the
    emulated device."""
    build("se_kernels_cuda_emulator", SE_KERNELS_SOURCES, verbose=verbose)
    _define_stream_ops()
    ops = torch.ops.se_kernels_emu
    ops.set_device(*EMULATED_DEVICE)
    return ops


def load_checks(verbose: bool = False):
    """torch.ops.cuda_emulator: the planted kernels (planted, planted_names, set_mode)."""
    build("cuda_emulator_checks", CHECKS_SOURCES, verbose=verbose)
    return torch.ops.cuda_emulator


@dataclass(frozen=True)
class Mode:
    """An emulator schedule: the order threads of a CTA run in between synchronization
    points, the order CTAs start in (random also keeps 4 CTAs in flight, interleaved), and
    whether shared memory is seen as of the last barrier (races then show as errors)."""
    fibers: str
    ctas: str
    snapshot: bool

    @property
    def resident(self) -> int:
        return 4 if self.ctas == "random" else 1

    def __str__(self) -> str:
        return f"{self.fibers}-threads-{self.ctas}-ctas" + ("-snapshot" if self.snapshot else "")


ORDERS = ("forward", "reverse", "random")
ALL_MODES = [Mode(f, c, s) for f in ORDERS for c in ORDERS for s in (False, True)]
STRICT = Mode("random", "random", True)
DEFAULT_MODE = Mode("forward", "forward", False)


def set_mode(ops, mode: Mode, seed: int) -> None:
    """Sets either extension's emulator (`ops`: its torch.ops namespace) to `mode`, its
    random orders seeded with `seed`."""
    ops.set_mode(mode.fibers, mode.ctas, mode.resident, seed, mode.snapshot)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("which", nargs="?", choices=("se_kernels", "checks"),
                        help="the extension to build (default: both)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the compiler's commands")
    args = parser.parse_args(argv)
    loaders = {"se_kernels": load_se_kernels, "checks": load_checks}
    for which in [args.which] if args.which else loaders:
        try:
            loaders[which](verbose=args.verbose)
        except CudaHeadersMissing as error:
            print(error, file=sys.stderr)
            return 2
        except RuntimeError as error:  # torch's "Error building extension", the output before it
            print(f"building the emulator's {which} extension failed: {error}", file=sys.stderr)
            return 1
        print(f"built the emulator's {which} extension")
    return 0


if __name__ == "__main__":
    sys.exit(main())
