"""What a GPU backend's schedule looks like to `se-kernels plan`: the data of a trace.

A backend's planning code (its `schedule_trace`, se_kernels.dispatch.Backend) yields a trace:
the launches of one forward or backward, in order, each with its kernel, its program (CTA)
count and the byte ranges it touches, in the order its programs walk them. se_kernels.plan
evaluates traces; nothing here imports a backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .options import AVG, NONE

# The x-sized tensors: the floor's (DESIGN.md §2) and the streams a pass walks sample by sample.
STREAMS = ("x", "residual", "out", "grad_out", "dx", "dresidual")
# What a plan is of (PlanCall.path): the fused SE op; an SE on the stream ops (the staged path,
# DESIGN.md §1.4, every excitation form but the plain two-FC one); the block tail (§1.5).
FUSED, STAGED, TAIL = "fused", "staged", "tail"
PATHS = (FUSED, STAGED, TAIL)
# The tensors a trace names: the streams, then the weights (and their gradients) and
# everything else (the [N, C] vectors, partial sums). The cuda backend's cuda_schedule op
# encodes tensors and kernels as indices into these lists, which csrc/cuda/se_trace.h
# spells in the same order (tests/test_options.py checks).
TRACE_TENSORS = (*STREAMS, "weights", "scratch")
CUDA_TRACE_KERNELS = ("zero_sync", "forward_pipeline", "backward_pipeline", "reduce", "combine",
                      "mlp", "map", "weight_grad", "weight_grad_combine")


class PlanUnavailable(RuntimeError):
    """A backend's planning code cannot run here (the message says why)."""


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


class Access(NamedTuple):
    tensor: str  # one of TRACE_TENSORS
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
    """The arguments of an SE call that shape its schedule, and the path it takes (PATHS);
    for the tail, `residual` is the shortcut."""
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
    path: str = FUSED
    activation: str = NONE  # the tail's activation between the norm and the SE (the act tail)

    def __post_init__(self):
        if self.path not in PATHS:
            raise ValueError(f"a plan's path is one of {', '.join(PATHS)}, got {self.path!r}")
        if self.path == TAIL and self.pool != AVG:
            raise ValueError(f"the block tail squeezes with the mean, not pool {self.pool!r}")
        if self.activation != NONE:
            if self.path != TAIL:
                raise ValueError(f"an activation before the SE (got {self.activation!r}) "
                                 f"belongs to the block tail's path, not the {self.path!r} one")
            if self.residual or self.out_relu:
                raise ValueError(f"the act tail (activation {self.activation!r}) takes no "
                                 "residual and no output activation")

    @property
    def p(self) -> int:
        return self.h * self.w

    @property
    def element_size(self) -> int:
        return self.dtype.itemsize

    @property
    def x_bytes(self) -> int:
        return self.n * self.c * self.p * self.element_size



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
            accesses = [Access(TRACE_TENSORS[t], off, nbytes, bool(write))
                        for t, off, nbytes, write in
                        (codes[j:j + 4] for j in range(i + 3, i + 3 + 4 * count, 4))]
            launches.append(Launch(CUDA_TRACE_KERNELS[kernel], ctas, accesses))
            i += 3 + 4 * count
    except (IndexError, ValueError) as error:
        raise ValueError(f"malformed schedule encoding at position {i} of {len(codes)}") from error
    return launches
