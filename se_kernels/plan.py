"""`se-kernels plan`: what one SE call (or block tail) costs a GPU, from the backends' own
planning code.

A backend's planner yields a trace: the launches of one forward or backward, in order, each
with its kernel, its program (CTA) count, and the byte ranges it touches, in the order its
programs walk them. One evaluator turns a trace into modeled DRAM bytes for a GPU profile:

  - a write costs DRAM bytes;
  - a read of bytes never touched before costs DRAM bytes;
  - a re-read hits L2 when everything touched from the start of the earlier access of those
    bytes up to and including the re-read (reads and writes, every tensor) totals at most
    half the L2; otherwise it costs DRAM bytes. Only a re-read of the same range as an
    earlier access, or of a range inside one, is recognised.

dram_bytes counts the tensors of the floor (x, residual, out, grad_out, dx, dresidual);
other_dram_bytes the rest of the trace: weights, weight gradients and the [N, C]-sized
vectors and partial sums, which the floor leaves out. predicted_us = launches * launch_us +
(dram_bytes + other_dram_bytes) / bandwidth, and the floor is the bytes no schedule can
avoid (DESIGN.md §2), over the same bandwidth. For an SE call, fused or staged:
  forward:  read x (+ residual), write out;
  backward: read grad_out and x (+ out under the output ReLU), write dx (+ dresidual when
            there is a residual and the output ReLU: without it dresidual is grad_out itself
            and nothing is written).
For the block tail, whose batch statistics need all of x before any output (and all of dy
before any dx), the two passes' bytes:
  forward:  read x twice (+ the shortcut), write out;
  backward: read dy twice (under the output ReLU: grad_out and out, then the written
            dshortcut, or without a shortcut grad_out and out again) and x twice, write dx.
With an activation between the norm and the SE (the act tail), the squeeze needs act(u), so
it waits for the statistics:
  forward:  read x three times (statistics, squeeze, map), write out;
  backward: read grad_out and x twice, write dx.

The traces come from the backends themselves (their `schedule_trace`; for staged and tail
calls, of the stream ops the path calls, se_kernels.stream_schedule); their data types are
in se_kernels.schedule.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch

from . import dispatch
from .schedule import (FUSED, GPUS, PATHS, STAGED, STREAMS, TAIL, GpuProfile, Launch, PlanCall,
                       PlanUnavailable)
from .options import ACTIVATIONS, AVG, NONE, POOLS

CURRENT = "current"  # --gpu: the GPU torch sees (current_gpu)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LAYOUTS = ("channels_last", "nchw")
PATH_NAMES = {FUSED: "SE op", STAGED: "staged SE",
              TAIL: "block tail (BatchNorm in training -> SE)"}
ACT_TAIL_NAME = "block tail (BatchNorm in training -> {} -> SE)"


@dataclass(frozen=True)
class PassCost:
    launches: int
    dram_bytes: int        # the floor's tensors
    floor_bytes: int
    predicted_us: float
    floor_us: float
    other_dram_bytes: int  # weights, weight gradients, vectors, partial sums


# Trace evaluation

def dram_bytes_by_tensor(trace: list[Launch], l2_bytes: int) -> dict[str, int]:
    """Modeled DRAM bytes of a trace (the rules in this module's docstring), per tensor."""
    window = l2_bytes // 2
    touched = 0  # bytes touched before the current access, all tensors
    earlier: dict[str, list[tuple[int, int, int]]] = {}  # tensor -> [(touched at start, lo, hi)]
    total: dict[str, int] = {}
    for launch in trace:
        for tensor, offset, nbytes, write in launch.accesses:
            end = touched + nbytes
            hit = False
            if not write:
                for start, lo, hi in reversed(earlier.get(tensor, ())):
                    if end - start > window:
                        break  # older accesses are further still
                    if lo <= offset and offset + nbytes <= hi:
                        hit = True
                        break
            if not hit:
                total[tensor] = total.get(tensor, 0) + nbytes
            earlier.setdefault(tensor, []).append((touched, offset, offset + nbytes))
            touched = end
    return total


def floor_bytes(call: PlanCall, backward: bool) -> int:
    x = call.x_bytes
    if call.path == TAIL and call.activation != NONE:
        return x * (5 if backward else 4)
    if call.path == TAIL:
        return x * (5 + 2 * call.out_relu if backward else 3 + call.residual)
    if not backward:
        return x * (2 + call.residual)
    return x * (3 + call.out_relu + (call.residual and call.out_relu))


def pass_cost(trace: list[Launch], floor: int, gpu: GpuProfile) -> PassCost:
    by_tensor = dram_bytes_by_tensor(trace, gpu.l2_bytes)
    dram = sum(by_tensor.get(tensor, 0) for tensor in STREAMS)
    other = sum(by_tensor.values()) - dram
    return PassCost(launches=len(trace), dram_bytes=dram, floor_bytes=floor,
                    predicted_us=len(trace) * gpu.launch_us + (dram + other) / gpu.bandwidth * 1e6,
                    floor_us=floor / gpu.bandwidth * 1e6, other_dram_bytes=other)


def planning_backends() -> list[str]:
    """The registered backends whose GPU schedule can be planned."""
    return [name for name in dispatch.backend_names() if dispatch.get_backend(name).PLANS_SCHEDULE]


def trace(backend: str, call: PlanCall, gpu: GpuProfile, backward: bool) -> list[Launch]:
    """The trace of `backend`'s forward or backward of `call` on `gpu`, from its own planning
    code."""
    return dispatch.get_backend(backend).schedule_trace(call, gpu, backward)


def plan(backend: str, call: PlanCall, gpu: GpuProfile) -> dict[str, PassCost]:
    return {name: pass_cost(trace(backend, call, gpu, backward), floor_bytes(call, backward), gpu)
            for name, backward in (("forward", False), ("backward", True))}


# The command

def parse_shape(text: str) -> tuple[int, int, int, int]:
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"--shape must be N,C,H,W with positive integers, got {text!r}")
    return dims


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", required=True, choices=planning_backends())
    parser.add_argument("--path", default=FUSED, choices=PATHS,
                        help="fused (default): the SE op of the plain two-FC excitation; staged: "
                             "an SE on the stream ops, as every other excitation form runs; "
                             "tail: the block tail BatchNorm -> SE -> drop path -> + shortcut "
                             "(--residual) -> ReLU (--out-activation relu), in training; "
                             "with --activation, BatchNorm -> activation -> SE")
    parser.add_argument("--shape", required=True, type=parse_shape, metavar="N,C,H,W")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--layout", default="channels_last", choices=LAYOUTS)
    parser.add_argument("--squeeze", type=int, metavar="S",
                        help="hidden units of the SE MLP (default: C // 16, at least 1)")
    parser.add_argument("--pool", default=AVG, choices=POOLS)
    parser.add_argument("--residual", action="store_true",
                        help="a residual (the tail's shortcut) is added before the output "
                             "activation")
    parser.add_argument("--out-activation", default="none", choices=["none", "relu"])
    parser.add_argument("--activation", default=NONE, choices=[NONE, *ACTIVATIONS],
                        help="with --path tail: the activation between the BatchNorm and the "
                             "SE (the act tail of MBConv and RegNetY blocks; no --residual or "
                             "--out-activation)")
    parser.add_argument("--gpu", default="h200", choices=[*sorted(GPUS), CURRENT],
                        help="the GPU profile (default h200); current: the GPU torch sees, "
                             "with its own SM count and L2 size")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def call_from_args(args: argparse.Namespace) -> PlanCall:
    n, c, h, w = args.shape
    squeeze = args.squeeze if args.squeeze is not None else max(1, c // 16)
    if squeeze < 1:
        raise ValueError(f"--squeeze must be a positive integer, got {squeeze}")
    return PlanCall(n, c, h, w, squeeze, DTYPES[args.dtype], args.layout == "channels_last",
                    args.residual, args.out_activation == "relu", args.pool, args.path,
                    args.activation)


def table(plans: dict[str, PassCost]) -> str:
    header = ["pass", "launches", "DRAM bytes", "floor bytes", "DRAM/floor", "other DRAM bytes",
              "predicted us", "floor us"]
    rows = [[name, str(p.launches), f"{p.dram_bytes:,}", f"{p.floor_bytes:,}",
             f"{p.dram_bytes / p.floor_bytes:.3f}", f"{p.other_dram_bytes:,}",
             f"{p.predicted_us:.1f}", f"{p.floor_us:.1f}"]
            for name, p in plans.items()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) if i else cell.ljust(width)
                               for i, (cell, width) in enumerate(zip(row, widths)))
                     for row in [header, *rows])


