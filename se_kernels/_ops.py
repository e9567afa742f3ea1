"""The se_kernels custom ops: schemas, fake kernels, autograd and FLOP formulas.

Two op families share one schema per direction:
  se_kernels::se_forward / se_backward                - CPU and CUDA kernels from se_kernels._C
  se_kernels::se_forward_triton / se_backward_triton  - Triton kernels (se_kernels.backends.triton)

The schemas are defined here rather than in C++ so that the ops, their fake kernels and
their autograd exist whether or not the compiled extension was built; the extension only
adds device kernels with TORCH_LIBRARY_IMPL.

se_forward returns (out, z, zmax, a, g); the last four are the O(N*C) vectors the backward
needs, in fp32 (fp64 for fp64 inputs):
  z    [N, C]  the pooled vector fed to the MLP
  zmax [N, C]  the per-channel max of x for pool "max"/"avgmax" (where dz goes); else [0]
  a    [N, S]  pre-activation hidden units
  g    [N, C]  pre-gate logits (s = gate(g) is recomputed: it costs less than saving it)
se_backward returns (dx, dw1, db1, dw2, db2, dresidual); dresidual is grad_out masked by
the output ReLU when out_activation == "relu" and residual_grad, else [0] (with no output
ReLU the residual's gradient is grad_out itself, which an op may not return).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from . import _compat
from .options import (ACTIVATIONS, AVG, AVGMAX, GATES, NAMES, OUT_ACTIVATIONS, OUT_RELU, POOLS,
                         check_choice)

FORWARD_SCHEMA = (
    "(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor? residual, "
    "str activation, str gate, str pool, str out_activation) "
    "-> (Tensor out, Tensor z, Tensor zmax, Tensor a, Tensor g)"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor x, Tensor? out, Tensor w1, Tensor w2, Tensor z, Tensor zmax, "
    "Tensor a, Tensor g, str activation, str gate, str pool, str out_activation, "
    "bool residual_grad) "
    "-> (Tensor dx, Tensor dw1, Tensor db1, Tensor dw2, Tensor db2, Tensor dresidual)"
)

_lib = torch.library.Library("se_kernels", "FRAGMENT")  # noqa: TOR901 - kept alive for the module's life
_lib.define("se_forward" + FORWARD_SCHEMA)
_lib.define("se_backward" + BACKWARD_SCHEMA)


# The dtypes every op takes (csrc/se_common.cpp checks the same for the C++ ops).
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Pooled statistics and the MLP run in fp32 (fp64 for fp64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_like(name: str, t: torch.Tensor, shape, like: torch.Tensor,
                dtype: torch.dtype | None = None) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    dtype = like.dtype if dtype is None else dtype
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if t.device != like.device:
        raise TypeError(f"{name} must be on device {like.device} like x, got {t.device}")


def check_forward_args(x, w1, b1, w2, b2, residual, activation, gate, pool, out_activation) -> None:
    """The se_forward contract, checked before any kernel runs (the C++ ops check the same
    in csrc/se_common.cpp for callers that reach them directly)."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, C, H, W], got {x.dim()}-D with shape {list(x.shape)}")
    dtype = x.dtype
    if dtype not in DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    n, c, h, w = x.shape
    if c < 1 or h < 1 or w < 1:
        raise ValueError(f"x must have C, H and W >= 1, got shape {list(x.shape)}")
    if w1.dim() != 2 or w1.shape[0] < 1:
        raise ValueError(f"w1 must be 2-D [squeeze_channels >= 1, C], got shape {list(w1.shape)}")
    s = w1.shape[0]
    device = x.device
    # One test for the common valid call (a batch-1 call is a few microseconds long); the
    # checks one by one name what is wrong.
    if not (w1.shape == (s, c) and w2.shape == (c, s) and w1.dtype == dtype
            and w2.dtype == dtype and w1.device == device and w2.device == device
            and (b1 is None or (b1.shape == (s,) and b1.dtype == dtype and b1.device == device))
            and (b2 is None or (b2.shape == (c,) and b2.dtype == dtype and b2.device == device))
            and (residual is None or (residual.shape == x.shape and residual.dtype == dtype
                                      and residual.device == device))):
        for name, t, shape in (("w1", w1, (s, c)), ("w2", w2, (c, s)), ("b1", b1, (s,)),
                               ("b2", b2, (c,)), ("residual", residual, x.shape)):
            if t is not None:
                _check_like(name, t, shape, x)
    if not (activation in ACTIVATIONS and gate in GATES and pool in POOLS
            and out_activation in OUT_ACTIVATIONS):
        for argument, value in zip(NAMES, (activation, gate, pool, out_activation)):
            check_choice(argument, value)


