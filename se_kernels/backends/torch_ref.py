"""The "torch" backend: SE as a composition of PyTorch ops.

It is the oracle of the tests (run in fp64) and the fallback that runs anywhere. Autograd
differentiates it, so its gradients check the hand-derived backward of the kernels. It
follows the kernels' numerics: pooling, MLP and scale in fp32 (fp64 for fp64), one rounding
to x's dtype at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dispatch
from .._ops import accumulate_dtype
from ..vocabulary import AVG, MAX, OUT_RELU, RELU, SIGMOID
from ..options import SECall


def reference_forward(call: SECall) -> torch.Tensor:
    x = call.x
    acc = accumulate_dtype(x.dtype)
    if call.pool == AVG:
        z = x.mean(dim=(2, 3), dtype=acc)
    elif call.pool == MAX:
        z = x.amax(dim=(2, 3)).to(acc)
    else:
        z = 0.5 * x.mean(dim=(2, 3), dtype=acc) + 0.5 * x.amax(dim=(2, 3)).to(acc)
    a = F.linear(z, call.w1.to(acc), None if call.b1 is None else call.b1.to(acc))
    h = F.relu(a) if call.activation == RELU else F.silu(a)
    g = F.linear(h, call.w2.to(acc), None if call.b2 is None else call.b2.to(acc))
    s = torch.sigmoid(g) if call.gate == SIGMOID else F.hardsigmoid(g)
    y = x * s[:, :, None, None]
    if call.residual is not None:
        y = y + call.residual
    if call.out_activation == OUT_RELU:
        y = F.relu(y)
    return y.to(x.dtype)


class TorchBackend(dispatch.Backend):
    name = "torch"  # any device and dtype: the declarations' defaults

    def run(self, call: SECall) -> torch.Tensor:
        return reference_forward(call)


dispatch.register(TorchBackend())
