"""The staged path: SE with any excitation form (DESIGN.md §1.4).

The x-sized passes are the stream ops of se_kernels._stream_ops, run by the backend that
dispatch picks for the call; the excitation between them (se_kernels.excitation) is
PyTorch code on [N, C] vectors, whose backward is written out, so that each direction
is two passes over x-sized tensors: the backward's reduce gives ds, the form's backward
dz, and one map pass then writes dx whole (autograd differentiating the pieces would
write dx twice and add the halves). The torch backend computes the same function as one
PyTorch composition that autograd differentiates. A form whose g is a linear map of z runs
one op each way instead where the backend has the linear-form ops (se_kernels._form_ops).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _fc_ops as fc_ops
from . import dispatch
from ._ops import accumulate_dtype
from ._stream_ops import check_residual, check_x
from .backends.torch_backend import (GATE_GRADIENTS, GATE_VALUES, GATES, POOL_WEIGHTS, POOLS,
                                      scale_epilogue)
from .options import AVG, NONE, OUT_RELU, check_choice, normalize_out_activation


def to_dtype(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """t in dtype (None stays None), without a call where it already is."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def records_gradient(tensors) -> bool:
    """Whether autograd will record a call on `tensors`: grad mode is on and one of them
    requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def forward_alone(call) -> bool:
    """Whether `call` runs its forward computation directly, outside its autograd.Function:
    autograd will not record it (the Function costs more than a batch-1 call's kernels), and
    torch.compile is not tracing it (the graph keeps the Function and its backward)."""
    return not (call.wants_gradient() or torch.compiler.is_compiling())


class StagedCall(NamedTuple):
    """One validated staged call: x, the residual, the excitation form and its parameters
    (in the module's own shapes and dtype), and the gate, pool and output activation."""

    x: torch.Tensor
    residual: torch.Tensor | None
    form: object
    params: tuple
    gate: str
    pool: str
    out_activation: str

    # The option arguments the kernels take (dispatch checks a backend's declaration of
    # them): the stream ops see only the output activation; pool, form and gate run in
    # PyTorch.
    KERNEL_OPTIONS = ("out_activation",)

    def tensors(self) -> tuple:
        return (self.x, self.residual, *self.params)

    def wants_gradient(self) -> bool:
        """Whether autograd will record this call."""
        return records_gradient(self.tensors())

    def stream_forward(self, backend: dispatch.Backend):
        """(out, stats) on `backend`'s stream ops."""
        return run_stream_ops(backend, self)

    def composition(self):
        """(out, stats) in PyTorch operations that autograd differentiates."""
        return torch_composition(self)


def make_call(x, form, params, *, gate, pool=AVG, residual=None, out_activation=None) -> StagedCall:
    check_x(x)
    check_choice("gate", gate)
    check_choice("pool", pool)
    out_activation = normalize_out_activation(out_activation)
    check_residual(x, residual)
    check_form_params(x, form, params)
    return StagedCall(x, residual, form, tuple(params), gate, pool, out_activation)


def check_form_params(x: torch.Tensor, form, params) -> None:
    """The excitation form's parameters: the shapes the form takes, on x's device."""
    form.check(x.shape[1], params)
    for i, p in enumerate(params):
        if p is not None and p.device != x.device:
            raise TypeError(f"{type(form).__name__} parameter {i} is on {p.device}, x on {x.device}")


def _pooled(sums, xmax, pool: str, p: int):
    """z from the reduce pass's sums (a fresh tensor, scaled in place) and maxima."""
    w_avg, w_max = POOL_WEIGHTS[pool]
    if not w_max:
        return sums.div_(p)
    if not w_avg:
        return xmax
    return w_avg * (sums / p) + w_max * xmax


def forward_passes(ops, form, gate: str, pool: str, out_activation: str, x, residual, params):
    """out, the batch statistics (or None) and what backward_passes needs, with `ops` as the
    stream ops."""
    acc = accumulate_dtype(x.dtype)
    cast = tuple(t if t is None or t.dtype == acc else t.to(acc) for t in params)
    sums, _, xmax, _ = ops["stream_reduce"](x, False, pool != AVG, False)
    z = _pooled(sums, xmax, pool, x.shape[2] * x.shape[3])
    g, saved, stats = form.forward(z, cast, fc_ops.for_device(x.device))
    out = ops["stream_map"](x, GATE_VALUES[gate](g), None, residual, out_activation)
    return out, stats, (z, xmax if pool != AVG else None, g, cast, saved)


def backward_passes(ops, form, gate: str, pool: str, out_activation: str, residual_grad: bool,
                    grad_out, x, out, z, xmax, g, cast, saved):
    """(dx, dresidual, grads) with `ops` as the stream ops: dresidual is grad_out itself
    unless the reduce pass wrote the masked dy; grads are the form's parameters', in the
    accumulation dtype. `out` is the forward's output under an output ReLU, else None."""
    _, sdyx, count, dresidual = ops["stream_grad_reduce"](
        grad_out, out, x, xmax, out_activation, False, residual_grad)
    s = GATE_VALUES[gate](g)
    dz, grads = form.backward(GATE_GRADIENTS[gate](g, s, sdyx), z, cast, saved,
                              fc_ops.for_device(x.device))
    w_avg, w_max = POOL_WEIGHTS[pool]
    shift = dz * (w_avg / (x.shape[2] * x.shape[3])) if w_avg else None
    # count is 0 only where the max is NaN: no x equals it, and nothing is added.
    peak_shift = torch.where(count > 0, dz * w_max / count, 0.0) if w_max else None
    if dresidual.numel():  # the masked dy, written by the reduce pass: read it, not out
        dx = ops["stream_grad_map"](dresidual, None, x, s, None, shift, xmax, peak_shift, NONE)
    else:
        dresidual = grad_out
        dx = ops["stream_grad_map"](grad_out, out, x, s, None, shift, xmax, peak_shift,
                                    out_activation)
    return dx, dresidual, grads


def _stream_ops(backend: str, x: torch.Tensor) -> dict:
    return dispatch.get_backend(backend).stream_ops(x.device.type)


class _StagedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend, form, gate, pool, out_activation, x, residual, *params):
        out, stats, (z, xmax, g, cast, saved) = forward_passes(
            _stream_ops(backend, x), form, gate, pool, out_activation, x, residual, params)
        mean, var = stats if stats is not None else (g.new_empty((0,)), g.new_empty((0,)))
        ctx.mark_non_differentiable(mean, var)
        ctx.save_for_backward(x, out if out_activation == OUT_RELU else None, z, xmax, g, *cast,
                              *saved)
        ctx.static = (backend, form, gate, pool, out_activation, len(cast), residual is not None,
                      tuple(None if t is None else t.dtype for t in params))
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out, _dmean, _dvar):
        backend, form, gate, pool, out_activation, n_params, has_residual, dtypes = ctx.static
        x, out, z, xmax, g, *rest = ctx.saved_tensors
        cast, saved = tuple(rest[:n_params]), tuple(rest[n_params:])
        residual_grad = has_residual and ctx.needs_input_grad[6]
        dx, dresidual, grads = backward_passes(_stream_ops(backend, x), form, gate, pool,
                                               out_activation, residual_grad, grad_out, x, out,
                                               z, xmax, g, cast, saved)
        grads = tuple(to_dtype(d, dtype) for d, dtype in zip(grads, dtypes))
        return (None, None, None, None, None, dx, dresidual if residual_grad else None, *grads)


