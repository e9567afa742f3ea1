"""Every backend that can run here vs the fp64 reference: output and all gradients, every
option, every dtype and layout, odd shapes."""

import pytest
import torch

from helpers import LAYOUTS, OPTION_CASES, SHAPE_CASES, Case, assert_all_differ, check_against_reference
from helpers import backend  # noqa: F401 - a fixture

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("case", OPTION_CASES, ids=str)
def test_every_option(backend, case):
    name, device = backend
    check_against_reference(case.with_(dtype=torch.float64), device, name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [
    Case(n=2, c=24, h=7, w=7, s=6, residual=True, out_activation="relu"),
    Case(n=3, c=40, h=5, w=9, s=5, activation="silu", gate="hardsigmoid", pool="avgmax"),
], ids=str)
def test_dtypes_and_layouts(backend, case, dtype, layout):
    name, device = backend
    check_against_reference(case.with_(dtype=dtype, layout=layout), device, name)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", SHAPE_CASES, ids=str)
def test_odd_shapes(backend, case, layout):
    name, device = backend
    check_against_reference(case.with_(layout=layout), device, name)


def test_fresh_inputs_each_seed(backend):
    """Different seeds, different answers, each matching the oracle: the comparison is not
    against a constant."""
    name, device = backend
    assert_all_differ([check_against_reference(Case(n=2, c=12, h=3, w=4, s=3, residual=True),
                                               device, name, seed) for seed in (3, 4, 5)])
