"""Modeled DRAM bytes over the floor for the SE layers of the benchmark networks, from
`se-kernels plan` (se_kernels/plan.py): one markdown table per backend, bf16, both layouts,
N = 32 and 256, with and without residual + output ReLU, on the h200 profile. No GPU needed.

    python benchmarks/plan_table.py --backend triton
"""

from __future__ import annotations

import argparse

import torch

from se_kernels import plan
from se_kernels.bench.shapes import NETWORKS, network_shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=plan.planning_backends(), default="triton")
    parser.add_argument("--batch", default="32,256")
    parser.add_argument("--gpu", default="h200", choices=sorted(plan.GPUS))
    args = parser.parse_args()
    gpu = plan.GPUS[args.gpu]
    print(f"{args.backend}, bf16, {gpu.describe()}; DRAM/floor (launches), forward | backward\n")
    print("| SE layer | N | layout | plain fwd | plain bwd | residual+ReLU fwd | residual+ReLU bwd |")
    print("|---|---|---|---|---|---|---|")
    ratios = []
    for network in NETWORKS:
        for shape in network_shapes(network):
            for n in map(int, args.batch.split(",")):
                for channels_last in (False, True):
                    cells = []
                    for epilogue in (False, True):
                        call = plan.PlanCall(n, shape.channels, shape.height, shape.width,
                                             shape.squeeze, torch.bfloat16, channels_last,
                                             residual=epilogue, out_relu=epilogue)
                        for half in plan.plan(args.backend, call, gpu).values():
                            ratio = half.dram_bytes / half.floor_bytes
                            ratios.append(ratio)
                            cells.append(f"{ratio:.3f} ({half.launches})")
                    layout = "channels_last" if channels_last else "NCHW"
                    print(f"| {shape.label} | {n} | {layout} | " + " | ".join(cells) + " |")
    print(f"\nworst {max(ratios):.3f}, mean {sum(ratios) / len(ratios):.3f} over {len(ratios)} plans")


if __name__ == "__main__":
    main()
