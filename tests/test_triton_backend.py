"""The Triton backend's refusals (no triton, no interpreter, other devices), and its lazy
import: importing se_kernels imports none of the Triton kernels."""

from __future__ import annotations

import pytest
import torch

import se_kernels
from se_kernels.backends.triton import ops as triton_ops
from se_kernels.call import make_call

from triton_support import DEVICE, run_python_with


def _plain_call(device="cpu", dtype=torch.float32):
    x = torch.randn(1, 4, 2, 2, device=device, dtype=dtype)
    w1 = torch.randn(2, 4, device=device, dtype=dtype)
    w2 = torch.randn(4, 2, device=device, dtype=dtype)
    return make_call(x, w1, None, w2, None)


def test_refuses_without_triton(monkeypatch):
    monkeypatch.setattr(triton_ops, "triton_import_error",
                        lambda: "ModuleNotFoundError: No module named 'triton'")
    reasons = triton_ops.TritonBackend().refusals(_plain_call())
    assert len(reasons) == 1 and "triton" in reasons[0] and "install" in reasons[0]
    with pytest.raises(se_kernels.BackendUnavailableError, match="pip install triton"):
        se_kernels.select(_plain_call(), "triton")


def test_refuses_cpu_without_interpreter(monkeypatch):
    if triton_ops.triton_import_error():
        pytest.skip(f"triton is not importable: {triton_ops.triton_import_error()}")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = triton_ops.TritonBackend().refusals(_plain_call())
    assert any("TRITON_INTERPRET=1" in r for r in reasons), reasons


def test_refuses_other_devices():
    if triton_ops.triton_import_error():
        pytest.skip(f"triton is not importable: {triton_ops.triton_import_error()}")
    reasons = triton_ops.TritonBackend().refusals(_plain_call("meta"))
    assert any("meta" in r and "cuda" in r for r in reasons), reasons


def test_accepts_the_interpreter(driver):
    if DEVICE != "cpu":
        pytest.skip("the interpreter path is for machines without a GPU")
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert triton_ops.TritonBackend().refusals(_plain_call("cpu", dtype)) == []


def test_auto_never_picks_the_interpreter(driver):
    """CPU calls with backend="auto" go to the C++ or torch backends, never the slow
    interpreter."""
    assert "triton" not in se_kernels.dispatch.preference(_plain_call())


def test_import_is_lazy_and_survives_missing_triton():
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # as if triton were not installed\n"
        "import torch, se_kernels\n"
        "from se_kernels.call import make_call\n"
        "x = torch.randn(1, 4, 2, 2)\n"
        "call = make_call(x, torch.randn(2, 4), None, torch.randn(4, 2), None)\n"
        "print(se_kernels.explain(call)['triton'])\n"
        "print('se_kernels.backends.triton.kernels' in sys.modules)\n"
        "y = se_kernels.squeeze_excitation(x, torch.randn(2, 4), None, torch.randn(4, 2), None)\n"
        "print(tuple(y.shape))\n"
    )
    lines = run_python_with(code, {"TRITON_INTERPRET": "1"}).strip().splitlines()
    assert "triton" in lines[-3] and "install" in lines[-3]
    assert lines[-2] == "False"  # the kernels were never imported
    assert lines[-1] == "(1, 4, 2, 2)"  # and the other backends still run
