"""The block tail: BatchNorm -> SE -> drop path -> + residual -> ReLU as one function whose
x-sized work is two passes each way (DESIGN.md §1.5).

The passes are the stream ops (se_kernels._stream_ops), as on the staged path; between
them lie the excitation, in PyTorch on [N, C] vectors, and the norm's per-channel
algebra, the tail ops (se_kernels._tail_ops, one loop each on CPU). The normalized tensor
u = a·x + b is never written: the squeeze of u is a·mean(x) + b, its scale folds into the
map pass's coefficients, and the backward's sums of du and du·x̂ follow from Σdy and Σdy·x.
Under a SyncBatchNorm the per-channel sums are all-reduced between the passes (forward: Σx,
Σx², the count; backward: Σdu, Σdu·x), on the norm's process group.

With an `activation` between the norm and the SE (MBConv, RegNetY: the act tail,
DESIGN.md §1.5) the squeeze is of v = act(u), a pass of its own on the act stream ops,
which recompute v from x wherever it is needed; the tail then has no shortcut, drop path
or output activation.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from . import _fc_ops as fc_ops
from . import _tail_ops as tail_ops
from . import dispatch
from ._ops import DTYPES, accumulate_dtype
from ._stream_ops import check_residual, check_x
from .backends.torch_backend import (GATE_GRADIENTS, GATE_VALUES, GATES, activation_function,
                                      scale_epilogue)
from .options import NONE, OUT_RELU, check_choice, normalize_out_activation
from .staged import check_form_params, forward_alone, records_gradient, to_dtype

# The act tail's stream ops, which not every backend has (dispatch refuses it there).
ACT_OPS = ("stream_act_reduce", "stream_act_map", "stream_act_grad_reduce",
           "stream_act_grad_map")


class TailCall(NamedTuple):
    """One validated block-tail call. `norm` is (weight, bias, running_mean, running_var),
    each possibly None; `keep` the drop path's per-sample factor [N] (mask / keep
    probability) or None; `group` the SyncBatchNorm's process group (None: this process's
    batch alone); the excitation is `form` with `params` as on the staged path;
    `activation` is "none", or the activation between the norm and the SE (the act
    tail)."""

    x: torch.Tensor
    residual: torch.Tensor | None
    norm: tuple
    batch_stats: bool
    eps: float
    form: Any
    params: tuple
    gate: str
    keep: torch.Tensor | None
    out_activation: str
    group: Any = None
    activation: str = NONE

    @property
    def KERNEL_OPTIONS(self) -> tuple:  # noqa: N802 - dispatch reads it as the calls' attribute
        """The option arguments the stream ops take: the output activation, and the act
        tail's activation."""
        return ("out_activation",) if self.activation == NONE else ("out_activation", "activation")

    @property
    def STREAM_OPS(self) -> tuple:  # noqa: N802
        """The stream ops beyond the four that this call runs on."""
        return () if self.activation == NONE else ACT_OPS

    STREAM_OPS_USER = "the act tail (BatchNorm -> activation -> SE)"

    def tensors(self) -> tuple:
        return (self.x, self.residual, *self.norm, *self.params)

    def wants_gradient(self) -> bool:
        """Whether autograd will record this call (keep, a drawn mask, takes no gradient)."""
        return records_gradient(self.tensors())

    def stream_forward(self, backend: dispatch.Backend):
        return _run(backend.name, self)

    def composition(self):
        return torch_composition(self)


