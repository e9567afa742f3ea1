"""`se-kernels plan`: what one SE call costs a GPU, from the backends' own planning code.

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
avoid (DESIGN.md §2), over the same bandwidth:
  forward:  read x (+ residual), write out;
  backward: read grad_out and x (+ out under the output ReLU), write dx (+ dresidual when
            there is a residual and the output ReLU: without it dresidual is grad_out itself
            and nothing is written).

Trace tensor names: PLAN_TENSORS, kernel names of the cuda backend: PLAN_KERNELS (both in
se_kernels.vocabulary).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

from .vocabulary import AVG, PLAN_KERNELS, PLAN_TENSORS, POOLS


@dataclass(frozen=True)
class GpuProfile:
    name: str
    sm_count: int
    l2_bytes: int
    bandwidth: float  # bytes per second of a device-to-device copy, read + write counted
    launch_us: float  # host + device cost of one kernel launch

    def describe(self) -> str:
        l2 = (f"{self.l2_bytes // 2**20} MiB" if self.l2_bytes % 2**20 == 0
              else f"{self.l2_bytes / 1e6:g} MB")
        return (f"{self.name}: {self.sm_count} SMs, {l2} L2, "
                f"{self.bandwidth / 1e12:.3g} TB/s, {self.launch_us:g} us per launch")


# h100: an H100 SXM as the lent machines' reports it: 132 SMs, cudaDevAttrL2CacheSize
# 52,428,800 bytes (50 MiB), a device-to-device copy at about 3.0 TB/s counting read + write.
GPUS = {
    "h100": GpuProfile("h100", sm_count=132, l2_bytes=50 * 2**20, bandwidth=3.0e12,
                       launch_us=2.5),
    "h200": GpuProfile("h200", sm_count=132, l2_bytes=60_000_000, bandwidth=4.3e12,
                       launch_us=2.5),
}
CURRENT = "current"  # --gpu: the GPU torch sees (current_gpu)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LAYOUTS = ("channels_last", "nchw")
BACKENDS = ("cuda", "triton")


class Access(NamedTuple):
    tensor: str  # one of PLAN_TENSORS
    offset: int  # bytes from the tensor's start
    nbytes: int
    write: bool


@dataclass
class Launch:
    kernel: str
    programs: int
    accesses: list[Access]


@dataclass(frozen=True)
class PlanCall:
    """The arguments of an SE call that shape its schedule."""
    n: int
    c: int
    h: int
    w: int
    squeeze: int
    dtype: torch.dtype
    channels_last: bool
    residual: bool = False
    out_relu: bool = False
    pool: str = AVG

    @property
    def p(self) -> int:
        return self.h * self.w

    @property
    def element_size(self) -> int:
        return self.dtype.itemsize

    @property
    def x_bytes(self) -> int:
        return self.n * self.c * self.p * self.element_size


# The tensors of the floor; every other tensor of a trace is counted in other_dram_bytes.
FLOOR_TENSORS = ("x", "residual", "out", "grad_out", "dx", "dresidual")


@dataclass(frozen=True)
class PassPlan:
    launches: int
    dram_bytes: int        # the floor's tensors
    floor_bytes: int
    predicted_us: float
    floor_us: float
    other_dram_bytes: int  # weights, weight gradients, vectors, partial sums


# Trace decoding and evaluation

def decode_cuda_trace(codes) -> list[Launch]:
    """The trace of the cuda backend's schedule from its flat int encoding: per launch
    [kernel code, CTAs, accesses, then per access tensor code, offset, bytes, is_write]."""
    codes = [int(v) for v in codes]
    launches, i = [], 0
    try:
        while i < len(codes):
            kernel, ctas, count = codes[i:i + 3]
            if len(codes) < i + 3 + 4 * count or count < 0:
                raise IndexError
            accesses = [Access(PLAN_TENSORS[t], off, nbytes, bool(write))
                        for t, off, nbytes, write in
                        (codes[j:j + 4] for j in range(i + 3, i + 3 + 4 * count, 4))]
            launches.append(Launch(PLAN_KERNELS[kernel], ctas, accesses))
            i += 3 + 4 * count
    except (IndexError, ValueError) as error:
        raise ValueError(f"malformed schedule encoding at position {i} of {len(codes)}") from error
    return launches


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
    if not backward:
        return x * (2 + call.residual)
    return x * (3 + call.out_relu + (call.residual and call.out_relu))


def plan_pass(trace: list[Launch], floor: int, gpu: GpuProfile) -> PassPlan:
    by_tensor = dram_bytes_by_tensor(trace, gpu.l2_bytes)
    dram = sum(by_tensor.get(tensor, 0) for tensor in FLOOR_TENSORS)
    other = sum(by_tensor.values()) - dram
    return PassPlan(launches=len(trace), dram_bytes=dram, floor_bytes=floor,
                    predicted_us=len(trace) * gpu.launch_us + (dram + other) / gpu.bandwidth * 1e6,
                    floor_us=floor / gpu.bandwidth * 1e6, other_dram_bytes=other)


# The backends' planners

class PlanUnavailable(RuntimeError):
    """The backend's planning code cannot run here (the message says why)."""


