"""squeeze_excitation: the SE block as one differentiable function."""

from __future__ import annotations

import warnings

import torch

from . import dispatch
from .call import make_call
from .options import AVG, RELU, SIGMOID


def squeeze_excitation(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    *,
    activation: str = RELU,
    gate: str = SIGMOID,
    pool: str = AVG,
    residual: torch.Tensor | None = None,
    out_activation: str | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """out = out_activation(gate(w2 @ activation(w1 @ pool(x) + b1) + b2) * x + residual).

    Args:
        x: [N, C, H, W], float16/bfloat16/float32/float64, NCHW or channels_last.
        w1, b1: the squeeze FC, [S, C] (or a [S, C, 1, 1] conv weight) and [S] or None.
        w2, b2: the excite FC, [C, S] (or [C, S, 1, 1]) and [C] or None.
        activation: between the FCs, one of se_kernels.options.ACTIVATIONS: "relu", "silu",
            "gelu", "gelu_tanh", "hardswish", "leaky_relu" (slope 0.01).
        gate: on the per-channel scale, one of se_kernels.options.GATES: "sigmoid",
            "hardsigmoid", "tanh", "relu".
        pool: "avg", "max" or "avgmax" (half of each), the squeeze.
        residual: None or a tensor shaped like x, added after scaling.
        out_activation: None or "relu", applied last (SE-ResNet's add + ReLU).
        backend: "auto", "cuda", "triton", "cpu" or "torch"; see se_kernels.dispatch.

    The output has x's dtype and layout. Pooling, the MLP and the scale are computed in
    fp32 (fp64 for fp64 inputs).
    """
    if torch.jit.is_tracing():
        # torch.jit.trace (and the TorchScript ONNX exporter) traces sizes as tensors and
        # warns where the checks compare them; a trace is of fixed shapes, all they check.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            call = make_call(x, w1, b1, w2, b2, activation=activation, gate=gate, pool=pool,
                             residual=residual, out_activation=out_activation)
    else:
        call = make_call(x, w1, b1, w2, b2, activation=activation, gate=gate, pool=pool,
                         residual=residual, out_activation=out_activation)
    return dispatch.select(call, backend).run(call)
