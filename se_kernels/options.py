"""Turns squeeze_excitation's arguments into one validated SECall, shared by every backend.

Errors name the argument and what was expected: ValueError for shapes and option names,
TypeError for types, dtypes and devices (the checks themselves are the ops' contract, in
se_kernels._ops).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._ops import check_forward_args
from .vocabulary import AVG, RELU, SIGMOID, normalize_out_activation

__all__ = ["SECall", "make_call"]


@dataclass(frozen=True)
class SECall:
    """One validated SE call: tensors with w1 [S, C], w2 [C, S], and option names as the
    ops' schemas spell them."""

    x: torch.Tensor
    w1: torch.Tensor
    b1: torch.Tensor | None
    w2: torch.Tensor
    b2: torch.Tensor | None
    residual: torch.Tensor | None
    activation: str
    gate: str
    pool: str
    out_activation: str

    def op_args(self) -> tuple:
        """Positional arguments of se_forward / se_forward_triton."""
        return (self.x, self.w1, self.b1, self.w2, self.b2, self.residual, self.activation,
                self.gate, self.pool, self.out_activation)


def _tensor(name: str, value, optional: bool = False) -> torch.Tensor | None:
    if value is None and optional:
        return None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _as_matrix(w: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv weight [rows, cols, 1, 1] as the matrix it is (a view, no copy)."""
    return w.flatten(1) if w.dim() == 4 and w.shape[2:] == (1, 1) else w


def make_call(x, w1, b1, w2, b2, *, activation=RELU, gate=SIGMOID, pool=AVG,
              residual=None, out_activation=None) -> SECall:
    x, w1, w2 = _tensor("x", x), _as_matrix(_tensor("w1", w1)), _as_matrix(_tensor("w2", w2))
    b1, b2 = _tensor("b1", b1, optional=True), _tensor("b2", b2, optional=True)
    residual = _tensor("residual", residual, optional=True)
    out_activation = normalize_out_activation(out_activation)
    weights = (w1, b1, w2, b2)
    if any(t is not None and t.dtype != x.dtype for t in weights) and \
            torch.is_autocast_enabled(x.device.type):
        # Under autocast the FCs run in x's precision, as nn.Conv2d's would.
        w1, b1, w2, b2 = (None if t is None else t.to(x.dtype) for t in weights)
    check_forward_args(x, w1, b1, w2, b2, residual, activation, gate, pool, out_activation)
    return SECall(x, w1, b1, w2, b2, residual, activation, gate, pool, out_activation)