def cuda_schedule_op():
    """se_kernels::cuda_schedule from the compiled extension (PlanUnavailable if missing)."""
    from .backends import native

    if native.EXTENSION_ERROR is not None:
        raise PlanUnavailable(f"the cuda plan needs the compiled extension: {native.EXTENSION_ERROR}")
    try:
        return torch.ops.se_kernels.cuda_schedule
    except (AttributeError, RuntimeError):
        raise PlanUnavailable("the loaded extension se_kernels._C has no cuda_schedule op: "
                              "rebuild it from this source") from None


def cuda_trace(call: PlanCall, gpu: GpuProfile, backward: bool) -> list[Launch]:
    codes = cuda_schedule_op()(call.n, call.c, call.p, call.squeeze, call.element_size,
                               call.channels_last, call.residual, call.pool, call.out_relu,
                               backward, gpu.sm_count, gpu.l2_bytes)
    return decode_cuda_trace(codes)


def triton_trace(call: PlanCall, gpu: GpuProfile, backward: bool) -> list[Launch]:
    try:
        from .backends.triton import trace
    except ImportError as error:
        raise PlanUnavailable(f"the triton plan needs triton: {error}") from None
    return trace.schedule_trace(call, trace.device_profile_for(gpu), backward)


TRACERS = {"cuda": cuda_trace, "triton": triton_trace}


def plan(backend: str, call: PlanCall, gpu: GpuProfile) -> dict[str, PassPlan]:
    tracer = TRACERS[backend]
    return {name: plan_pass(tracer(call, gpu, backward), floor_bytes(call, backward), gpu)
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
    parser.add_argument("--backend", required=True, choices=BACKENDS)
    parser.add_argument("--shape", required=True, type=parse_shape, metavar="N,C,H,W")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--layout", default="channels_last", choices=LAYOUTS)
    parser.add_argument("--squeeze", type=int, metavar="S",
                        help="hidden units of the SE MLP (default: C // 16, at least 1)")
    parser.add_argument("--pool", default=AVG, choices=POOLS)
    parser.add_argument("--residual", action="store_true", help="a residual is added before the output activation")
    parser.add_argument("--out-activation", default="none", choices=["none", "relu"])
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
                    args.residual, args.out_activation == "relu", args.pool)


def table(plans: dict[str, PassPlan]) -> str:
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
        print(f"{args.backend} schedule for x {n}x{c}x{h}x{w} {args.dtype} {args.layout}, "
              f"squeeze {call.squeeze}, pool {call.pool}"
              f"{', residual' if call.residual else ''}"
              f"{', output ReLU' if call.out_relu else ''}; {gpu.describe()}")
        print(table(plans))
    return 0