def make_call(x, norm, form, params, *, gate, batch_stats, eps=1e-5, residual=None, keep=None,
              out_activation="relu", group=None, activation=None) -> TailCall:
    check_x(x)
    check_choice("gate", gate)
    out_activation = normalize_out_activation(out_activation)
    activation = NONE if activation is None else activation
    if activation != NONE:
        check_choice("activation", activation)
        given = [name for name, value in (("residual", residual), ("keep", keep))
                 if value is not None]
        if out_activation != NONE:
            given.append(f"out_activation {out_activation!r}")
        if given:
            raise ValueError(f"the act tail (activation {activation!r}) takes no "
                             f"{', '.join(given)}: its SE output is the tail's")
    if len(norm) != 4:
        raise ValueError(f"norm must be (weight, bias, running_mean, running_var), got {len(norm)} "
                         f"items")
    for name, t in zip(("norm weight", "norm bias", "running_mean", "running_var"), norm):
        _check_vector(name, t, x.shape[1], x)
    if not batch_stats and (norm[2] is None or norm[3] is None):
        raise ValueError("running_mean and running_var are required without batch statistics")
    check_residual(x, residual)
    _check_vector("keep", keep, x.shape[0], x)
    if batch_stats and group is None and x.shape[0] * x.shape[2] * x.shape[3] < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got input "
                         f"size {list(x.shape)}")
    check_form_params(x, form, params)
    return TailCall(x, residual, tuple(norm), batch_stats, float(eps), form, tuple(params), gate,
                    keep, out_activation, group, activation)


def _check_vector(name: str, t: torch.Tensor | None, length: int, x: torch.Tensor) -> None:
    """A per-channel or per-sample vector beside x, if given: shape [length], a dtype the
    stream ops take (any of them: the tail computes in the accumulation dtype, so a norm
    may keep fp32 statistics for fp16 x), on x's device."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != (length,):
        raise ValueError(f"{name} must have shape [{length}], got {list(t.shape)}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.device != x.device:
        raise TypeError(f"{name} must be on device {x.device} like x, got {t.device}")


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        torch.distributed.all_reduce(t, group=group)
    return t


def _moments(sums, sumsq, p: int, group, batch_stats, running_mean, running_var, acc):
    """(moments, count) for tail_norm_forward: the per-channel [E x | E x²] over the whole
    batch (one all-reduce under a process group) from the per-(n, c) sums of x and x² over
    p positions, and the count of values they are over; or, without batch statistics, the
    running [mean | var] and None. The variance is then E x² - (E x)² in the accumulation
    dtype: the squeeze's own pass gives the sums, and no second pass over x is made for a
    centred one."""
    if not batch_stats:
        return torch.cat([to_dtype(running_mean, acc), to_dtype(running_var, acc)]), None
    return _batch_means(torch.cat([sums, sumsq], 1).sum(0), sums.shape[0] * p, group)


def _batch_means(totals: torch.Tensor, count: int, group):
    """(totals / count, count): per-channel sums over this process's `count` values each,
    as means over the whole batch. Under a process group both are all-reduced first, in
    one call, and the count comes back as a tensor; without one it stays the number."""
    if group is not None:
        both = _all_reduce(torch.cat([totals, totals.new_full((1,), count)]), group)
        totals, count = both[:-1], both[-1]
    return totals / count, count


def _norm_backward(algebra, batch_stats, group, local, stats, rstd, weight_a, bias_a, k, dz,
                   p):
    """(dweight, dbias, dy_scale, e_scale, x_scale, shift) of tail_norm_backward from this
    process's Σdu and Σdu·x (`local`), dweight and dbias None where the norm has none; the
    batch's means of them come from one all-reduce under a process group."""
    means = _batch_means(local, k.shape[0] * p, group)[0] if batch_stats else local
    dweight, dbias, *coefficients = algebra["tail_norm_backward"](
        local, means, stats, rstd, weight_a, bias_a, k, dz, p, batch_stats)
    return (dweight if weight_a is not None else None, dbias if bias_a is not None else None,
            *coefficients)


def forward_passes(ops, static, x, residual, keep, weight, bias, running_mean, running_var,
                   params):
    """(out, stats, total, saved) with `ops` as the stream ops: the batch mean and variance
    stacked (empty without batch statistics), the count of values per channel (likewise),
    and the tensors backward_passes takes."""
    batch_stats, eps, form, gate, out_activation, group, activation = static
    if activation != NONE:
        return _act_forward_passes(ops, static, x, weight, bias, running_mean, running_var,
                                   params)
    acc = accumulate_dtype(x.dtype)
    cast = tuple(to_dtype(t, acc) for t in params)
    weight_a, bias_a = to_dtype(weight, acc), to_dtype(bias, acc)
    p = x.shape[2] * x.shape[3]
    sums, sumsq, _, _ = ops["stream_reduce"](x, batch_stats, False, False)
    moments, count = _moments(sums, sumsq, p, group, batch_stats, running_mean, running_var, acc)
    stats, rstd, a, b, z = tail_ops.for_device(x.device)["tail_norm_forward"](
        moments, sums, weight_a, bias_a, eps, p, batch_stats)
    g, form_saved, _ = form.forward(z, cast, fc_ops.for_device(x.device))
    s = GATE_VALUES[gate](g)
    k = s if keep is None else s * keep.to(acc)[:, None]
    out = ops["stream_map"](x, k * a, k * b, residual, out_activation)
    saved = (x, out if out_activation == OUT_RELU else None, keep, weight_a, bias_a, sums, z, g,
             s, a, b, stats, rstd, *cast, *form_saved)
    return out, *_stats_and_total(batch_stats, stats, count), saved


