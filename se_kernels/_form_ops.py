"""The linear excitation forms' inference op: the staged path's forward in one call.

    linear_form_forward(x, form, weight, bias, gate, pool, residual, out_activation) -> out
        z = pool(x);  g = W·z + b (form "fc": weight [C, C], bias [C]) or the odd-width
        convolution of z across channels with zero ("conv") or circular ("circular_conv")
        padding (weight [k], bias [1]);  out = out_act(gate(g)·x + residual)

Forms whose g is a linear map of z (se_kernels.excitation's Fc and ChannelConv) need
nothing between the passes but that map. A call autograd does not record then runs as one
op instead of the two stream ops with PyTorch between them: at batch 1 those small
operations and their Python cost as much as the passes, and a backend with this op also
walks the samples in cached groups, as the fused op does. It has no autograd: the staged
path calls it only where autograd records nothing, and uses the stream ops elsewhere.
weight and bias are in the accumulation dtype (fp32, fp64 for fp64 x); out has x's dtype
and the kernels' layout. Kernels: CPU in se_kernels._C.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from ._ops import _check_like, _op_packet, accumulate_dtype, kernel_memory_format
from ._stream_ops import check_residual, check_x
from .options import check_choice

FORMS = ("fc", "conv", "circular_conv")
SCHEMA = ("(Tensor x, str form, Tensor weight, Tensor? bias, str gate, str pool, Tensor? residual, "
          "str out_activation) -> Tensor")

_lib = torch.library.Library("se_kernels", "FRAGMENT")  # noqa: TOR901 - kept alive for the module's life
_lib.define("linear_form_forward" + SCHEMA)


def check_args(x, form, weight, bias, gate, pool, residual, out_activation) -> None:
    check_x(x)
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(map(repr, FORMS))}, got {form!r}")
    c, acc = x.shape[1], accumulate_dtype(x.dtype)
    if form == "fc":
        _check_like("weight", weight, (c, c), x, acc)
        bias_shape = (c,)
    else:
        if weight.dim() != 1 or weight.shape[0] % 2 == 0:
            raise ValueError(f"weight of a conv form must be 1-D with an odd width, got shape "
                             f"{list(weight.shape)}")
        _check_like("weight", weight, weight.shape, x, acc)
        bias_shape = (1,)
    if bias is not None:
        _check_like("bias", bias, bias_shape, x, acc)
    check_residual(x, residual)
    for argument, value in (("gate", gate), ("pool", pool), ("out_activation", out_activation)):
        check_choice(argument, value)


@torch.library.register_fake("se_kernels::linear_form_forward")
def _fake(x, form, weight, bias, gate, pool, residual, out_activation):
    check_args(x, form, weight, bias, gate, pool, residual, out_activation)
    return torch.empty_like(x, memory_format=kernel_memory_format(x))


@register_flop_formula(_op_packet("se_kernels::linear_form_forward"))
def _flops(x_shape, form, weight_shape, bias_shape, gate, pool, residual_shape, *args,
           out_shape=None, **kwargs) -> int:
    """The two passes (an add per element, then a multiply and the residual's add) and the
    map's multiply-adds, 2 per weight and sample (the convolution's, k per channel)."""
    n, c = x_shape[0], x_shape[1]
    elems = n * c * x_shape[2] * x_shape[3]
    macs = n * (c * c if form == "fc" else c * weight_shape[0])
    return elems * (2 + (residual_shape is not None)) + 2 * macs


linear_form_forward = _op_packet("se_kernels::linear_form_forward").default


def excitation(form: str, kernel: int):
    """The se_kernels.excitation form that `form` names, with a conv's width `kernel`."""
    from .excitation import ChannelConv, Fc
    return Fc() if form == "fc" else ChannelConv(kernel, circular=form == "circular_conv")


def reference(x, form, weight, bias, gate, pool, residual, out_activation):
    """The op in PyTorch operations: the staged path's composition of the same form."""
    from .staged import make_call, torch_composition

    check_args(x, form, weight, bias, gate, pool, residual, out_activation)
    call = make_call(x, excitation(form, weight.shape[0]), (weight, bias), gate=gate, pool=pool,
                     residual=residual, out_activation=out_activation)
    return torch_composition(call)[0].contiguous(memory_format=kernel_memory_format(x))
