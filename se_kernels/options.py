"""Validation of squeeze_excitation's arguments into one SECall, shared by every backend.

Errors name the argument and what was expected: ValueError for shapes and option names,
TypeError for types, dtypes and devices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ACTIVATIONS = ("relu", "silu")
GATES = ("sigmoid", "hardsigmoid")
POOLS = ("avg", "max", "avgmax")
OUT_ACTIVATIONS = ("none", "relu")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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

    @property
    def squeeze_channels(self) -> int:
        return self.w1.shape[0]


def _choice(name: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _as_matrix(name: str, w: torch.Tensor, shape: tuple[int, int], meaning: str) -> torch.Tensor:
    """Accept [rows, cols] or a 1x1 conv weight [rows, cols, 1, 1] (viewed, not copied)."""
    if w.dim() == 4 and w.shape[2:] == (1, 1):
        w = w.flatten(1)
    if tuple(w.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)} ({meaning}) or "
                         f"{list(shape) + [1, 1]}, got {list(w.shape)}")
    return w


def normalize_out_activation(value) -> str:
    if value is None or value in ("none", "identity"):
        return "none"
    if value == "relu":
        return "relu"
    raise ValueError(f"out_activation must be None or 'relu', got {value!r}")


def make_call(x, w1, b1, w2, b2, *, activation="relu", gate="sigmoid", pool="avg",
              residual=None, out_activation=None) -> SECall:
    x = _tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, C, H, W], got {x.dim()}-D with shape {list(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    n, c, h, w = x.shape
    if c < 1 or h < 1 or w < 1:
        raise ValueError(f"x must have C, H and W >= 1, got shape {list(x.shape)}")
    w1 = _tensor("w1", w1)
    if w1.dim() not in (2, 4) or w1.shape[0] < 1:
        raise ValueError(f"w1 must be [squeeze_channels >= 1, C] (or a 1x1 conv weight), "
                         f"got shape {list(w1.shape)}")
    s = w1.shape[0]
    w1 = _as_matrix("w1", w1, (s, c), f"squeeze_channels x C with C={c} from x")
    w2 = _as_matrix("w2", _tensor("w2", w2), (c, s), f"C x squeeze_channels with C={c}, S={s}")
    b1 = None if b1 is None else _tensor("b1", b1)
    b2 = None if b2 is None else _tensor("b2", b2)
    residual = None if residual is None else _tensor("residual", residual)
    for name, t, shape in (("b1", b1, (s,)), ("b2", b2, (c,)), ("residual", residual, tuple(x.shape))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")

    weights = {"w1": w1, "b1": b1, "w2": w2, "b2": b2}
    if any(t is not None and t.dtype != x.dtype for t in weights.values()) and \
            torch.is_autocast_enabled(x.device.type):
        # Under autocast the FCs run in x's precision, as nn.Conv2d's would.
        weights = {k: None if t is None else t.to(x.dtype) for k, t in weights.items()}
    for name, t in (*weights.items(), ("residual", residual)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have dtype {x.dtype} like x, got {t.dtype}")
        if t.device != x.device:
            raise TypeError(f"{name} must be on device {x.device} like x, got {t.device}")
    return SECall(x, weights["w1"], weights["b1"], weights["w2"], weights["b2"], residual,
                  _choice("activation", activation, ACTIVATIONS), _choice("gate", gate, GATES),
                  _choice("pool", pool, POOLS), normalize_out_activation(out_activation))
