"""Backends' declared support (devices, dtypes, option values, CUDA capabilities), checked for every
backend in one place: se_kernels.dispatch.not_supported_reasons."""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from se_kernels import dispatch
from se_kernels.call import make_call


def test_declared_support_is_checked_in_one_place(monkeypatch):
    """A backend's declarations alone make dispatch refuse: a device it does not run, a
    dtype it does not take, an option value it does not compute, a GPU below its least
    capability."""
    class Declared(dispatch.Backend):
        name = "declared"
        SUPPORTED_DEVICES = ("cuda",)
        SUPPORTED_DTYPES = (torch.float32,)
        CUDA_MINIMUM_COMPUTE_CAPABILITY = (8, 0)
        CUDA_DTYPE_MINIMUM_CAPABILITY = {torch.float32: (9, 0)}
        SUPPORTED_OPTIONS = {"activation": ("relu",), "gate": ("sigmoid",), "pool": ("avg",),
                             "out_activation": ("none",)}

        def run(self, call):
            raise AssertionError("not run")

    backend = Declared()
    x = torch.randn(1, 4, 2, 2, dtype=torch.float64)
    call = make_call(x, torch.randn(2, 4, dtype=x.dtype), None, torch.randn(4, 2, dtype=x.dtype),
                     None)
    assert backend.refusals(call) == ["x is on cpu; this backend runs cuda tensors"]
    monkeypatch.setattr(Declared, "SUPPORTED_DEVICES", ("cpu",))
    assert backend.refusals(call) == ["dtype torch.float64 is not supported"]
    gated = make_call(x, call.w1, None, call.w2, None, gate="hardsigmoid", pool="max")
    assert backend.refusals(gated) == [
        "dtype torch.float64 is not supported",
        "gate 'hardsigmoid' is not implemented here (this backend has 'sigmoid')",
        "pool 'max' is not implemented here (this backend has 'avg')"]
    monkeypatch.setattr(Declared, "SUPPORTED_DEVICES", ("cuda",))
    with FakeTensorMode():  # CUDA tensors without a GPU
        x = torch.empty(1, 4, 2, 2, device="cuda")
        call = make_call(x, torch.empty(2, 4, device="cuda"), None,
                         torch.empty(4, 2, device="cuda"), None)
    monkeypatch.setattr(dispatch, "cuda_capability", lambda index: (7, 5))
    assert backend.refusals(call) == [
        "declared needs an NVIDIA GPU of compute capability 8.0 or newer, this GPU is 7.5"]
    monkeypatch.setattr(dispatch, "cuda_capability", lambda index: (8, 6))
    assert backend.refusals(call) == ["float32 needs compute capability 9.0 or newer, this GPU is 8.6"]
    monkeypatch.setattr(Declared, "unavailable", lambda self: ["its package is missing"])
    assert backend.refusals(call) == ["its package is missing"]
