"""The "triton" backend: the ops se_kernels::se_forward_triton / se_backward_triton.

They are torch.library.triton_op ops: their bodies allocate with torch and launch Triton
kernels through torch.library.wrap_triton, so torch.compile traces the kernels themselves
(zero graph breaks, inductor schedules them) and the body doubles as the fake kernel. The
schemas, autograd and FLOP formulas are those of every backend (se_kernels._ops).

Importing this module does not import triton: the drivers and kernels (driver.py,
kernels.py) load on the first call, and the backend refuses calls with the reason when
triton is missing.
"""

from __future__ import annotations

import contextlib
import importlib

import torch
from torch import Tensor

from ... import _ops, _stream_ops, dispatch
from ...call import SECall
from ...options import (AVG, AVGMAX, GELU, GELU_TANH, HARDSIGMOID, HARDSWISH, LEAKY_RELU,
                        MAX, NONE, OUT_RELU, RELU, SIGMOID, SILU, TANH)
from .interpreter import interpreter_requested, keep_opaque_under_interpreter, kernels_interpreted

FORWARD_NAME = "se_kernels::se_forward_triton"
BACKWARD_NAME = "se_kernels::se_backward_triton"


# The backend's checks run in Python on every call, also under torch.compile; answers that
# cannot change within a process are constants to Dynamo, which then traces no imports.
_IMPORT_ERROR: list[str | None] = []


@dispatch.constant_under_compile
def triton_import_error() -> str | None:
    """Why triton cannot be imported, or None when it can (tried once)."""
    if not _IMPORT_ERROR:
        try:
            importlib.import_module("triton")
            importlib.import_module("triton.language")
            _IMPORT_ERROR.append(None)
        except Exception as error:  # noqa: BLE001 - any failure means no Triton backend
            _IMPORT_ERROR.append(f"{type(error).__name__}: {error}")
    return _IMPORT_ERROR[0]


def driver():
    """The drivers (and with them the kernels), imported on first use."""
    from . import driver
    return driver


def launch_device(x: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device, not on its arguments' device: make x's
    device current for the launches (what CUDAGuard does for the CUDA backend). Without a
    CUDA runtime there is no current device to set: the kernels are interpreted, or the op
    is only traced (fake tensors), and a compiled graph guards its own launches."""
    if x.device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


# The annotations spell the same schema as _ops.FORWARD_SCHEMA / BACKWARD_SCHEMA: torch 2.11's
# triton_op ignores `schema=` and infers the schema from them.
@torch.library.triton_op(FORWARD_NAME, mutates_args=(), schema=_ops.FORWARD_SCHEMA)
def se_forward_triton(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
    residual: Tensor | None, activation: str, gate: str, pool: str, out_activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _ops.check_forward_args(x, w1, b1, w2, b2, residual, activation, gate, pool, out_activation)
    with launch_device(x):
        return driver().forward(x, w1, b1, w2, b2, residual, activation, gate, pool,
                                out_activation, _ops.kernel_memory_format(x))


@torch.library.triton_op(BACKWARD_NAME, mutates_args=(), schema=_ops.BACKWARD_SCHEMA)
def se_backward_triton(
    grad_out: Tensor, x: Tensor, out: Tensor | None, w1: Tensor, w2: Tensor, z: Tensor,
    zmax: Tensor, a: Tensor, g: Tensor, activation: str, gate: str, pool: str,
    out_activation: str, residual_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _ops.check_backward_args(grad_out, x, out, w1, w2, z, zmax, a, g, activation, gate, pool,
                             out_activation)
    with launch_device(x):
        return driver().backward(grad_out, x, out, w1, w2, z, zmax, a, g, activation, gate,
                                 pool, out_activation, residual_grad,
                                 _ops.kernel_memory_format(x))


keep_opaque_under_interpreter(se_forward_triton)
keep_opaque_under_interpreter(se_backward_triton)
# triton_op registered the bodies above as the fake kernels.
_ops.register_op_family(FORWARD_NAME, BACKWARD_NAME, fake=False)
se_forward = _ops._op_packet(FORWARD_NAME).default
se_backward = _ops._op_packet(BACKWARD_NAME).default


class TritonBackend(dispatch.Backend):
    name = "triton"
    # What the kernels' constexpr switches (kernels.py) compute.
    SUPPORTED_OPTIONS = {"activation": (RELU, SILU, GELU, GELU_TANH, HARDSWISH, LEAKY_RELU),
                         "gate": (SIGMOID, HARDSIGMOID, TANH, RELU),
                         "pool": (AVG, MAX, AVGMAX), "out_activation": (NONE, OUT_RELU)}
    PLANS_SCHEDULE = True
    SUPPORTED_DEVICES = ("cuda", "cpu")
    CUDA_MINIMUM_COMPUTE_CAPABILITY = (7, 0)
    CUDA_DTYPE_MINIMUM_CAPABILITY = {torch.bfloat16: (8, 0)}

    def devices_text(self) -> str:
        return "cuda tensors (and cpu tensors under TRITON_INTERPRET=1)"

    def unavailable(self) -> list[str]:
        error = triton_import_error()
        if error is not None:
            return [f"triton is not available ({error}); install it with `pip install triton`"]
        return []

    def checks_cuda_capability(self, call: SECall) -> bool:
        # Interpreted kernels run cuda tensors too, through host copies; AMD GPUs have
        # no NVIDIA compute capability.
        return torch.version.hip is None and not kernels_interpreted()

    def call_refusals(self, call: SECall) -> list[str]:
        if call.x.device.type != "cpu":
            return []
        if not interpreter_requested():
            return ["x is on cpu: Triton runs CPU tensors only through its interpreter, "
                    "enabled by TRITON_INTERPRET=1 (slow; for tests)"]
        if not kernels_interpreted():
            return ["x is on cpu and TRITON_INTERPRET=1, but the Triton kernels were compiled "
                    "for the GPU: set TRITON_INTERPRET=1 before their first use"]
        return []

    def run(self, call: SECall) -> torch.Tensor:
        return se_forward(*call.op_args())[0]

    def stream_ops(self, device_type: str) -> dict | None:
        from . import stream
        return _stream_ops.as_called_now(stream.OPS)

    def schedule_trace(self, call, gpu, backward: bool) -> list:
        """The drivers' own launches for `call`, recorded on fake tensors (trace.py)."""
        from ...schedule import PlanUnavailable

        try:
            from . import trace
        except ImportError as error:
            raise PlanUnavailable(f"the triton plan needs triton: {error}") from None
        return trace.schedule_trace(call, trace.device_profile_for(gpu), backward)


dispatch.register(TritonBackend())
