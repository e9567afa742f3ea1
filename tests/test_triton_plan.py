"""The Triton backend's plan (se-kernels plan) is the schedule its calls really launch: real
calls' launches, recorded (interpreted on CPU, or on a GPU), equal the plan's trace computed
for the device profile the calls ran with."""

from __future__ import annotations

import pytest
import torch

from se_kernels.backends.triton import heuristics, trace
from se_kernels.backends.triton import ops as triton_ops
from se_kernels.plan import PlanCall

from helpers import Case
from op_checks import backward_args, forward_args
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


@pytest.mark.parametrize("case", CASES, ids=str)
def test_launches_made_are_the_plan(driver, monkeypatch, case):
    args = forward_args(case, DEVICE)
    profile = heuristics.device_profile(args[0].device)
    planned = {backward: [(launch.kernel, launch.programs)
                          for launch in trace.schedule_trace(plan_call(case), profile, backward)]
               for backward in (False, True)}

    made = []
    launch = driver._launch

    def recording_launch(kernel, programs, *launch_args, **meta):
        if programs:
            made.append((trace.kernel_name(kernel), programs))
        launch(kernel, programs, *launch_args, **meta)

    monkeypatch.setattr(driver, "_launch", recording_launch)
    outputs = triton_ops.se_forward(*args)
    forward = list(made)
    made.clear()
    triton_ops.se_backward(*backward_args(args, outputs, torch.randn_like(outputs[0])))
    assert forward == planned[False]
    assert made == planned[True]
    assert {name for name, _ in forward} >= {"_pool_kernel", "_scale_kernel"}
    assert {name for name, _ in made} >= {"_grad_reduce_kernel", "_grad_input_kernel"}
