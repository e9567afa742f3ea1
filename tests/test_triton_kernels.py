"""The Triton kernels with GPU-like small tiles under the interpreter (or on the GPU):
split reductions, loops over H*W, several blocks in every kernel, int64 offsets, and
bit-identical reruns."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from se_kernels.backends.triton import heuristics
from se_kernels.backends.triton import ops as triton_ops

from helpers import Case, check_against_reference
from op_checks import random_backward_args
from triton_support import DEVICE


TINY = dict(sm_count=4, tile_bytes=256, elems_per_thread=4, contiguous_max=16,
            programs_per_sm=2, min_tiles_per_piece=2, mlp_tile=256, mlp_block_max=4,
            mlp_inner_max=8, max_warps=4, min_row_bytes=1 << 20,
            partial_share=1.0,  # H*W is split rather than the channel blocks cut
            l2_bytes=1 << 15)  # the map passes of the larger cases walk backwards

SMALL_TILE_CASES = [
    Case(n=3, c=37, h=6, w=7, s=9, pool="avgmax", residual=True, out_activation="relu"),
    Case(n=1, c=5, h=9, w=11, s=2, pool="max", layout="channels_last", dtype=torch.bfloat16),
    Case(n=2, c=40, h=5, w=9, s=5, activation="silu", gate="hardsigmoid", pool="avgmax",
         layout="channels_last"),
    Case(n=1, c=3, h=20, w=21, s=1, pool="max", dtype=torch.float16, bias=False),
]


@pytest.fixture
def tiny_tiles(driver, monkeypatch):
    """Every launch uses tiny tiles: several channel blocks, loops over H*W, H*W split into
    pieces, several sample and feature blocks in the MLP driver."""
    tiny = heuristics.DeviceProfile(**TINY)
    monkeypatch.setattr(driver, "device_profile", lambda device: tiny)
    return tiny


@pytest.mark.parametrize("case", SMALL_TILE_CASES, ids=str)
def test_small_tiles(driver, tiny_tiles, case):
    cfg = heuristics.pass_config(case.n, case.c, case.h * case.w, case.layout == "channels_last",
                              case.dtype.itemsize, tiny_tiles)
    assert cfg.splits > 1 and cfg.p_per_split > cfg.block_p  # the paths this test is for
    check_against_reference(case, DEVICE, "triton")


def check_replanned(driver, monkeypatch, **patches) -> None:
    """Checks an option-heavy case in both layouts with the driver's attributes patched, on
    plans made afresh (plans cached from earlier calls would not see the patches)."""
    for name, value in patches.items():
        monkeypatch.setattr(driver, name, value)
    driver.forget_plans()
    try:
        for layout in ("nchw", "channels_last"):
            check_against_reference(Case(n=3, c=6, h=3, w=5, s=2, pool="avgmax", residual=True,
                                         out_activation="relu", layout=layout), DEVICE, "triton")
    finally:
        monkeypatch.undo()
        driver.forget_plans()


def test_int64_indexing_path(driver, monkeypatch):
    """The WIDE (int64 offsets) variant of the passes, forced on a small tensor: the
    arithmetic must be the same. (Real >2**31-element tensors are tested on the GPU.)"""
    real_view = driver._view
    check_replanned(driver, monkeypatch,
                    _view=lambda x, cl: dataclasses.replace(real_view(x, cl), wide=True))


@pytest.mark.parametrize("backwards", [False, True], ids=["forwards", "backwards"])
def test_map_passes_walk_either_way(driver, monkeypatch, backwards):
    """The map passes give the same results whichever way their programs walk x."""
    walks = []
    launch = driver._launch

    def recording_launch(kernel, programs, *args, **meta):
        if "BACKWARDS" in meta:
            walks.append(meta["BACKWARDS"])
        launch(kernel, programs, *args, **meta)

    check_replanned(driver, monkeypatch, _launch=recording_launch,
                    map_walks_backwards=lambda *args: backwards)
    assert walks and set(walks) == {backwards}


def test_runs_are_bit_identical(driver, tiny_tiles):
    """Partial results are combined in a fixed order: two runs agree bit for bit."""
    case = Case(n=1, c=5, h=9, w=11, s=2, pool="avgmax", layout="channels_last")
    outs = []
    for _ in range(2):
        torch.manual_seed(0)  # the same grad_out
        args = random_backward_args(triton_ops.se_forward, case, DEVICE)
        outs.append(triton_ops.se_backward(*args))
    for first, second in zip(*outs):
        assert torch.equal(first, second)
