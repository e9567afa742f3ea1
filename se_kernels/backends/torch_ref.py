"""The "torch" backend: SE as a composition of PyTorch ops.

It is the fallback that runs anywhere, checked like every backend against the float64
oracle of tests/oracle.py; autograd differentiates it. It follows the kernels' numerics:
pooling, MLP and scale in fp32 (fp64 for fp64), one rounding to x's dtype at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dispatch
from .._ops import accumulate_dtype
from ..vocabulary import AVG, MAX, OUT_RELU, RELU, SIGMOID
from ..options import SECall


def hardsigmoid(g: torch.Tensor) -> torch.Tensor:
    """(g + 3) / 6 clamped to [0, 1], whose autograd derivative is 1/6 on (-3, 3) rounded
    once in g's dtype: F.hardsigmoid's fp64 backward multiplies by a float32 1/6. Exported
    graphs (torch.export, ONNX), which hold no backward, keep the one hardsigmoid operator."""
    if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
        return F.hardsigmoid(g)
    return torch.where((g > -3) & (g < 3), (g + 3) / 6, (g > 0).to(g.dtype))


def reference_forward(call: SECall) -> torch.Tensor:
    # Everything in the accumulation dtype from the start, so that the backward, too,
    # rounds each gradient to its dtype once (x.grad is one cast of an fp32 sum).
    acc = accumulate_dtype(call.x.dtype)
    x = call.x.to(acc)
    if call.pool == AVG:
        z = x.mean(dim=(2, 3))
    elif call.pool == MAX:
        z = x.amax(dim=(2, 3))
    else:
        z = 0.5 * x.mean(dim=(2, 3)) + 0.5 * x.amax(dim=(2, 3))
    a = F.linear(z, call.w1.to(acc), None if call.b1 is None else call.b1.to(acc))
    h = F.relu(a) if call.activation == RELU else F.silu(a)
    g = F.linear(h, call.w2.to(acc), None if call.b2 is None else call.b2.to(acc))
    s = torch.sigmoid(g) if call.gate == SIGMOID else hardsigmoid(g)
    y = x * s[:, :, None, None]
    if call.residual is not None:
        y = y + call.residual.to(acc)
    if call.out_activation == OUT_RELU:
        y = F.relu(y)
    return y.to(call.x.dtype)


class TorchBackend(dispatch.Backend):
    name = "torch"  # any device and dtype: the declarations' defaults

    def run(self, call: SECall) -> torch.Tensor:
        return reference_forward(call)


dispatch.register(TorchBackend())
