"""The Triton backend's schedule as a plan trace (se_kernels.plan), from the drivers themselves.

The drivers (for a staged or tail call, the stream ops' bodies, stream.py, which the path's
own code calls: se_kernels.stream_schedule) run on fake CUDA tensors (no GPU, no memory)
with a given device profile and a `launch` that records their launches instead of making
them. Each recorded launch becomes a plan launch whose accesses come from the kernel's
actual arguments: the kernel's @touches declaration (kernels.py) says which pointer
parameters it reads and writes, in the order a program touches them, and the arguments say
which tensor each one is and, for the x-sized streams, which samples the launch walks. The
streams are listed per sample, interleaved as a program touches them (reads, then writes),
in the order the programs walk the samples: first to last, or last to first for a map pass
launched with BACKWARDS (kernels._map_program); the [N, C] vectors and weights are read
whole before the streams and written whole after them.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from ... import _compat, stream_schedule
from ...schedule import FUSED, STREAMS, Access, GpuProfile, Launch, PlanCall
from ...options import NONE, OUT_RELU, RELU, SIGMOID
from . import driver, stream
from .heuristics import GPU_PROFILE, DeviceProfile


def kernel_name(kernel) -> str:
    return getattr(kernel, "fn", kernel).__name__


def device_profile_for(gpu: GpuProfile) -> DeviceProfile:
    """The launch heuristics' profile of a plan's GPU."""
    return dataclasses.replace(GPU_PROFILE, sm_count=gpu.sm_count, l2_bytes=gpu.l2_bytes)


def _recorder(launches: list):
    """A driver `launch` that records (kernel, programs, args, meta) instead of launching."""
    def record_launch(kernel, programs: int, *args, **meta) -> None:
        if programs:
            launches.append((kernel, programs, args, meta))
    return record_launch


def record(call: PlanCall, profile: DeviceProfile, device: str = "cuda"):
    """Runs the drivers' forward and backward of `call` on fake tensors with `profile`,
    recording the launches. Returns (forward launches, backward launches, names): each
    launch is (kernel, programs, args, meta); names maps the storages of the call's
    x-sized tensors and weights to their plan tensor names."""
    fmt = torch.channels_last if call.channels_last else torch.contiguous_format
    options = (RELU, SIGMOID, call.pool, OUT_RELU if call.out_relu else NONE)
    with _compat.fake_tensor_mode():
        like = dict(device=device, dtype=call.dtype)
        x = torch.empty(call.n, call.c, call.h, call.w, **like).contiguous(memory_format=fmt)
        residual = torch.empty_like(x) if call.residual else None
        weights = (torch.empty(call.squeeze, call.c, **like), torch.empty(call.squeeze, **like),
                   torch.empty(call.c, call.squeeze, **like), torch.empty(call.c, **like))
        w1, b1, w2, b2 = weights
        forward, backward = [], []
        out, z, zmax, a, g = driver.forward(x, w1, b1, w2, b2, residual, *options, fmt,
                                            profile=profile, launch=_recorder(forward))
        grad_out = torch.empty_like(out)
        dx, *weight_grads, dres = driver.backward(grad_out, x, out, w1, w2, z, zmax, a, g,
                                                  *options, call.residual, fmt, profile=profile,
                                                  launch=_recorder(backward))
    names = {StorageWeakRef(t.untyped_storage()): name for name, t in
             (("x", x), ("residual", residual), ("out", out), ("grad_out", grad_out), ("dx", dx),
              ("dresidual", dres)) if t is not None and t.numel()}
    for t in (*weights, *weight_grads):
        names[StorageWeakRef(t.untyped_storage())] = "weights"
    return forward, backward, names


def record_stream_path(call: PlanCall, profile: DeviceProfile):
    """record's answer for a staged or tail call: the stream ops' launches, recorded as its
    path makes its calls of them."""
    forward, backward = [], []
    names = stream_schedule.run_passes(call, stream.planning_ops(profile, _recorder(forward)),
                                       stream.planning_ops(profile, _recorder(backward)))
    return forward, backward, names


class _Places:
    """Where each [N, C] vector and weight lies in its trace tensor ("scratch" or
    "weights"): storages one after another, in the order they are first met."""

    def __init__(self):
        self.base: dict = {}
        self.end: dict[str, int] = {}

    def __call__(self, name: str, storage: StorageWeakRef, nbytes: int) -> int:
        if storage not in self.base:
            self.base[storage] = self.end.get(name, 0)
            self.end[name] = self.base[storage] + nbytes
        return self.base[storage]


def _accesses(kernel, args, meta, names, places: _Places) -> list[Access]:
    bound = dict(zip(kernel.arg_names, args))
    before, streams, after = [], [], []
    for param, write, when in kernel.accesses:
        if when is not None and not when(meta):
            continue
        tensor = bound[param]
        storage = StorageWeakRef(tensor.untyped_storage())
        name = names.get(storage, "scratch")
        if name == "x" and param != "x_ptr":
            raise AssertionError(f"{kernel_name(kernel)} touches {param}, bound to x's stand-in")
        offset = tensor.storage_offset() * tensor.element_size()
        nbytes = tensor.numel() * tensor.element_size()
        if name in STREAMS:
            streams.append((name, offset, nbytes, write))
        else:
            offset += places(name, storage, tensor.untyped_storage().nbytes())
            (after if write else before).append(Access(name, offset, nbytes, write))
    streams.sort(key=lambda stream: stream[3])  # a program reads, then writes
    samples = int(bound["x_ptr"].shape[0]) if streams else 0
    order = range(samples)
    if meta.get("BACKWARDS"):
        order = reversed(order)
    walked = [Access(name, offset + sample * (nbytes // samples), nbytes // samples, write)
              for sample in order for name, offset, nbytes, write in streams]
    return before + walked + after


def schedule_trace(call: PlanCall, profile: DeviceProfile, backward: bool) -> list[Launch]:
    """The plan trace of `call`'s forward or backward, planned with `profile`."""
    recorded = record if call.path == FUSED else record_stream_path
    forward, backward_launches, names = recorded(call, profile)
    places = _Places()
    return [Launch(kernel_name(kernel), programs, _accesses(kernel, args, meta, names, places))
            for kernel, programs, args, meta in (backward_launches if backward else forward)]