def current_gpu(device: torch.device | str | None = None) -> GpuProfile:
    """The profile of a visible GPU: its own SM count and L2 size (what the cuda backend
    plans with), with the copy bandwidth and launch cost of the profile its name matches
    (h100, h200; not the PCIe parts, which have less bandwidth), else the bandwidth of a
    copy measured now."""
    if not torch.cuda.is_available():
        raise PlanUnavailable("--gpu current: no CUDA GPU is visible to torch")
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    props = torch.cuda.get_device_properties(device)
    name = props.name.lower()
    known = next((p for key, p in GPUS.items() if key in name and "pcie" not in name), None)
    if known is not None:
        bandwidth, launch_us, source = known.bandwidth, known.launch_us, f"{known.name} profile"
    else:
        from .bench.timing import copy_bandwidth_gbps

        bandwidth, launch_us, source = copy_bandwidth_gbps(device, quick=True) * 1e9, 2.5, "measured"
    return GpuProfile(f"{props.name} (cuda:{device.index}; bandwidth {source})",
                      props.multi_processor_count, props.L2_cache_size, bandwidth, launch_us)


def main(args: argparse.Namespace) -> int:
    try:
        gpu = current_gpu() if args.gpu == CURRENT else GPUS[args.gpu]
        call = call_from_args(args)
        plans = plan(args.backend, call, gpu)
    except (PlanUnavailable, ValueError) as error:
        print(f"se-kernels plan: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({name: asdict(p) for name, p in plans.items()}))
    else:
        n, c, h, w = args.shape
        name = (ACT_TAIL_NAME.format(call.activation) if call.activation != NONE
                else PATH_NAMES[call.path])
        print(f"{args.backend} schedule of the {name} for x "
              f"{n}x{c}x{h}x{w} {args.dtype} {args.layout}, "
              f"squeeze {call.squeeze}, pool {call.pool}"
              f"{', residual' if call.residual else ''}"
              f"{', output ReLU' if call.out_relu else ''}; {gpu.describe()}")
        print(table(plans))
    return 0