def _stats_and_total(batch_stats, stats, count):
    """What the tail's forward returns beside out: the batch's [mean; var] and, under a
    process group, the all-reduced count (each an empty tensor where there is none)."""
    empty = stats.new_empty((0,))
    return stats if batch_stats else empty, count if torch.is_tensor(count) else empty


def backward_passes(ops, static, n_params, residual_grad, grad_out, saved):
    """(dx, dresidual, grads) with `ops` as the stream ops, from forward_passes' `saved`:
    dresidual is grad_out itself unless the reduce pass wrote the masked dy; grads are those
    of the norm's weight and bias and of the form's parameters, in the accumulation dtype."""
    batch_stats, eps, form, gate, out_activation, group, activation = static
    if activation != NONE:
        return _act_backward_passes(ops, static, n_params, grad_out, saved)
    x, out, keep, weight_a, bias_a, sums, z, g, s, a, b, stats, rstd, *rest = saved
    cast, form_saved = tuple(rest[:n_params]), tuple(rest[n_params:])
    n, c, h, w = x.shape
    p = h * w
    sdy, sdyx, _, dresidual = ops["stream_grad_reduce"](
        grad_out, out, x, None, out_activation, True, residual_grad)
    keep_a = None if keep is None else keep.to(rstd.dtype)[:, None]
    ds = torch.addcmul(b * sdy, a, sdyx)  # Σ_p dy·u
    if keep_a is not None:
        ds = ds * keep_a
    dz, grads = form.backward(GATE_GRADIENTS[gate](g, s, ds), z, cast, form_saved,
                              fc_ops.for_device(x.device))
    k = s if keep_a is None else s * keep_a
    algebra = tail_ops.for_device(x.device)
    # du = k·dy + dz/p, per (n, c); Σ du and Σ du·x per channel of this process's batch
    local = algebra["tail_du_sums"](dz, k, sdy, None, sdyx, sums, p)
    dweight, dbias, dy_scale, e_scale, x_scale, channel_shift = _norm_backward(
        algebra, batch_stats, group, local, stats, rstd, weight_a, bias_a, k, dz, p)
    if batch_stats:  # dx = dy_scale·dy + x_scale·x + (e_scale + channel_shift)
        shift, x_scale = e_scale + channel_shift, x_scale.expand(n, c)
    else:
        shift, x_scale = e_scale, None
    if dresidual.numel():  # the masked dy, written by the reduce pass
        dx = ops["stream_grad_map"](dresidual, None, x, dy_scale, x_scale, shift, None, None, NONE)
    else:
        dresidual = grad_out
        dx = ops["stream_grad_map"](grad_out, out, x, dy_scale, x_scale, shift, None, None,
                                    out_activation)
    return dx, dresidual, (dweight, dbias, *grads)


