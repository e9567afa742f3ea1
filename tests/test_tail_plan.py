"""The block tail's schedule on the cuda and triton backends as their own planning code lays
it out (`se-kernels plan --path tail`: the stream ops that se_kernels/tail.py calls, planned
by se_kernels::cuda_stream_schedule and by the Triton stream ops' bodies on fake tensors),
against the targets of DESIGN.md §2 on the h100 profile, for the tails of SE-ResNet-50's
four stages at N = 32 and 256, in fp16, bf16 and fp32, NCHW and channels-last, with the
shortcut and the output ReLU: two passes over x-sized tensors each way, and modeled DRAM
bytes of the floor's tensors within 1.10x (cuda) and 1.25x (triton) of the tail's floor.
tests/test_cuda_stream_emulation.py and tests/test_triton_plan.py check that the kernels
launch what these plans list. No GPU needed."""

from __future__ import annotations

import pytest
import torch

from se_kernels import plan
from se_kernels.backends import native

GPU = plan.GPUS["h100"]
STAGES = ((256, 56), (512, 28), (1024, 14), (2048, 7))  # SE-ResNet-50's tails: C, H = W
BATCHES = (32, 256)
TARGET = {"cuda": 1.10, "triton": 1.25}
# The launches besides the passes: the combines of a reduction's split partials.
COMBINES = {"cuda": "combine", "triton": "torch_reduce_pieces"}


def requires(backend: str) -> None:
    if backend == "cuda" and native.EXTENSION_ERROR is not None:
        pytest.skip(f"no compiled extension: {native.EXTENSION_ERROR}")
    if backend == "triton":
        pytest.importorskip("triton")


def tail_call(n: int, c: int, hw: int, dtype: torch.dtype, channels_last: bool) -> plan.PlanCall:
    return plan.PlanCall(n, c, hw, hw, c // 16, dtype, channels_last, residual=True,
                         out_relu=True, path=plan.TAIL)


def is_pass(launch: plan.Launch) -> bool:
    """Whether the launch walks x-sized tensors."""
    return any(access.tensor in plan.STREAMS for access in launch.accesses)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_tail_plans_meet_the_targets(backend, dtype, channels_last):
    """Two passes each way, the other launches combines only; DRAM bytes within the target
    of the floor, and below it by no more than what half the L2 (the window a re-read hits
    in) can hold."""
    requires(backend)
    for c, hw in STAGES:
        for n in BATCHES:
            call = tail_call(n, c, hw, dtype, channels_last)
            for backward in (False, True):
                where = f"{backend} C={c} {hw}x{hw} N={n} backward={backward}"
                trace = plan.trace(backend, call, GPU, backward)
                cost = plan.pass_cost(trace, plan.floor_bytes(call, backward), GPU)
                assert sum(map(is_pass, trace)) == 2, where
                others = {launch.kernel for launch in trace if not is_pass(launch)}
                assert others <= {COMBINES[backend]}, where
                assert cost.dram_bytes <= TARGET[backend] * cost.floor_bytes, where
                assert cost.dram_bytes >= cost.floor_bytes - GPU.l2_bytes // 2, where


@pytest.mark.xfail(strict=True, reason="the reduce passes split H*W into pieces to fill the "
                   "GPU when N*C is small, and a split reduction's partials are combined by "
                   "one more launch (cuda: the combine kernel; triton: a PyTorch reduction per "
                   "statistic): e.g. NCHW C=256 56x56 and channels-last fp32 C=1024 14x14 on "
                   "cuda, channels-last C=256..1024 on triton, at N=32 and not at N=256")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_tail_launches_do_not_depend_on_the_batch(backend):
    requires(backend)
    differing = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for channels_last in (False, True):
            for c, hw in STAGES:
                counts = {n: [plan.plan(backend, tail_call(n, c, hw, dtype, channels_last),
                                        GPU)[name].launches for name in ("forward", "backward")]
                          for n in BATCHES}
                if len(set(map(tuple, counts.values()))) > 1:
                    differing.append((dtype, channels_last, c, counts))
    assert not differing


# EfficientNet-B0's act tails (BatchNorm -> SiLU -> SE, after the depthwise convolution): C, H = W.
ACT_STAGES = ((96, 112), (144, 56), (240, 28), (480, 14), (1152, 7))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_act_tail_plans_meet_the_targets(backend, dtype, channels_last):
    """The act tail in training: three passes forward (statistics, squeeze of act(u), map),
    two backward, the other launches combines only; DRAM bytes of the floor's tensors within
    the target of its floor (plan.floor_bytes: 4 and 5 x-sized tensors), and below it by no
    more than half the L2 per re-reading pass (forward two, backward one)."""
    requires(backend)
    for c, hw in ACT_STAGES:
        for n in BATCHES:
            call = plan.PlanCall(n, c, hw, hw, max(1, c // 24), dtype, channels_last,
                                 path=plan.TAIL, activation="silu")
            for backward, passes in ((False, 3), (True, 2)):
                where = f"{backend} C={c} {hw}x{hw} N={n} backward={backward}"
                trace = plan.trace(backend, call, GPU, backward)
                cost = plan.pass_cost(trace, plan.floor_bytes(call, backward), GPU)
                assert cost.floor_bytes == call.x_bytes * (5 if backward else 4), where
                assert sum(map(is_pass, trace)) == passes, where
                others = {launch.kernel for launch in trace if not is_pass(launch)}
                assert others <= {COMBINES[backend]}, where
                assert cost.dram_bytes <= TARGET[backend] * cost.floor_bytes, where
                assert cost.dram_bytes >= cost.floor_bytes - (passes - 1) * GPU.l2_bytes // 2, where


def test_act_tail_plan_call_is_checked():
    """An activation belongs to the tail's path, with no residual or output activation."""
    with pytest.raises(ValueError, match="block tail's path"):
        plan.PlanCall(8, 64, 7, 7, 4, torch.float32, False, activation="silu")
    with pytest.raises(ValueError, match="no residual and no output activation"):
        plan.PlanCall(8, 64, 7, 7, 4, torch.float32, False, residual=True, path=plan.TAIL,
                      activation="silu")