def torch_composition(call: StagedCall):
    """(out, stats) of `call` in PyTorch operations that autograd differentiates: the
    torch backend's staged path, and what ONNX export emits."""
    acc = accumulate_dtype(call.x.dtype)
    x = call.x.to(acc)
    z = POOLS[call.pool](x)
    g, _, stats = call.form.forward(z, tuple(None if t is None else t.to(acc) for t in call.params))
    return scale_epilogue(x, GATES[call.gate](g), call.residual, call.out_activation,
                          call.x.dtype), stats


def _linear_form(backend: dispatch.Backend, call: StagedCall):
    """(ops, form, weight, bias) where the form is a linear map of z and the backend has
    the linear-form ops (se_kernels._form_ops) for x's device; else None."""
    ops = backend.linear_form_ops(call.x.device.type)
    if ops is None:
        return None
    acc = accumulate_dtype(call.x.dtype)
    linear = call.form.linear_form(tuple(t if t is None or t.dtype == acc else t.to(acc)
                                         for t in call.params))
    return None if linear is None else (ops, *linear)


def run_stream_ops(backend: dispatch.Backend, call: StagedCall):
    """(out, stats) of `call` on `backend`'s stream ops: through the autograd.Function, or
    its forward alone (forward_alone); a linear form's as one op each way where the
    backend has the linear-form ops."""
    linear = _linear_form(backend, call)
    if linear is not None:
        ops, form, weight, bias = linear
        args = (call.x, form, weight, bias, call.gate, call.pool, call.residual,
                call.out_activation)
        if forward_alone(call):
            return ops["forward"](*args), None
        return ops["saved"](*args)[0], None
    if forward_alone(call):
        out, stats, _ = forward_passes(backend.stream_ops(call.x.device.type), call.form,
                                       call.gate, call.pool, call.out_activation, call.x,
                                       call.residual, call.params)
        return out, stats
    out, mean, var = _StagedFunction.apply(backend.name, call.form, call.gate, call.pool,
                                           call.out_activation, call.x, call.residual,
                                           *call.params)
    return out, ((mean, var) if mean.numel() else None)


def staged_squeeze_excitation(x, form, params, *, gate, pool=AVG, residual=None,
                              out_activation=None, backend="auto"):
    """(out, stats): out = out_activation(gate(form(pool(x))) * x + residual), with `form`
    one of se_kernels.excitation's forms and `params` its parameters; stats is the batch
    mean and biased variance of a normalization that used batch statistics (to update its
    running statistics with, as update_running_stats does), else None."""
    call = make_call(x, form, params, gate=gate, pool=pool, residual=residual,
                     out_activation=out_activation)
    return dispatch.select(call, backend).run_staged(call)


def update_running_stats(norm: torch.nn.modules.batchnorm._BatchNorm, stats, n) -> None:
    """What nn.BatchNorm2d's forward does to its buffers in training, from the batch's mean
    and biased variance (`stats`) over n values per channel."""
    if stats is None or not norm.training or not norm.track_running_stats:
        return
    mean, var = stats[:2]
    with torch.no_grad():
        norm.num_batches_tracked.add_(1)
        momentum = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
        norm.running_mean.lerp_(to_dtype(mean, norm.running_mean.dtype), momentum)
        norm.running_var.lerp_(to_dtype(var * (n / (n - 1)), norm.running_var.dtype), momentum)