def _act_forward_passes(ops, static, x, weight, bias, running_mean, running_var, params):
    """forward_passes of the act tail: out = s·act(a·x + b), s = gate(form(mean_p v))."""
    batch_stats, eps, form, gate, _, group, activation = static
    acc = accumulate_dtype(x.dtype)
    cast = tuple(to_dtype(t, acc) for t in params)
    weight_a, bias_a = to_dtype(weight, acc), to_dtype(bias, acc)
    p = x.shape[2] * x.shape[3]
    sums = sumsq = None
    if batch_stats:
        sums, sumsq, _, _ = ops["stream_reduce"](x, True, False, False)
    moments, count = _moments(sums, sumsq, p, group, batch_stats, running_mean, running_var, acc)
    stats, rstd, a, b, _ = tail_ops.for_device(x.device)["tail_norm_forward"](
        moments, None, weight_a, bias_a, eps, p, batch_stats)
    z = ops["stream_act_reduce"](x, a, b, activation) / p
    g, form_saved, _ = form.forward(z, cast, fc_ops.for_device(x.device))
    s = GATE_VALUES[gate](g)
    out = ops["stream_act_map"](x, a, b, activation, s)
    saved = (x, weight_a, bias_a, z, g, s, a, b, stats, rstd, *cast, *form_saved)
    return out, *_stats_and_total(batch_stats, stats, count), saved


def _act_backward_passes(ops, static, n_params, grad_out, saved, norm_grad=True):
    """backward_passes of the act tail (DESIGN.md §1.5): dx and the grads of the norm's
    weight and bias (None where it has none, or where `norm_grad` is false in eval) and of
    the form's parameters."""
    batch_stats, eps, form, gate, _, group, activation = static
    x, weight_a, bias_a, z, g, s, a, b, stats, rstd, *rest = saved
    cast, form_saved = tuple(rest[:n_params]), tuple(rest[n_params:])
    n, c, h, w = x.shape
    p = h * w
    # Σdu and Σdu·x: for the batch's statistics, or for dγ and dβ alone in eval.
    statistics = batch_stats or (norm_grad and (weight_a is not None or bias_a is not None))
    sdyv, sdyd, sdydx, sd, sdx = ops["stream_act_grad_reduce"](grad_out, x, a, b, activation,
                                                               statistics)
    dz, grads = form.backward(GATE_GRADIENTS[gate](g, s, sdyv), z, cast, form_saved,
                              fc_ops.for_device(x.device))
    if not statistics:  # eval, no norm gradient: dx = d·(a·s·dy + a·dz/p)
        dx = ops["stream_act_grad_map"](grad_out, x, a, b, activation, a * s, a * (dz / p),
                                        None, None)
        return dx, None, (None, None, *grads)
    algebra = tail_ops.for_device(x.device)
    # du = act'(u)·(s·dy + dz/p), per (n, c)
    local = algebra["tail_du_sums"](dz, s, sdyd, sd, sdydx, sdx, p)
    dweight, dbias, dy_scale, act_shift, x_scale, shift = _norm_backward(
        algebra, batch_stats, group, local, stats, rstd, weight_a, bias_a, s, dz, p)
    if batch_stats:
        x_scale, shift = x_scale.expand(n, c), shift.expand(n, c)
    else:
        x_scale = shift = None
    dx = ops["stream_act_grad_map"](grad_out, x, a, b, activation, dy_scale, act_shift,
                                    x_scale, shift)
    return dx, None, (dweight, dbias, *grads)


class _TailFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend, static, x, residual, keep, weight, bias, running_mean, running_var,
                *params):
        ops = dispatch.get_backend(backend).stream_ops(x.device.type)
        out, stats, total, saved = forward_passes(ops, static, x, residual, keep, weight, bias,
                                                  running_mean, running_var, params)
        ctx.mark_non_differentiable(stats, total)
        ctx.save_for_backward(*saved)
        ctx.static = (backend, static, len(params), residual is not None,
                      tuple(None if t is None else t.dtype for t in (weight, bias, *params)))
        return out, stats, total

    @staticmethod
    def backward(ctx, grad_out, _dstats, _dtotal):
        backend, static, n_params, has_residual, dtypes = ctx.static
        saved = ctx.saved_tensors
        ops = dispatch.get_backend(backend).stream_ops(saved[0].device.type)
        residual_grad = has_residual and ctx.needs_input_grad[3]
        if static[-1] != NONE:  # the act tail: dγ, dβ in eval only when asked for
            dx, dresidual, grads = _act_backward_passes(
                ops, static, n_params, grad_out, saved,
                norm_grad=ctx.needs_input_grad[5] or ctx.needs_input_grad[6])
        else:
            dx, dresidual, grads = backward_passes(ops, static, n_params, residual_grad,
                                                   grad_out, saved)
        grads = tuple(to_dtype(d, dtype) for d, dtype in zip(grads, dtypes))
        return (None, None, dx, dresidual if residual_grad else None, None, *grads[:2], None,
                None, *grads[2:])


