"""The "triton" backend: the ops se_kernels::se_forward_triton / se_backward_triton.

They are torch.library.triton_op ops: their bodies allocate with torch and launch Triton
kernels through torch.library.wrap_triton, so torch.compile traces the kernels themselves
(zero graph breaks, inductor schedules them) and the body doubles as the fake kernel. The
schemas, autograd and FLOP formulas are those of every backend (se_kernels._ops).

Importing this module does not import triton: the kernels (triton_kernels.py) load on the
first call, and the backend refuses calls with the reason when triton is missing.
"""

from __future__ import annotations

import contextlib
import importlib
import os

import torch
from torch import Tensor

from .. import _ops, dispatch
from ..options import SECall

FORWARD_NAME = "se_kernels::se_forward_triton"
BACKWARD_NAME = "se_kernels::se_backward_triton"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def kernels():
    """The kernel module, imported on first use."""
    from . import triton_kernels
    return triton_kernels


@dispatch.constant_under_compile
def kernels_interpreted() -> bool:
    """Whether the kernels were defined for Triton's interpreter (TRITON_INTERPRET=1 when
    they were first imported)."""
    return kernels().INTERPRETED


@dispatch.constant_under_compile
def cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@dispatch.constant_under_compile
def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


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
        return kernels().forward(x, w1, b1, w2, b2, residual, activation, gate, pool,
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
        return kernels().backward(grad_out, x, out, w1, w2, z, zmax, a, g, activation, gate,
                                  pool, out_activation, residual_grad,
                                  _ops.kernel_memory_format(x))


def _keep_opaque_under_interpreter(op) -> None:
    """Under TRITON_INTERPRET=1 the kernels run on real CPU tensors and cannot be traced, so
    torch.compile must keep the op as one opaque node (run eagerly at runtime) instead of
    decomposing it into traced kernel launches, which triton_op does for FunctionalTensorMode.
    Elsewhere triton_op's own rule stays in charge."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    rules = getattr(op, "_torch_dispatch_fns", None)
    decompose = None if rules is None else rules.get(FunctionalTensorMode)
    if decompose is None:  # a torch whose triton_op works differently: leave it alone
        return

    def functionalize(mode, func, types, args, kwargs):
        if kernels().INTERPRETED:
            return mode.__torch_dispatch__(func, types, args, kwargs)
        return decompose(mode, func, types, args, kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, functionalize)


_keep_opaque_under_interpreter(se_forward_triton)
_keep_opaque_under_interpreter(se_backward_triton)
# triton_op registered the bodies above as the fake kernels.
_ops.register_op_family(FORWARD_NAME, BACKWARD_NAME, fake=False)
se_forward = _ops._op_packet(FORWARD_NAME).default
se_backward = _ops._op_packet(BACKWARD_NAME).default


class TritonBackend(dispatch.Backend):
    name = "triton"

    def refusals(self, call: SECall) -> list[str]:
        error = triton_import_error()
        if error is not None:
            return [f"triton is not available ({error}); install it with `pip install triton`"]
        reasons = []
        device = call.x.device
        if device.type == "cpu":
            if not interpreter_requested():
                reasons.append("x is on cpu: Triton runs CPU tensors only through its "
                               "interpreter, enabled by TRITON_INTERPRET=1 (slow; for tests)")
            elif not kernels_interpreted():
                reasons.append("x is on cpu and TRITON_INTERPRET=1, but the Triton kernels were "
                               "compiled for the GPU: set TRITON_INTERPRET=1 before their "
                               "first use")
        elif device.type == "cuda":
            # (Interpreted kernels run cuda tensors too, through host copies.)
            if torch.version.hip is None and not kernels_interpreted():
                capability = cuda_capability(device.index)
                if capability < (7, 0):
                    reasons.append(f"Triton needs an NVIDIA GPU of compute capability 7.0 or "
                                   f"newer, this one is {capability[0]}.{capability[1]}")
                elif call.x.dtype == torch.bfloat16 and capability < (8, 0):
                    reasons.append(f"bfloat16 needs compute capability 8.0 or newer, this GPU "
                                   f"is {capability[0]}.{capability[1]}")
        else:
            reasons.append(f"x is on {device.type}; the Triton backend runs cuda tensors "
                           f"(and cpu tensors under TRITON_INTERPRET=1)")
        if call.x.dtype not in SUPPORTED_DTYPES:
            reasons.append(f"dtype {call.x.dtype} is not supported")
        return reasons

    def run(self, call: SECall) -> torch.Tensor:
        return se_forward(*call.op_args())[0]


dispatch.register(TritonBackend())
