"""Kernel launches of the GPU backends' schedules, from their own planning code (no GPU).

Triton: runs the real drivers (se_kernels/backends/triton/driver.py) on fake CUDA tensors
with the GPU profile, recording each launch instead of making it (the trace behind
`se-kernels plan --backend triton`, se_kernels/backends/triton/trace.py). CUDA: the trace
that the extension's se_kernels::cuda_schedule makes with csrc/cuda/se_plan.h, the planning
code the kernels launch from, on both schedules. Both for the h200 profile of
se_kernels/plan.py. Prints the markdown tables of DESIGN.md §3. Run it without TRITON_INTERPRET (the
interpreter has its own launch profile):

    python benchmarks/launch_counts.py
"""

from __future__ import annotations

import os
import sys

import torch


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


def cuda_launches(n: int, c: int, s: int, p: int, channels_last: bool, schedule: str) -> list:
    """[forward, backward] launch lists of the cuda backend's `schedule`."""
    from se_kernels import plan

    os.environ["SE_KERNELS_CUDA_SCHEDULE"] = schedule  # read by the planner on every call
    call = plan.PlanCall(n, c, p, 1, s, torch.bfloat16, channels_last)
    return [plan.trace("cuda", call, plan.GPUS["h200"], backward) for backward in (False, True)]


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

    def cuda_row(n, c, s, p, channels_last):
        cells = [f"{len(launches)}: " + " + ".join(f"{launch.kernel} {launch.programs}"
                                                   for launch in launches)
                 for launches in cuda_launches(n, c, s, p, channels_last, "pipelined")]
        grouped = cuda_launches(n, c, s, p, channels_last, "grouped")
        return [*cells, f"{len(grouped[0])}, {len(grouped[1])}"]

    print_table("CUDA, bf16, pool avg, no output ReLU: launches and CTAs per launch",
                ["forward (pipelined)", "backward (pipelined)",
                 "forward, backward launches (grouped)"], cuda_row)

if __name__ == "__main__":
    main()
