"""The Triton backend's plan (se-kernels plan) is the schedule its calls really launch: real
calls' launches (of the SE ops; of the stream ops under a staged SE and a block tail),
recorded (interpreted on CPU, or on a GPU), equal the plan's trace computed for the device
profile the calls ran with."""

from __future__ import annotations

import pytest
import torch

from se_kernels import staged, tail
from se_kernels.backends.triton import heuristics, stream, trace
from se_kernels.backends.triton import ops as triton_ops
from se_kernels.excitation import Mlp
from se_kernels.options import OUT_RELU, RELU, SIGMOID
from se_kernels.plan import PlanCall
from se_kernels.schedule import STAGED, TAIL

from helpers import Case
from op_checks import backward_args, forward_args
from test_triton_kernels import TINY
from triton_support import DEVICE

CASES = [
    Case(n=2, c=37, h=6, w=7, s=9, dtype=torch.bfloat16, layout="channels_last", pool="avgmax",
         residual=True, out_activation="relu"),
    Case(n=3, c=24, h=7, w=7, s=4, dtype=torch.bfloat16, pool="max", residual=True,
         out_activation="relu"),
    Case(n=4, c=16, h=14, w=14, s=4, layout="channels_last"),
    Case(n=1, c=3, h=1, w=1, s=1),
]


def plan_call(case: Case) -> PlanCall:
    return PlanCall(case.n, case.c, case.h, case.w, case.s, case.dtype,
                    case.layout == "channels_last", case.residual,
                    case.out_activation == "relu", case.pool)


def recording(driver, monkeypatch) -> list:
    """The (kernel, programs) of every launch the drivers make from now on, in order."""
    made = []
    launch = driver._launch

    def recording_launch(kernel, programs, *launch_args, **meta):
        if programs:
            made.append((trace.kernel_name(kernel), programs))
        launch(kernel, programs, *launch_args, **meta)

    monkeypatch.setattr(driver, "_launch", recording_launch)
    return made


@pytest.mark.parametrize("case", CASES, ids=str)
def test_launches_made_are_the_plan(driver, monkeypatch, case):
    args = forward_args(case, DEVICE)
    profile = heuristics.device_profile(args[0].device)
    planned = {backward: [(launch.kernel, launch.programs)
                          for launch in trace.schedule_trace(plan_call(case), profile, backward)]
               for backward in (False, True)}

    made = recording(driver, monkeypatch)
    outputs = triton_ops.se_forward(*args)
    forward = list(made)
    made.clear()
    triton_ops.se_backward(*backward_args(args, outputs, torch.randn_like(outputs[0])))
    assert forward == planned[False]
    assert made == planned[True]
    assert {name for name, _ in forward} >= {"_pool_kernel", "_scale_kernel"}
    assert {name for name, _ in made} >= {"_grad_reduce_kernel", "_grad_input_kernel"}


@pytest.fixture
def tiny_stream_tiles(driver, monkeypatch):
    """The stream ops planned afresh for GPU-like tiles so small that their reductions split
    H*W into pieces; the profile."""
    tiny = heuristics.DeviceProfile(**TINY)
    stream.forget_plans()
    monkeypatch.setattr(stream, "device_profile", lambda device: tiny)
    yield tiny
    monkeypatch.undo()
    stream.forget_plans()


@pytest.mark.parametrize("path", [STAGED, TAIL])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_stream_launches_made_are_the_plan(driver, monkeypatch, tiny_stream_tiles, path, layout):
    """A staged SE's and a block tail's launches, forward then backward, are the plan's; the
    plan also lists the PyTorch reductions that add up the split reductions' pieces."""
    n, c, h, w, s = 2, 5, 9, 11, 2
    call = PlanCall(n, c, h, w, s, torch.float32, layout == "channels_last", residual=True,
                    out_relu=True, path=path)
    planned = {backward: [(launch.kernel, launch.programs) for launch in
                          trace.schedule_trace(call, tiny_stream_tiles, backward)]
               for backward in (False, True)}
    pieces = trace.kernel_name(stream.PIECES_REDUCTION)
    assert all(any(kernel == pieces for kernel, _ in launches) for launches in planned.values())

    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if call.channels_last else torch.contiguous_format
    x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=fmt).requires_grad_()
    residual = torch.randn(x.shape, generator=g).requires_grad_()
    params = [torch.randn(shape, generator=g).requires_grad_()
              for shape in ((s, c), (s,), (c, s), (c,))] + [None] * 4
    made = recording(driver, monkeypatch)
    if path == TAIL:
        norm = (torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g), None, None)
        out, _ = tail.block_tail(x, norm, Mlp(RELU, 0.0), params, gate=SIGMOID, batch_stats=True,
                                 residual=residual, out_activation=OUT_RELU, backend="triton")
    else:
        out, _ = staged.staged_squeeze_excitation(x, Mlp(RELU, 0.0), params, gate=SIGMOID,
                                                  residual=residual, out_activation=OUT_RELU,
                                                  backend="triton")
    forward = list(made)
    made.clear()
    out.backward(torch.randn(out.shape, generator=g))
    assert forward == [launch for launch in planned[False] if launch[0] != pieces]
    assert made == [launch for launch in planned[True] if launch[0] != pieces]