def check_backward_args(grad_out, x, out, w1, w2, z, zmax, a, g, activation, gate, pool,
                        out_activation) -> None:
    """The se_backward contract: se_forward's tensors and the vectors it saved."""
    check_forward_args(x, w1, None, w2, None, None, activation, gate, pool, out_activation)
    _check_like("grad_out", grad_out, x.shape, x)
    if out_activation == OUT_RELU:
        if out is None:
            raise ValueError(f"out is required when out_activation is {OUT_RELU!r}")
        _check_like("out", out, x.shape, x)
    n, c, s = x.shape[0], x.shape[1], w1.shape[0]
    acc = accumulate_dtype(x.dtype)
    for name, t, shape in (("z", z, (n, c)), ("a", a, (n, s)), ("g", g, (n, c)),
                           ("zmax", zmax if pool != AVG else None, (n, c))):
        if t is not None:
            _check_like(name, t, shape, x, acc)


def kernel_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout every kernel reads x in and writes its outputs in (see csrc/se_common.h):
    channels_last when x is dense channels-last and not also dense NCHW, else NCHW."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _forward_fake(x, w1, b1, w2, b2, residual, activation, gate, pool, out_activation):
    check_forward_args(x, w1, b1, w2, b2, residual, activation, gate, pool, out_activation)
    n, c = x.shape[0], x.shape[1]
    acc = accumulate_dtype(x.dtype)
    stat = dict(dtype=acc, device=x.device)
    out = torch.empty_like(x, memory_format=kernel_memory_format(x))
    zmax = x.new_empty((n, c), **stat) if pool != AVG else x.new_empty((0,), **stat)
    return (out, x.new_empty((n, c), **stat), zmax, x.new_empty((n, w1.shape[0]), **stat),
            x.new_empty((n, c), **stat))


def _backward_fake(grad_out, x, out, w1, w2, z, zmax, a, g, activation, gate, pool,
                   out_activation, residual_grad):
    check_backward_args(grad_out, x, out, w1, w2, z, zmax, a, g, activation, gate, pool,
                        out_activation)
    fmt = kernel_memory_format(x)
    dx = torch.empty_like(x, memory_format=fmt)
    if out_activation == OUT_RELU and residual_grad:
        dresidual = torch.empty_like(x, memory_format=fmt)
    else:
        dresidual = x.new_empty((0,))
    return (dx, torch.empty_like(w1), w1.new_empty((w1.shape[0],)), torch.empty_like(w2),
            w2.new_empty((w2.shape[0],)), dresidual)


def _forward_flops(x_shape, w1_shape, b1_shape, w2_shape, b2_shape, residual_shape,
                   activation, gate, pool, out_activation, *args, out_shape=None, **kwargs) -> int:
    """Pooling adds (and max compares), 2 FLOPs per MAC in the two FCs, the scale multiply,
    and the residual add. Activations and gates are not counted, as for convolutions."""
    n, c, h, w = x_shape
    elems = n * c * h * w
    pooling = elems * (2 if pool == AVGMAX else 1)
    fcs = 2 * 2 * n * c * w1_shape[0]
    return pooling + fcs + elems + (elems if residual_shape is not None else 0)


