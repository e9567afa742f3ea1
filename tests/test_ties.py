"""Tied maxima and split H*W reductions, on every backend and the CUDA kernels' emulator.

Max pooling's gradient is shared equally by every position holding the maximum (as
torch.amax's is); in practice ties are common (SE after a ReLU or hardswish sees zeros and
clipped values). Random inputs almost never tie, so these inputs are built to: small
integers (exact in every dtype), all-zero planes, whole samples of zeros, the maximum
copied to several positions (first, last, middle: different tiles and pieces), constant
planes. The split cases are shapes that make each backend cut H*W into pieces reduced
separately and combined afterwards."""

from __future__ import annotations

import pytest
import torch

from helpers import Case, apply_layout, check_inputs, grad_output, make_inputs
from helpers import backend  # noqa: F401 - a fixture
from test_cuda_emulation import check_emulated, emu  # noqa: F401 - emu is a fixture
from test_triton_kernels import TINY

PATTERNS = ("integers", "zero_planes", "repeated_max", "constant_planes")


def tied_inputs(case: Case, pattern: str, device, seed: int = 0) -> dict:
    """Random SE inputs (make_inputs) whose x, in the case's dtype and layout, has ties of
    its channel maxima in the way `pattern` says."""
    t = make_inputs(case.with_(layout="nchw"), "cpu", seed)
    x = t["x"].clone()
    gen = torch.Generator().manual_seed(seed + 7)
    n, c, h, w = x.shape
    if pattern == "integers":
        x = torch.randint(-3, 4, x.shape, generator=gen).to(x.dtype)
        if t["residual"] is not None:
            t["residual"] = torch.randint(-2, 3, x.shape, generator=gen).to(x.dtype)
    elif pattern == "zero_planes":
        x[:, ::2] = 0  # every other channel, and sample 0 entirely
        x[0] = 0
        x[1:, 1::2] = x[1:, 1::2].clamp(max=0)  # maxima 0 as well (a ReLU'd map, negated)
    elif pattern == "repeated_max":
        flat = x.view(n, c, h * w)
        peak = flat.amax(-1) + 1
        positions = {0, h * w - 1, (h * w) // 2, (h * w) // 3}
        for p in positions:
            flat[..., p] = peak
    elif pattern == "constant_planes":
        levels = torch.randn(n, c, 1, 1, generator=gen, dtype=torch.float64).to(x.dtype)
        x = levels.expand_as(x).clone()
    else:
        raise ValueError(pattern)
    ties = (x == x.amax(dim=(2, 3), keepdim=True)).sum(dim=(2, 3))
    assert (ties > 1).any(), f"{pattern}: no tied maxima built"
    t["x"] = x
    for name, v in t.items():
        if v is not None:
            t[name] = v.to(device)
            if name in ("x", "residual"):
                t[name] = apply_layout(t[name], case.layout)
    return t


TIE_CASES = [
    Case(n=2, c=6, h=5, w=7, s=3, residual=True, out_activation="relu"),
    Case(n=3, c=9, h=4, w=4, s=2, activation="silu", gate="hardsigmoid", layout="channels_last"),
    Case(n=2, c=5, h=3, w=3, s=2, bias=False),  # zero samples: z = a = 0 exactly
]


def tie_cases():
    for case in TIE_CASES:
        for pool in ("max", "avgmax"):
            for dtype in (torch.float64, torch.bfloat16):
                yield case.with_(pool=pool, dtype=dtype)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("case", list(tie_cases()), ids=str)
def test_tied_maxima(backend, case, pattern):
    name, device = backend
    check_inputs(case, tied_inputs(case, pattern, device), grad_output(case, device), name, device)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("case", list(tie_cases()), ids=str)
def test_tied_maxima_emulated(emu, case, pattern):  # noqa: F811 - emu is the fixture
    for misalign in ((), ("all",)):  # 16-byte vectors, then every buffer one element off
        check_emulated(emu, case, misalign=misalign, inputs=tied_inputs(case, pattern, "cpu"),
                       grad=grad_output(case, "cpu"))


# Shapes that split H*W, per backend.
# cpu: pieces = clamp(ceil(64 / (N * channel blocks)), 1, P * pixel width / 2048) (see
#   reduce_spatial in csrc/cpu/kernels_impl.h): N=1, C=8, 72x72 gives 2 pieces in NCHW and
#   8 in channels-last (8 channels per pixel).
# triton: the tiny-tile profile of tests/test_triton_kernels.py (asserted to split below).
# cuda: N=1 with long rows: rows split across CTAs, partials combined by a second kernel.
SPLIT_SHAPES = {
    "cpu": Case(n=1, c=8, h=72, w=72, s=2),
    "torch": Case(n=1, c=8, h=72, w=72, s=2),
    "triton": Case(n=1, c=5, h=9, w=11, s=2),
    "cuda": Case(n=1, c=16, h=32, w=40, s=4),
}


def split_cases(shape: Case):
    for layout in ("nchw", "channels_last"):
        for pool, dtype, pattern in (("avg", torch.float32, None), ("max", torch.float64, "integers"),
                                     ("avgmax", torch.bfloat16, "repeated_max"),
                                     ("max", torch.bfloat16, "zero_planes")):
            yield shape.with_(layout=layout, pool=pool, dtype=dtype, residual=True,
                              out_activation="relu"), pattern


def split_inputs(case: Case, pattern: str | None, device) -> dict:
    return make_inputs(case, device) if pattern is None else tied_inputs(case, pattern, device)


def test_split_reductions(backend, monkeypatch):
    name, device = backend
    if name == "triton":
        from se_kernels.backends.triton import heuristics, ops
        tiny = heuristics.DeviceProfile(**TINY)
        monkeypatch.setattr(ops.driver(), "device_profile", lambda device: tiny)
    for case, pattern in split_cases(SPLIT_SHAPES[name]):
        if name == "triton":
            cfg = heuristics.pass_config(case.n, case.c, case.h * case.w,
                                         case.layout == "channels_last", case.dtype.itemsize, tiny)
            assert cfg.splits > 1, f"{case} does not split H*W"
        check_inputs(case, split_inputs(case, pattern, device), grad_output(case, device), name, device)


def test_split_reductions_emulated(emu):  # noqa: F811 - emu is the fixture
    for case, pattern in split_cases(SPLIT_SHAPES["cuda"]):
        check_emulated(emu, case, inputs=split_inputs(case, pattern, "cpu"), grad=grad_output(case, "cpu"))
