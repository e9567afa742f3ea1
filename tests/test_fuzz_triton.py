"""The Triton kernels on random cases against the float64 oracle (on the GPU where there
is one, under Triton's interpreter otherwise): shapes, dtypes, options, layouts, views,
storage offsets and small-tile device profiles drawn by tests/fuzz_cases.py (its
docstring: the seed, the number of cases, rerunning one)."""

import pytest

from se_kernels.backends.triton import heuristics

from fuzz_cases import fuzz_inputs, triton_cases
from helpers import check_inputs
from triton_support import DEVICE

CASES = triton_cases(default_count=50, max_elements=20_000, small_max_elements=3_000,
                     small_max_weights=1_024)


@pytest.mark.parametrize("fc", CASES, ids=str)
def test_triton_kernels_match_the_oracle(driver, monkeypatch, fc):
    print(fc.describe(__file__))
    if fc.profile:  # part of every plan's key: no cached plan of another profile applies
        profile = heuristics.DeviceProfile(**dict(fc.profile))
        monkeypatch.setattr(driver, "device_profile", lambda device: profile)
    inputs, grad = fuzz_inputs(fc, DEVICE)
    check_inputs(fc.case, inputs, grad, "triton", DEVICE)
