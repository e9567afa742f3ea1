"""The cuda backend's schedule as its own planning code lays it out (csrc/cuda/se_plan.h,
through se_kernels::cuda_schedule and `se-kernels plan`), against what the pipelined schedule
promises on the h200 profile, for every SE layer of the benchmark networks: 2 launches
forward and at most 4 backward for any batch, and modeled DRAM traffic of the floor's tensors
within 10% of the floor. tests/test_cuda_emulation.py checks that the kernels launch what
this plan lists. No GPU needed."""

from __future__ import annotations

import pytest
import torch

from se_kernels import plan
from se_kernels.backends import native

SCHEDULE_ENV = "SE_KERNELS_CUDA_SCHEDULE"
GROUP_ENV = "SE_KERNELS_CUDA_GROUP_BYTES"
GPU = plan.GPUS["h200"]


@pytest.fixture(autouse=True)
def default_schedule(monkeypatch):
    if native.EXTENSION_ERROR is not None:
        pytest.skip(f"no compiled extension: {native.EXTENSION_ERROR}")
    monkeypatch.delenv(SCHEDULE_ENV, raising=False)
    monkeypatch.delenv(GROUP_ENV, raising=False)


def network_shapes(network: str):
    pytest.importorskip("torchvision")
    from se_kernels.bench.shapes import network_shapes as shapes

    return shapes(network)


@pytest.mark.parametrize("network", ["resnet50", "mobilenetv3", "efficientnet_b0",
                                     "regnety_400mf"])
def test_pipelined_schedule_on_every_network_layer(network):
    for shape in network_shapes(network):
        for dtype in (torch.bfloat16, torch.float32):
            for channels_last in (False, True):
                for epilogue in (False, True):
                    for n in (1, 32, 256):
                        call = plan.PlanCall(n, shape.channels, shape.height, shape.width,
                                             shape.squeeze, dtype, channels_last,
                                             residual=epilogue, out_relu=epilogue)
                        forward, backward = plan.plan("cuda", call, GPU).values()
                        where = f"{shape.label} N={n} {dtype} channels_last={channels_last}"
                        assert forward.launches == 2, where
                        assert backward.launches <= 4, where
                        for half in (forward, backward):
                            assert half.floor_bytes <= half.dram_bytes, where
                            if n >= 32:
                                assert half.dram_bytes <= 1.10 * half.floor_bytes, where


def test_grouped_schedule_is_selectable(monkeypatch):
    """SE_KERNELS_CUDA_SCHEDULE=grouped gives the one-launch-per-stage schedule, whose
    launches grow with the batch; an unknown name is an error."""
    call = plan.PlanCall(256, 256, 56, 56, 16, torch.bfloat16, True, residual=True,
                         out_relu=True)
    pipelined = plan.plan("cuda", call, GPU)
    monkeypatch.setenv(SCHEDULE_ENV, "grouped")
    grouped = plan.plan("cuda", call, GPU)
    assert pipelined["forward"].launches == 2 and pipelined["backward"].launches == 4
    assert grouped["forward"].launches > 20 and grouped["backward"].launches > 40
    assert grouped["forward"].dram_bytes > 1.2 * grouped["forward"].floor_bytes
    kernels = {launch.kernel for launch in plan.trace("cuda", call, GPU, backward=False)}
    assert kernels == {"reduce", "combine", "mlp", "map"}
    monkeypatch.setenv(SCHEDULE_ENV, "fastest")
    with pytest.raises(RuntimeError, match="SE_KERNELS_CUDA_SCHEDULE must be 'pipelined' or "
                                           "'grouped', got 'fastest'"):
        plan.trace("cuda", call, GPU, backward=False)


def test_the_l2_budget_sets_the_groups(monkeypatch):
    """A smaller L2 budget (SE_KERNELS_CUDA_GROUP_BYTES) means more, smaller groups in the
    same two launches."""
    call = plan.PlanCall(8, 256, 28, 28, 16, torch.bfloat16, False)

    def x_reads() -> int:
        trace = plan.trace("cuda", call, GPU, backward=False)
        assert len(trace) == 2
        return sum(access.tensor == "x" for launch in trace for access in launch.accesses)

    assert x_reads() == 2  # one group (3.2 MB of x; its window 29 MB): read, then re-read
    monkeypatch.setenv(GROUP_ENV, "1")
    assert x_reads() == 2 * 8  # groups of one sample
