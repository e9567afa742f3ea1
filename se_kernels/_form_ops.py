"""The linear excitation forms' ops: the staged path in one call each way.

    linear_form_forward(x, form, weight, bias, gate, pool, residual, out_activation) -> out
        z = pool(x);  g = W·z + b (form "fc": weight [C, C], bias [C]) or the odd-width
        convolution of z across channels with zero ("conv") or circular ("circular_conv")
        padding (weight [k], bias [1]);  out = out_act(gate(g)·x + residual)
    linear_form_forward_saved(same arguments) -> (out, z, zmax, g)
        the same out, and what its backward reads: z, zmax = max_p x for pools with a max
        (else empty), g
    linear_form_backward(grad_out, out, x, form, weight, bias, z, zmax, g, gate, pool,
                         out_activation, residual_grad) -> (dx, dresidual, dweight, dbias)
        linear_form_forward_saved's gradients (its autograd formula), from its z, zmax and g
        (and out under an output ReLU):
        ds = Σ_p dy·x, dg = gate'(g)·ds, dz = the form's transpose of dg, dweight and dbias
        summed over the batch, dx = s·dy + dz through the pool; dresidual = the masked dy
        when residual_grad under an output ReLU (else empty: it is grad_out), dbias empty
        without a bias

Forms whose g is a linear map of z (se_kernels.excitation's Fc and ChannelConv) need
nothing between the passes but that map and its transpose, so a backend can run each
direction as one op instead of two stream ops with PyTorch between them: at batch 1 those
small operations and their Python cost as much as the passes, and a backend with these ops
also walks the samples in cached groups, as the fused op does. A call autograd does not
record runs linear_form_forward, which has no autograd (its three more outputs would cost
a batch-1 call a few microseconds); one it records runs linear_form_forward_saved. weight
and bias are in the accumulation dtype (fp32, fp64 for fp64 x), as are z, zmax, g and the
weight gradients; x-sized outputs have x's dtype and the kernels' layout. Kernels: CPU in
se_kernels._C.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from ._ops import _check_like, _op_packet, accumulate_dtype, kernel_memory_format
from ._stream_ops import check_grad_inputs, check_residual, check_vectors, check_x
from .options import AVG, OUT_RELU, check_choice

FORMS = ("fc", "conv", "circular_conv")
ARGUMENTS = ("(Tensor x, str form, Tensor weight, Tensor? bias, str gate, str pool, "
             "Tensor? residual, str out_activation)")
SCHEMA = ARGUMENTS + " -> Tensor"
SAVED_SCHEMA = ARGUMENTS + " -> (Tensor out, Tensor z, Tensor zmax, Tensor g)"
BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor? out, Tensor x, str form, Tensor weight, Tensor? bias, Tensor z, "
    "Tensor? zmax, Tensor g, str gate, str pool, str out_activation, bool residual_grad) "
    "-> (Tensor dx, Tensor dresidual, Tensor dweight, Tensor dbias)")

_lib = torch.library.Library("se_kernels", "FRAGMENT")  # noqa: TOR901 - kept alive for the module's life
_lib.define("linear_form_forward" + SCHEMA)
_lib.define("linear_form_forward_saved" + SAVED_SCHEMA)
_lib.define("linear_form_backward" + BACKWARD_SCHEMA)


def _check_form(x, form, weight, bias) -> None:
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


def _check_options(gate, pool, out_activation) -> None:
    for argument, value in (("gate", gate), ("pool", pool), ("out_activation", out_activation)):
        check_choice(argument, value)


def check_args(x, form, weight, bias, gate, pool, residual, out_activation) -> None:
    check_x(x)
    _check_form(x, form, weight, bias)
    check_residual(x, residual)
    _check_options(gate, pool, out_activation)


def check_backward_args(grad_out, out, x, form, weight, bias, z, zmax, g, gate, pool,
                        out_activation, residual_grad) -> None:
    check_grad_inputs(grad_out, out, x, out_activation)
    _check_form(x, form, weight, bias)
    _check_options(gate, pool, out_activation)
    check_vectors(x, z=z, g=g, zmax=zmax)
    if zmax is None and pool != AVG:
        raise ValueError(f"zmax is required when pool is {pool!r}")


def _vector(x: torch.Tensor, wanted: bool = True) -> torch.Tensor:
    return x.new_empty(tuple(x.shape[:2]) if wanted else (0,), dtype=accumulate_dtype(x.dtype))


@torch.library.register_fake("se_kernels::linear_form_forward")
def _fake(x, form, weight, bias, gate, pool, residual, out_activation):
    check_args(x, form, weight, bias, gate, pool, residual, out_activation)
    return torch.empty_like(x, memory_format=kernel_memory_format(x))


@torch.library.register_fake("se_kernels::linear_form_forward_saved")
def _saved_fake(x, form, weight, bias, gate, pool, residual, out_activation):
    return (_fake(x, form, weight, bias, gate, pool, residual, out_activation), _vector(x),
            _vector(x, pool != AVG), _vector(x))


@torch.library.register_fake("se_kernels::linear_form_backward")
def _backward_fake(grad_out, out, x, form, weight, bias, z, zmax, g, gate, pool, out_activation,
                   residual_grad):
    check_backward_args(grad_out, out, x, form, weight, bias, z, zmax, g, gate, pool,
                        out_activation, residual_grad)
    x_sized = torch.empty_like(x, memory_format=kernel_memory_format(x))
    dresidual = (torch.empty_like(x, memory_format=kernel_memory_format(x))
                 if residual_grad and out_activation == OUT_RELU else x.new_empty((0,)))
    dbias = torch.empty_like(bias) if bias is not None else weight.new_empty((0,))
    return x_sized, dresidual, torch.empty_like(weight), dbias


def _macs(n: int, c: int, form: str, weight_shape) -> int:
    return n * (c * c if form == "fc" else c * weight_shape[0])


@register_flop_formula([_op_packet("se_kernels::linear_form_forward"),
                        _op_packet("se_kernels::linear_form_forward_saved")])
def _flops(x_shape, form, weight_shape, bias_shape, gate, pool, residual_shape, *args,
           out_shape=None, **kwargs) -> int:
    """The two passes (an add per element, then a multiply and the residual's add) and the
    map's multiply-adds, 2 per weight and sample (the convolution's, k per channel)."""
    elems = x_shape[0] * x_shape[1] * x_shape[2] * x_shape[3]
    return (elems * (2 + (residual_shape is not None))
            + 2 * _macs(x_shape[0], x_shape[1], form, weight_shape))


@register_flop_formula(_op_packet("se_kernels::linear_form_backward"))
def _backward_flops(grad_out_shape, out_shape_, x_shape, form, weight_shape, *args,
                    out_shape=None, **kwargs) -> int:
    """The two passes (a product summed, then dy·s plus the pool's share) and the map's
    transpose and weight gradient, 2 multiply-adds each per weight and sample."""
    elems = x_shape[0] * x_shape[1] * x_shape[2] * x_shape[3]
    return elems * 4 + 4 * _macs(x_shape[0], x_shape[1], form, weight_shape)


linear_form_forward = _op_packet("se_kernels::linear_form_forward").default
linear_form_forward_saved = _op_packet("se_kernels::linear_form_forward_saved").default
linear_form_backward = _op_packet("se_kernels::linear_form_backward").default
LINEAR_FORM_OPS = {"forward": linear_form_forward, "saved": linear_form_forward_saved}


def _setup_context(ctx, inputs, output):
    x, form, weight, bias, gate, pool, residual, out_activation = inputs
    out, z, zmax, g = output
    ctx.mark_non_differentiable(z, zmax, g)
    ctx.save_for_backward(x, out if out_activation == OUT_RELU else None, weight, bias, z,
                          zmax if pool != AVG else None, g)
    ctx.options = (form, gate, pool, out_activation, residual is not None)


def _backward(ctx, grad_out, *_):
    x, out, weight, bias, z, zmax, g = ctx.saved_tensors
    form, gate, pool, out_activation, has_residual = ctx.options
    residual_grad = has_residual and ctx.needs_input_grad[6]
    dx, dresidual, dweight, dbias = linear_form_backward(
        grad_out, out, x, form, weight, bias, z, zmax, g, gate, pool, out_activation,
        residual_grad)
    if residual_grad and out_activation != OUT_RELU:  # no output ReLU: the residual's is dy
        dresidual = grad_out
    return (dx, None, dweight, dbias if bias is not None else None, None, None,
            dresidual if residual_grad else None, None)


torch.library.register_autograd("se_kernels::linear_form_forward_saved", _backward,
                                setup_context=_setup_context)


def excitation(form: str, kernel: int):
    """The se_kernels.excitation form that `form` names, with a conv's width `kernel`."""
    from .excitation import ChannelConv, Fc
    return Fc() if form == "fc" else ChannelConv(kernel, circular=form == "circular_conv")


def _composition_call(x, form, weight, bias, gate, pool, residual, out_activation):
    from .staged import make_call
    return make_call(x, excitation(form, weight.shape[0]), (weight, bias), gate=gate, pool=pool,
                     residual=residual, out_activation=out_activation)


def reference(x, form, weight, bias, gate, pool, residual, out_activation):
    """out of the forward op in PyTorch operations: the staged path's composition of the
    same form."""
    from .staged import torch_composition

    check_args(x, form, weight, bias, gate, pool, residual, out_activation)
    call = _composition_call(x, form, weight, bias, gate, pool, residual, out_activation)
    return torch_composition(call)[0].contiguous(memory_format=kernel_memory_format(x))


def reference_backward(grad_out, x, form, weight, bias, gate, pool, residual, out_activation):
    """(dx, dresidual, dweight, dbias) of the forward op's out against grad_out: autograd
    through the composition (dresidual None without a residual, dbias without a bias)."""
    from .staged import torch_composition

    leaves = [t.detach().requires_grad_() if t is not None else None
              for t in (x, weight, bias, residual)]
    call = _composition_call(leaves[0], form, leaves[1], leaves[2], gate, pool, leaves[3],
                             out_activation)
    out = torch_composition(call)[0]
    wanted = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
    dx, dweight, dbias, dresidual = (next(grads) if t is not None else None for t in leaves)
    return dx, dresidual, dweight, dbias