def _backward_flops(grad_out_shape, x_shape, saved_out_shape, w1_shape, *args, out_shape=None,
                    **kwargs) -> int:
    """sum_p dy * x (2 per element), both FCs' input and weight gradients, and
    dx = dy * s + dz / P (2 per element)."""
    n, c, h, w = x_shape
    return 2 * n * c * h * w + 2 * 2 * 2 * n * c * w1_shape[0] + 2 * n * c * h * w


def runs_cpu_kernels_as_ops(device: torch.device) -> bool:
    """Whether the vector ops between the passes (_tail_ops, _fc_ops) run as ops on
    `device` now: in eager on CPU, where the extension's kernels do each in one call. A
    trace, torch.compile or export takes their PyTorch versions instead, to see through
    and differentiate; other devices run those versions as the kernels the ops would."""
    return device.type == "cpu" and not (torch.compiler.is_compiling() or torch.jit.is_tracing()
                                         or torch.compiler.is_exporting())


def _op_packet(qualname: str) -> torch._ops.OpOverloadPacket:
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name)


def register_op_family(forward_name: str, backward_name: str, *, fake: bool = True) -> None:
    """Give a (forward, backward) op pair of the two schemas above its fake kernels (unless
    the ops bring their own, as triton_op does), autograd and FLOP formulas."""
    forward, backward = _op_packet(forward_name), _op_packet(backward_name)
    if fake:
        torch.library.register_fake(forward_name, _forward_fake)
        torch.library.register_fake(backward_name, _backward_fake)
    register_flop_formula(forward)(_forward_flops)
    register_flop_formula(backward)(_backward_flops)

    def setup_context(ctx, inputs, output):
        x, w1, b1, w2, b2, residual, activation, gate, pool, out_activation = inputs
        out, z, zmax, a, g = output
        ctx.mark_non_differentiable(z, zmax, a, g)
        ctx.save_for_backward(x, out if out_activation == OUT_RELU else None, w1, w2, z, zmax, a, g)
        ctx.options = (activation, gate, pool, out_activation)
        ctx.has_bias = (b1 is not None, b2 is not None)
        ctx.has_residual = residual is not None

    def backward_fn(ctx, grad_out, *stat_grads):
        x, out, w1, w2, z, zmax, a, g = ctx.saved_tensors
        activation, gate, pool, out_activation = ctx.options
        residual_grad = ctx.has_residual and ctx.needs_input_grad[5]
        dx, dw1, db1, dw2, db2, dresidual = backward.default(
            grad_out, x, out, w1, w2, z, zmax, a, g, activation, gate, pool, out_activation,
            residual_grad)
        if residual_grad and out_activation != OUT_RELU:
            dresidual = grad_out
        return (dx, dw1, db1 if ctx.has_bias[0] else None, dw2, db2 if ctx.has_bias[1] else None,
                dresidual if residual_grad else None, None, None, None, None)

    torch.library.register_autograd(forward_name, backward_fn, setup_context=setup_context)


def run_forward(forward: torch._ops.OpOverload, call) -> torch.Tensor:
    """The output of a forward op of this module's schema on an SECall.

    When autograd will not record the call (no grad mode, or no tensor requiring grad), the
    op runs below its autograd kernel, as that kernel itself would run it: the Python
    autograd wrapper of register_autograd costs about 3 us a call, as much as the whole
    kernel at batch 1. Everything else the dispatcher does (autocast, FakeTensor and other
    dispatch modes, vmap) still happens. Under torch.compile the op is called plainly, so
    the graph holds the one op and its autograd."""
    args = call.op_args()
    if call.wants_gradient() or torch.compiler.is_compiling():
        return forward(*args)[0]
    with _compat.below_autograd():
        return forward(*args)[0]


register_op_family("se_kernels::se_forward", "se_kernels::se_backward")
se_forward = _op_packet("se_kernels::se_forward").default
se_backward = _op_packet("se_kernels::se_backward").default
