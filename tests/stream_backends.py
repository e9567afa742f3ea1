"""The backends the staged path and the block tail are tested on (DESIGN.md §1.4-1.5): each
registered se_kernels backend with stream kernels here, the stream ops' PyTorch reference
(the autograd functions on kernels that are right by definition), and the CUDA kernels on
the emulator (tools/cuda_emulator)."""

from __future__ import annotations

import functools

import pytest

from helpers import backend_device, require_backend
from se_kernels import _stream_ops, dispatch
from se_kernels.backends.torch_backend import TorchBackend


class StreamOpsBackend(TorchBackend):
    """A backend made of four stream ops on CPU tensors; everything else as the torch
    backend declares it."""

    def __init__(self, name: str, ops: dict):
        self.name = name
        self.ops = ops

    def staged_refusals(self, call):
        return []

    def run_staged(self, call):
        return call.stream_forward(self)

    def stream_ops(self, device_type):
        return self.ops


def _register(name: str, ops: dict) -> str:
    if name not in dispatch.backend_names():
        dispatch.register(StreamOpsBackend(name, ops))
    return name


def reference_backend() -> str:
    return _register("stream-reference", {name: functools.partial(_stream_ops.reference, name)
                                          for name in (*_stream_ops.SCHEMAS,
                                                       *_stream_ops.ACT_SCHEMAS)})


def emulator_backend() -> str:
    from cuda_emulator.build import load_or_skip, load_se_kernels
    emu = load_or_skip(load_se_kernels)
    return _register("cuda-emulator", {name: getattr(emu, name).default
                                       for name in (*_stream_ops.SCHEMAS,
                                                    *_stream_ops.ACT_SCHEMAS)})


STAGED_BACKENDS = ["stream-reference", "cpu", "triton", "cuda-emulator"]


@pytest.fixture(params=STAGED_BACKENDS)
def staged_backend(request) -> tuple[str, str]:
    """(backend name, device) for each way the staged path runs here."""
    name = request.param
    if name == "stream-reference":
        return reference_backend(), "cpu"
    if name == "cuda-emulator":
        return emulator_backend(), "cpu"
    device = backend_device(name)
    require_backend(name, device)
    return name, device
