"""Kernel launches of the GPU backends' schedules, from their own planning code (no GPU).

Triton: runs the real drivers (se_kernels/backends/triton/driver.py) on fake CUDA tensors
with the GPU profile, recording each launch instead of making it (the trace behind
`se-kernels plan --backend triton`, se_kernels/backends/triton/trace.py). CUDA: compiles
benchmarks/cuda_launch_counts.cpp, which asks csrc/cuda/'s plan_forward / plan_backward
for an H100's SM count and L2 (needs the CUDA toolkit's headers, not a GPU; about a minute).
Prints the markdown tables of DESIGN.md §3. Run it without TRITON_INTERPRET (the
interpreter has its own launch profile):

    python benchmarks/launch_counts.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from se_kernels.vocabulary import AVG

SHAPES = [  # (label, C, S, H*W): SE layers of ResNet-50 and MobileNetV3-Large
    ("resnet50 C256 56x56", 256, 16, 56 * 56),
    ("resnet50 C2048 7x7", 2048, 128, 7 * 7),
    ("mobilenetv3 C960 7x7", 960, 240, 7 * 7),
]
BATCHES = (1, 32, 256)


def record(n: int, c: int, s: int, p: int, channels_last: bool) -> tuple[list, list]:
    from se_kernels.backends.triton import heuristics, trace
    from se_kernels.plan import PlanCall

    call = PlanCall(n, c, p, 1, s, torch.bfloat16, channels_last)
    forward, backward, _ = trace.record(call, heuristics.GPU_PROFILE)
    return tuple([(trace.kernel_name(k), programs) for k, programs, _, _ in launches]
            for launches in (forward, backward))


def cuda_schedule():
    from torch.utils.cpp_extension import load

    here = Path(__file__).resolve().parent
    cuda_home = os.environ.get("CUDA_HOME") or f"/usr/local/cuda-{torch.version.cuda}"
    load(name="se_schedule", sources=[str(here / "cuda_launch_counts.cpp")],
         extra_include_paths=[f"{cuda_home}/include", str(here.parent / "tests" / "cuda_emulator")],
         extra_cflags=["-O0", "-Wno-attributes", "-Wno-unknown-pragmas",
                       "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                       "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"],
         is_python_module=False)
    return torch.ops.se_schedule.cuda_launches


def print_table(title: str, columns: list[str], row) -> None:
    """A markdown table, one row per shape, batch and layout; row(n, c, s, p, channels_last)
    gives the cells after those three."""
    print(f"{title}\n")
    print("| " + " | ".join(["SE layer", "N", "layout", *columns]) + " |")
    print("|" + "---|" * (3 + len(columns)))
    for label, c, s, p in SHAPES:
        for n in BATCHES:
            for channels_last in (False, True):
                layout = "channels_last" if channels_last else "NCHW"
                cells = [label, n, layout, *row(n, c, s, p, channels_last)]
                print("| " + " | ".join(map(str, cells)) + " |")
    print()


def triton_row(n: int, c: int, s: int, p: int, channels_last: bool) -> list[str]:
    grid = lambda launches: " + ".join(str(programs) for _, programs in launches)  # noqa: E731
    return [f"{len(launches)}: {grid(launches)}" for launches in record(n, c, s, p, channels_last)]


def main() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run without TRITON_INTERPRET: the interpreter has its own launch profile")
    print_table("Triton, bf16, pool avg, no residual: launches and programs per launch",
                ["forward: programs per launch", "backward: programs per launch"], triton_row)
    launches = cuda_schedule()

    def cuda_row(n, c, s, p, channels_last):
        fwd, bwd, fgroup, bgroup, pieces = launches(n, c, p, s, 2, channels_last, AVG, False)
        return [f"{fgroup}, {bgroup}", pieces, fwd, bwd]

    print_table("CUDA, bf16, pool avg, no output ReLU, 132 SMs and 50 MiB of L2 (H100 SXM)",
                ["samples per L2 group (fwd, bwd)", "pieces per row", "forward launches",
                 "backward launches"], cuda_row)


if __name__ == "__main__":
    main()
