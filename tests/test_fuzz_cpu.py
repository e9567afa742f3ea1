"""The CPU kernels (backend="cpu", the C++ extension) on random cases against the float64
oracle: shapes, dtypes, options, layouts, views and storage offsets drawn by
tests/fuzz_cases.py (its docstring: the seed, the number of cases, rerunning one)."""

import pytest

from fuzz_cases import cases, fuzz_inputs
from helpers import check_inputs, require_backend

CASES = cases("cpu", default_count=500, max_elements=40_000)


@pytest.fixture(scope="module", autouse=True)
def cpu_backend():
    require_backend("cpu", "cpu")


@pytest.mark.parametrize("fc", CASES, ids=str)
def test_cpu_kernels_match_the_oracle(fc):
    print(fc.describe(__file__))
    inputs, grad = fuzz_inputs(fc)
    check_inputs(fc.case, inputs, grad, "cpu", "cpu")
