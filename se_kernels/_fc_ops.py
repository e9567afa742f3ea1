"""A fully connected layer's products, as ops: what the staged path's excitation MLPs run
on between the passes (DESIGN.md §1.4).

    fc_layer(x, weight, bias) -> y
        y [N, R] = x [N, K] · weightᵀ + bias, weight [R, K], bias [R] or None
    fc_layer_backward(grad, x, weight, bias) -> (dx, dweight, dbias)
        dx = grad · weight [N, K], dweight = gradᵀ · x [R, K], dbias = Σ_n grad [R] (empty
        without a bias), for grad [N, R]

Every tensor is in one accumulation dtype (fp32, or fp64), on one device. The excitation's
rows are few (the batch) and its weights wide (C x C/r): at batch 8 with a 2048 x 128
weight, a BLAS call spends as long packing the operands into its panels as multiplying
them. The CPU kernels (se_kernels._C) multiply in register tiles straight from the rows
instead, each output one thread's sum in a fixed order. This module's PyTorch versions
serve every other device (and CPU where the extension is not built) and are what the
tests hold the kernels to.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from ._ops import _check_like, _op_packet, runs_cpu_kernels_as_ops

_lib = torch.library.Library("se_kernels", "FRAGMENT")  # noqa: TOR901 - kept alive for the module's life
SCHEMAS = {
    "fc_layer": "(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
    "fc_layer_backward": ("(Tensor grad, Tensor x, Tensor weight, bool bias) "
                          "-> (Tensor dx, Tensor dweight, Tensor dbias)"),
}
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)


def _check_operands(x, weight) -> None:
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x must be float32 or float64 (the accumulation dtype), got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [N, K], got shape {list(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [R, K], got shape {list(weight.shape)}")
    _check_like("weight", weight, (weight.shape[0], x.shape[1]), x)


def check_forward(x, weight, bias) -> None:
    _check_operands(x, weight)
    if bias is not None:
        _check_like("bias", bias, (weight.shape[0],), x)


def check_backward(grad, x, weight, bias) -> None:
    _check_operands(x, weight)
    _check_like("grad", grad, (x.shape[0], weight.shape[0]), x)


def _products(grad, x, weight, bias):
    return grad @ weight, grad.t() @ x, grad.sum(0) if bias else grad.new_empty((0,))


def forward_reference(x, weight, bias):
    """fc_layer in PyTorch operations, its arguments checked."""
    check_forward(x, weight, bias)
    return F.linear(x, weight, bias)


def backward_reference(grad, x, weight, bias):
    """fc_layer_backward in PyTorch operations, its arguments checked."""
    check_backward(grad, x, weight, bias)
    return _products(grad, x, weight, bias)


def _forward_fake(x, weight, bias):
    check_forward(x, weight, bias)
    return x.new_empty((x.shape[0], weight.shape[0]))


def _backward_fake(grad, x, weight, bias):
    check_backward(grad, x, weight, bias)
    return (x.new_empty(x.shape), x.new_empty(weight.shape),
            x.new_empty((weight.shape[0],) if bias else (0,)))


@register_flop_formula(_op_packet("se_kernels::fc_layer"))
def _flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """2 per weight and row: a multiply and an add."""
    return 2 * x_shape[0] * weight_shape[0] * weight_shape[1]


@register_flop_formula(_op_packet("se_kernels::fc_layer_backward"))
def _backward_flops(grad_shape, x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """The two products, 2 per weight and row each."""
    return 4 * x_shape[0] * weight_shape[0] * weight_shape[1]


REFERENCES = {"fc_layer": forward_reference, "fc_layer_backward": backward_reference}
FAKES = {"fc_layer": _forward_fake, "fc_layer_backward": _backward_fake}
OPS = {}
for _name in SCHEMAS:
    torch.library.register_fake(f"se_kernels::{_name}", FAKES[_name])
    torch.library.impl(f"se_kernels::{_name}", "CompositeExplicitAutograd")(REFERENCES[_name])
    OPS[_name] = getattr(torch.ops.se_kernels, _name).default


class FcLayer(NamedTuple):
    """How an excitation form runs its fully connected layers: forward(x, weight, bias) and
    backward(grad, x, weight, bias) as the two ops above (bias a bool in the backward)."""

    forward: Callable
    backward: Callable


# The PyTorch operations alone: what a trace records, with no checks of sizes it would
# record as constants.
TORCH = FcLayer(F.linear, _products)
KERNELS = FcLayer(OPS["fc_layer"], OPS["fc_layer_backward"])


def for_device(device: torch.device) -> FcLayer:
    """The layer as the staged path runs it on `device` now: the ops in eager on CPU, where
    the extension's kernels multiply without packing; elsewhere the PyTorch versions, which
    a GPU runs as the BLAS calls the op would, and which tracing, torch.compile and
    torch.export see through and differentiate (the ops have no autograd: the staged
    path's autograd.Function is their backward in eager)."""
    return KERNELS if runs_cpu_kernels_as_ops(device) else TORCH