def _run(backend: str, call: TailCall):
    """(out, stats) of `call` on the backend's stream ops: through the autograd.Function, or
    its forward alone (staged.forward_alone)."""
    static = (call.batch_stats, call.eps, call.form, call.gate, call.out_activation, call.group,
              call.activation)
    if forward_alone(call):
        ops = dispatch.get_backend(backend).stream_ops(call.x.device.type)
        out, stats, total, _ = forward_passes(ops, static, call.x, call.residual, call.keep,
                                              *call.norm, call.params)
    else:
        out, stats, total = _TailFunction.apply(backend, static, call.x, call.residual, call.keep,
                                                *call.norm, *call.params)
    if not stats.numel():
        return out, None
    return out, (stats[0], stats[1], _count(call, total))


def _count(call: TailCall, total: torch.Tensor):
    """The values per channel the batch statistics are over: the all-reduced count under a
    process group, else x's own, as a number (the running variance's update then takes no
    tensor op for it)."""
    return total if call.group is not None else call.x.numel() // call.x.shape[1]


def torch_composition(call: TailCall):
    """(out, stats) of `call` in PyTorch operations that autograd differentiates: the torch
    backend's, and what ONNX export emits (BatchNormalization in eval)."""
    acc = accumulate_dtype(call.x.dtype)
    x = call.x.to(acc)
    weight, bias, running_mean, running_var = (None if t is None else t.to(acc) for t in call.norm)
    stats = None
    if call.batch_stats:
        n, c, h, w = x.shape
        totals = torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), x.new_full((1,), n * h * w)])
        if call.group is not None:  # autograd through the all-reduce: the functional one
            totals = torch.distributed.nn.functional.all_reduce(totals, group=call.group)
        count = totals[-1]
        mean = totals[:c] / count
        var = (totals[c:2 * c] / count - mean * mean).clamp_min(0)
        rstd = torch.rsqrt(var + call.eps)
        u = (x - mean[:, None, None]) * rstd[:, None, None]
        if weight is not None:
            u = u * weight[:, None, None]
        if bias is not None:
            u = u + bias[:, None, None]
        stats = (mean.detach(), var.detach(), _count(call, count.detach()))
    else:
        u = F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, call.eps)
    if call.activation != NONE:  # the act tail: BatchNorm -> act -> SE
        u = activation_function(call.activation)(u)
    g, _, _ = call.form.forward(u.mean((2, 3)), tuple(None if t is None else t.to(acc)
                                                      for t in call.params))
    s = GATES[call.gate](g)
    if call.keep is not None:
        s = s * call.keep.to(acc)[:, None]
    return scale_epilogue(u, s, call.residual, call.out_activation, call.x.dtype), stats


def block_tail(x, norm, form, params, *, gate, batch_stats, eps=1e-5, residual=None, keep=None,
               out_activation="relu", group=None, backend="auto", activation=None):
    """(out, stats): out = out_activation(gate(form(mean(u))) · u · keep + residual) with
    u = batch_norm(x) (batch statistics when `batch_stats`, else the running ones in `norm`);
    with an `activation` (one of options.ACTIVATIONS; None or "none": no activation), the act
    tail out = gate(form(mean(v))) · v with v = activation(u), which takes no residual, keep
    or out_activation. stats is (batch mean, biased batch variance, count) for updating the
    running statistics (update_running_stats), or None."""
    call = traced_quietly(make_call, x, norm, form, params, gate=gate, batch_stats=batch_stats,
                          eps=eps, residual=residual, keep=keep, out_activation=out_activation,
                          group=group, activation=activation)
    return dispatch.select(call, backend).run_staged(call)


def traced_quietly(fn, *args, **kwargs):
    """fn(*args, **kwargs), without the TracerWarnings of torch.jit.trace (and the
    TorchScript ONNX exporter), which traces sizes as tensors and warns where the checks
    compare them: a trace is of fixed shapes, all they check."""
    if not torch.jit.is_tracing():
        return fn(*args, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return fn(*args, **kwargs)
