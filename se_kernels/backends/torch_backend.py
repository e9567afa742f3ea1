"""The "torch" backend: SE as PyTorch ops.

It is the fallback that runs anywhere, checked like every backend against the float64
oracle of tests/oracle.py; autograd differentiates it. It follows the kernels' numerics:
pooling, MLP and scale in fp32 (fp64 for fp64), one rounding to x's dtype at the end.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import dispatch
from .._ops import accumulate_dtype
from ..options import (AVG, AVGMAX, GELU, GELU_TANH, HARDSIGMOID, HARDSWISH, LEAKY_RELU,
                       LEAKY_RELU_SLOPE, MAX, NONE, OUT_RELU, RELU, SIGMOID, SILU, TANH)
from ..call import SECall


def hardsigmoid(g: torch.Tensor) -> torch.Tensor:
    """(g + 3) / 6 clamped to [0, 1], whose autograd derivative is 1/6 on (-3, 3) rounded
    once in g's dtype: F.hardsigmoid's fp64 backward multiplies by a float32 1/6. Exported
    graphs (torch.export, ONNX), which hold no backward, keep the one hardsigmoid operator."""
    if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
        return F.hardsigmoid(g)
    return torch.where((g > -3) & (g < 3), (g + 3) / 6, (g > 0).to(g.dtype))


def _avgmax(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x.mean(dim=(2, 3)) + 0.5 * x.amax(dim=(2, 3))


# One table per option (DESIGN.md §1.3): the backend's declaration of what it computes is
# these tables' keys.
POOLS = {AVG: lambda x: x.mean(dim=(2, 3)), MAX: lambda x: x.amax(dim=(2, 3)), AVGMAX: _avgmax}
ACTIVATIONS = {RELU: F.relu, SILU: F.silu, GELU: F.gelu,
               GELU_TANH: lambda a: F.gelu(a, approximate="tanh"), HARDSWISH: F.hardswish,
               LEAKY_RELU: lambda a: F.leaky_relu(a, LEAKY_RELU_SLOPE)}
GATES = {SIGMOID: torch.sigmoid, HARDSIGMOID: hardsigmoid, TANH: torch.tanh, RELU: F.relu}
# The gates' values where no autograd differentiates them (the staged path's written-out
# backward uses GATE_GRADIENTS): hardsigmoid as its one operator.
GATE_VALUES = {**GATES, HARDSIGMOID: F.hardsigmoid}
OUT_ACTIVATIONS = {NONE: None, OUT_RELU: F.relu}
POOL_WEIGHTS = {AVG: (1.0, 0.0), MAX: (0.0, 1.0), AVGMAX: (0.5, 0.5)}  # (w_avg, w_max), §1.2


# The derivatives of §1.3, for the staged path's written-out backward (se_kernels/staged.py,
# se_kernels/excitation.py): each maps (v, dv) to dv times the derivative at v, where v is
# the pre-activation (activations, hardsigmoid, relu) or the gate's output s (sigmoid, tanh).
def _hardswish_gradient(a, dh):
    return dh * torch.where(a < -3, 0.0, torch.where(a <= 3, a / 3 + 0.5, 1.0))


SQRT_HALF, INV_SQRT_2PI = math.sqrt(0.5), 1 / math.sqrt(2 * math.pi)
SQRT_2_OVER_PI, GELU_TANH_CUBIC = math.sqrt(2 / math.pi), 0.044715


def _gelu_gradient(a, dh):
    cdf = 0.5 * (1 + torch.erf(a * SQRT_HALF))
    return dh * (cdf + a * torch.exp(-0.5 * a * a) * INV_SQRT_2PI)


def _gelu_tanh_gradient(a, dh):
    t = torch.tanh(SQRT_2_OVER_PI * (a + GELU_TANH_CUBIC * a * a * a))
    return dh * (0.5 * (1 + t) + 0.5 * a * (1 - t * t) * SQRT_2_OVER_PI
                 * (1 + 3 * GELU_TANH_CUBIC * a * a))


def _silu_gradient(a, dh):
    sig = torch.sigmoid(a)
    return dh * sig * (1 + a * (1 - sig))


ACTIVATION_GRADIENTS = {
    RELU: lambda a, dh, slope: torch.ops.aten.threshold_backward(dh, a, 0),  # relu's own
    SILU: lambda a, dh, slope: _silu_gradient(a, dh),
    GELU: lambda a, dh, slope: _gelu_gradient(a, dh),
    GELU_TANH: lambda a, dh, slope: _gelu_tanh_gradient(a, dh),
    HARDSWISH: lambda a, dh, slope: _hardswish_gradient(a, dh),
    LEAKY_RELU: lambda a, dh, slope: torch.where(a > 0, dh, dh * slope),
}
GATE_GRADIENTS = {  # (g, s, ds) -> dg
    SIGMOID: lambda g, s, ds: torch.ops.aten.sigmoid_backward(ds, s),  # ds·s·(1 - s), one op
    HARDSIGMOID: lambda g, s, ds: ds * ((g > -3) & (g < 3)) / 6,
    TANH: lambda g, s, ds: torch.ops.aten.tanh_backward(ds, s),  # ds·(1 - s²)
    RELU: lambda g, s, ds: ds * (g > 0),
}
assert ACTIVATION_GRADIENTS.keys() == ACTIVATIONS.keys() and GATE_GRADIENTS.keys() == GATES.keys()


def activation_function(name: str, negative_slope: float = LEAKY_RELU_SLOPE):
    """The activation `name`; leaky_relu with `negative_slope`."""
    if name == LEAKY_RELU:
        return lambda a: F.leaky_relu(a, negative_slope)
    return ACTIVATIONS[name]


def activation_gradient(name: str, negative_slope: float = LEAKY_RELU_SLOPE):
    """(a, dh) -> dh·act'(a) for the activation `name`."""
    gradient = ACTIVATION_GRADIENTS[name]
    return lambda a, dh: gradient(a, dh, negative_slope)


