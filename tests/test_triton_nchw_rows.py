"""The NCHW reduction passes on rows that start and end off 16-byte boundaries.

The passes read each row's piece as its aligned body (whole 16-byte vectors) plus a head and
a tail of fewer than a vector's elements (kernels._row_body, kernels._row_edges). H*W = 49,
196, 45 and 5 are not multiples of a vector (8 fp16/bf16, 4 fp32 elements), so rows start
at every offset within a vector; H*W = 1 rows are all head. The pieces profile cuts rows
into pieces of 4 pixels (shorter than a bf16 vector) or of 12 (aligned rows, pieces that
are not). Max pooling gets tied maxima at the first, middle and last pixels (head, body,
tail), or maxima of 0 (what masked-off lanes load), whose counts the backward must get
exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from se_kernels.backends.triton import heuristics
from se_kernels.backends.triton import ops as triton_ops
from se_kernels.options import POOLS

from helpers import Case, check_inputs, grad_output, make_inputs
from op_checks import random_backward_args
from test_ties import tied_inputs
from test_triton_kernels import TINY
from triton_support import DEVICE

# Pieces of a few pixels: blocks of at most 4 along H*W, and H*W split into pieces.
PIECES = dataclasses.replace(heuristics.DeviceProfile(**TINY), contiguous_max=4)

SHAPES = [(7, 7), (14, 14), (5, 9), (1, 1), (1, 5)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
REDUCTIONS = ("_pool_kernel", "_grad_reduce_kernel")


@pytest.fixture(params=["whole_rows", "pieces"])
def profile(request, driver, monkeypatch):
    """The backend's own profile (whole rows per program), or PIECES."""
    if request.param == "pieces":
        monkeypatch.setattr(driver, "device_profile", lambda device: PIECES)
    return None if request.param == "whole_rows" else PIECES


@pytest.fixture
def reductions(driver, monkeypatch):
    """The constexprs of every reduction launch the test makes."""
    seen = []
    launch = driver._launch

    def recording_launch(kernel, programs, *args, **meta):
        if getattr(kernel, "fn", kernel).__name__ in REDUCTIONS:
            seen.append(meta)
        launch(kernel, programs, *args, **meta)

    monkeypatch.setattr(driver, "_launch", recording_launch)
    return seen


def expected_edges(case: Case, profile) -> bool:
    """Whether some row's piece starts or ends inside a 16-byte vector (offsets counted from
    the tensor's start, which the allocator aligns)."""
    vec = 16 // case.dtype.itemsize
    p = case.h * case.w
    if profile is None:
        return p % vec != 0
    cfg = heuristics.pass_config(case.n, case.c, p, False, case.dtype.itemsize, profile)
    starts = {row * p + piece * cfg.p_per_split for row in range(case.n * case.c)
              for piece in range(cfg.splits)}
    return any(start % vec for start in starts) or p % vec != 0


def check_case(case: Case, profile, reductions, inputs=None) -> None:
    inputs = make_inputs(case, DEVICE) if inputs is None else inputs
    check_inputs(case, inputs, grad_output(case, DEVICE), "triton", DEVICE)
    assert len(reductions) == 2, reductions  # the forward's and the backward's
    for meta in reductions:
        assert meta["VEC"] == 16 // case.dtype.itemsize
        assert meta["EDGES"] == expected_edges(case, profile), (case, meta)
    reductions.clear()


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hw", SHAPES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_rows_off_vector_boundaries(profile, reductions, hw, dtype, pool):
    case = Case(n=2, c=5, h=hw[0], w=hw[1], s=3, dtype=dtype, pool=pool, residual=True,
                out_activation="relu")
    check_case(case, profile, reductions)
    if pool != "avg" and case.h * case.w > 1:
        for pattern in ("repeated_max", "zero_planes"):  # ties at the edges; maxima of 0
            check_case(case, profile, reductions, tied_inputs(case, pattern, DEVICE))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_aligned_rows_cut_off_vector_boundaries(driver, monkeypatch, reductions, dtype):
    """6x8 = 48 pixels: rows start on vectors, but with 80 rows the PIECES profile cuts
    them into pieces of 12 pixels, which start inside bf16 and fp16 vectors."""
    monkeypatch.setattr(driver, "device_profile", lambda device: PIECES)
    case = Case(n=2, c=40, h=6, w=8, s=5, dtype=dtype, pool="avgmax")
    cfg = heuristics.pass_config(case.n, case.c, 48, False, dtype.itemsize, PIECES)
    assert cfg.splits > 1 and cfg.p_per_split == 12  # the path this test is for
    check_case(case, PIECES, reductions)
    check_case(case, PIECES, reductions, tied_inputs(case, "integers", DEVICE))


def test_edges_are_bit_identical_across_runs(driver, monkeypatch):
    """The heads and tails are summed in a fixed order too."""
    monkeypatch.setattr(driver, "device_profile", lambda device: PIECES)
    case = Case(n=2, c=5, h=7, w=7, s=2, pool="avgmax", dtype=torch.bfloat16)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)  # the same grad_out
        outs.append(triton_ops.se_backward(*random_backward_args(triton_ops.se_forward, case, DEVICE)))
    for first, second in zip(*outs):
        assert torch.equal(first, second)
