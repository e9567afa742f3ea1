"""Host time of the Triton backend's drivers per call, with the kernel launches stubbed.

Times se_kernels/backends/triton/driver.py's forward and backward with the GPU launch
profile and `_launch` replaced by a no-op: what a call costs the host besides Triton's own
launcher and the op dispatch. On meta tensors (no memory; note that meta's new_empty and
empty_like run Python decompositions, ~4 us against ~1 us for torch.empty) or, with
--device cpu, on CPU tensors at batch 2 (real allocations, small enough for malloc to reuse
its heap as a GPU's caching allocator would). Shapes: SE layers of ResNet-50 and MobileNetV3,
bf16, channels_last and NCHW, residual + output ReLU. Median of `--repeat` rounds.

    python benchmarks/host_overhead.py
    python benchmarks/host_overhead.py --compare-to /path/to/other/checkout [--device cpu]

--compare-to alternates rounds between this checkout and another one (each in its own
process, PYTHONPATH set to the checkout), so a noisy machine affects both alike, and prints
the ratio of their medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = [(32, 256, 56, 56, 16), (256, 2048, 7, 7, 128), (32, 960, 7, 7, 240)]  # N, C, H, W, S


def measure(calls: int, device: str) -> dict[str, float]:
    """Microseconds per call, per shape and direction, in this process."""
    os.environ.pop("TRITON_INTERPRET", None)
    from se_kernels.backends.triton import driver, heuristics

    driver._launch = lambda kernel, programs, *args, **meta: None
    driver.device_profile = lambda device: heuristics.GPU_PROFILE
    options = ("relu", "sigmoid", "avg", "relu")
    results = {}
    for n, c, h, w, s in SHAPES:
        if device == "cpu":  # small enough for malloc to reuse its heap, as a GPU's caching allocator does
            n = 2
        for layout in ("channels_last", "nchw"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            like = dict(device=device, dtype=torch.bfloat16)
            x = torch.empty(n, c, h, w, **like).contiguous(memory_format=fmt)
            w1, w2 = torch.empty(s, c, **like), torch.empty(c, s, **like)
            b1, b2 = torch.empty(s, **like), torch.empty(c, **like)
            residual = torch.empty_like(x)
            out, z, zmax, a, g = driver.forward(x, w1, b1, w2, b2, residual, *options, fmt)
            dy = torch.empty_like(out)
            key = f"{n}x{c}x{h}x{w} {layout}"

            def forward():
                driver.forward(x, w1, b1, w2, b2, residual, *options, fmt)

            def backward():
                driver.backward(dy, x, out, w1, w2, z, zmax, a, g, *options, True, fmt)

            for name, fn in (("forward", forward), ("backward", backward)):
                fn()
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                results[f"{key} {name}"] = (time.perf_counter() - start) / calls * 1e6
    return results


def run_in(checkout: str, calls: int, device: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": checkout}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, __file__, "--child", "--calls", str(calls),
                           "--device", device], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per timing")
    parser.add_argument("--repeat", type=int, default=5, help="rounds (median reported)")
    parser.add_argument("--compare-to", metavar="CHECKOUT", help="another source tree to time alike")
    parser.add_argument("--device", default="meta", choices=["meta", "cpu"],
                        help="where the tensors live (cpu: real allocations, batch 2)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        print(json.dumps(measure(args.calls, args.device)))
        return
    here = str(Path(__file__).resolve().parent.parent)
    trees = {"this": here} if not args.compare_to else {"this": here, "other": args.compare_to}
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for _ in range(args.repeat):
        for name, tree in trees.items():
            rounds[name].append(run_in(tree, args.calls, args.device))
    keys = list(rounds["this"][0])
    medians = {name: {k: statistics.median(r[k] for r in runs) for k in keys}
               for name, runs in rounds.items()}
    header = "| call | this: us per call |" + (" other: us per call | this / other |" if args.compare_to else "")
    print(header)
    print("|---|---|" + ("---|---|" if args.compare_to else ""))
    for k in keys:
        row = f"| {k} | {medians['this'][k]:.1f} |"
        if args.compare_to:
            row += f" {medians['other'][k]:.1f} | {medians['this'][k] / medians['other'][k]:.2f} |"
        print(row)


if __name__ == "__main__":
    main()
