"""Property tests: random shapes, layouts and options, the cpu backend vs the fp64 reference."""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is a test extra: pip install .[test]")
from hypothesis import given, settings, strategies as st  # noqa: E402

from helpers import CASE_OUT_ACTIVATIONS, LAYOUTS, Case, check_against_reference  # noqa: E402
from se_kernels.options import ACTIVATIONS, GATES, POOLS  # noqa: E402

cases = st.builds(
    Case,
    n=st.integers(0, 4),
    c=st.integers(1, 70),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    s=st.integers(1, 9),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    layout=st.sampled_from(LAYOUTS),
    activation=st.sampled_from(ACTIVATIONS),
    gate=st.sampled_from(GATES),
    pool=st.sampled_from(POOLS),
    residual=st.booleans(),
    out_activation=st.sampled_from(CASE_OUT_ACTIVATIONS),
    bias=st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(case=cases, seed=st.integers(0, 2**16))
def test_cpu_backend_matches_reference(case, seed):
    check_against_reference(case, "cpu", "cpu", seed)


@settings(max_examples=40, deadline=None)
@given(case=cases, seed=st.integers(0, 2**16))
def test_bf16_error_scales_like_eager(case, seed):
    check_against_reference(case.with_(dtype=torch.bfloat16), "cpu", "cpu", seed)
