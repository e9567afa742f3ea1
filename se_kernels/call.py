"""Turns squeeze_excitation's arguments into one validated SECall, shared by every backend.

Errors name the argument and what was expected: ValueError for shapes and option names,
TypeError for types, dtypes and devices (the checks themselves are the ops' contract, in
se_kernels._ops).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._ops import check_forward_args
from .options import AVG, NAMES, RELU, SIGMOID, normalize_out_activation

__all__ = ["SECall", "make_call"]


class SECall(NamedTuple):
    """One validated SE call: tensors with w1 [S, C], w2 [C, S], and option names as the
    ops' schemas spell them. A named tuple (cheaper to build than a frozen dataclass, which
    matters at batch 1) whose fields are the ops' positional arguments, in their order."""

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

    KERNEL_OPTIONS = tuple(NAMES)  # the option arguments the kernels take: all of them

    def op_args(self) -> tuple:
        """Positional arguments of se_forward / se_forward_triton."""
        return tuple(self)

    def wants_gradient(self) -> bool:
        """Whether autograd will record this call: grad mode on and a tensor requiring grad."""
        if not torch.is_grad_enabled():
            return False
        return (self.x.requires_grad or self.w1.requires_grad or self.w2.requires_grad
                or (self.b1 is not None and self.b1.requires_grad)
                or (self.b2 is not None and self.b2.requires_grad)
                or (self.residual is not None and self.residual.requires_grad))


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
    Tensor = torch.Tensor
    if not (isinstance(x, Tensor) and isinstance(w1, Tensor) and isinstance(w2, Tensor)
            and (b1 is None or isinstance(b1, Tensor)) and (b2 is None or isinstance(b2, Tensor))
            and (residual is None or isinstance(residual, Tensor))):
        for name, value, optional in (("x", x, False), ("w1", w1, False), ("w2", w2, False),
                                      ("b1", b1, True), ("b2", b2, True),
                                      ("residual", residual, True)):
            _tensor(name, value, optional)
    w1, w2 = _as_matrix(w1), _as_matrix(w2)
    out_activation = normalize_out_activation(out_activation)
    dtype = x.dtype
    if (w1.dtype != dtype or w2.dtype != dtype or (b1 is not None and b1.dtype != dtype)
            or (b2 is not None and b2.dtype != dtype)) and torch.is_autocast_enabled(x.device.type):
        # Under autocast the FCs run in x's precision, as nn.Conv2d's would.
        w1, b1, w2, b2 = (None if t is None else t.to(dtype) for t in (w1, b1, w2, b2))
    check_forward_args(x, w1, b1, w2, b2, residual, activation, gate, pool, out_activation)
    return SECall(x, w1, b1, w2, b2, residual, activation, gate, pool, out_activation)