def torch_forward(call: SECall) -> torch.Tensor:
    # Everything in the accumulation dtype from the start, so that the backward, too,
    # rounds each gradient to its dtype once (x.grad is one cast of an fp32 sum).
    acc = accumulate_dtype(call.x.dtype)
    x = call.x.to(acc)
    z = POOLS[call.pool](x)
    a = F.linear(z, call.w1.to(acc), None if call.b1 is None else call.b1.to(acc))
    h = ACTIVATIONS[call.activation](a)
    g = F.linear(h, call.w2.to(acc), None if call.b2 is None else call.b2.to(acc))
    return scale_epilogue(x, GATES[call.gate](g), call.residual, call.out_activation, call.x.dtype)


def scale_epilogue(x: torch.Tensor, s: torch.Tensor, residual, out_activation: str,
                   dtype: torch.dtype) -> torch.Tensor:
    """out_activation(s·x + residual) in x's (accumulation) dtype, rounded once to `dtype`:
    every composition's end (the SE op's, the staged forms', the block tail's)."""
    y = x * s[:, :, None, None]
    if residual is not None:
        y = y + residual.to(x.dtype)
    activation = OUT_ACTIVATIONS[out_activation]
    if activation is not None:
        y = activation(y)
    return y.to(dtype)


class TorchBackend(dispatch.Backend):
    name = "torch"  # any device and dtype: the declarations' defaults
    SUPPORTED_OPTIONS = {"activation": tuple(ACTIVATIONS), "gate": tuple(GATES),
                         "pool": tuple(POOLS), "out_activation": tuple(OUT_ACTIVATIONS)}

    def run(self, call: SECall) -> torch.Tensor:
        return torch_forward(call)

    def staged_refusals(self, call) -> list[str]:
        return []

    def run_staged(self, call):
        return call.composition()


dispatch.register(TorchBackend())
