"""The SE block's forward and backward written out from its equations, in float64, with a
rigorous bound on how far a correct kernel may land from it.

Nothing here calls se_kernels or autograd: every gradient is the hand-derived formula of
the block (squeeze, two FCs, gate, scale, residual, output ReLU), so the oracle is
independent of every backend, the "torch" one included. Its conventions:

- hardsigmoid(g) = (g + 3) / 6 clamped to [0, 1], derivative exactly 1/6 on the open
  interval (-3, 3) and 0 elsewhere (no float32 1/6 anywhere);
- ReLU's derivative is [a > 0]; the output ReLU passes the gradient where out > 0;
- max pooling's gradient is shared equally by every position that holds the maximum, as
  torch.amax's is.

The bound. The kernels read the inputs in their dtype, accumulate in fp32 (fp64 for fp64)
and round each result once to its dtype. The oracle starts from the same rounded inputs,
so the only differences are (1) the accumulation's rounding and (2) the final rounding.
(1) is bounded by first-order forward error analysis: every quantity carries an absolute
error bound `e` next to its value. A sum or dot product of n terms, in any order or split
into any pieces, is off by at most gamma(n) = n*u/(1 - n*u) times the sum of the terms'
magnitudes (Higham, Accuracy and Stability of Numerical Algorithms, 3.1); products add
their operands' errors times the other magnitude plus u of the result; a function adds its
Lipschitz constant times its input's error, and a library exp/sigmoid (also an
approximate GPU one) at most (32 + |x|) u relative. u is the accumulation dtype's unit
roundoff, doubled to cover the oracle's own float64 rounding. (2) adds u_out of the
result's magnitude (2^-8 for bf16, 2^-11 for fp16) and half the dtype's smallest
subnormal. For bf16 the bound is then about 0.4% of a value plus fp32-level terms: far
below a 5% error.

Decisions that rounding can flip are treated explicitly. Max pooling compares the same
rounded inputs as the kernels, so its argmax and tie count are exact. Where the reference
y lies within its error bound of 0, either output-ReLU decision is correct: dy there
carries |dout| as its error, which bounds what a flipped decision changes in dx, the
residual's gradient and, summed, in ds (`relu_uncertain` marks those positions; the caller
checks that the kernel's flips stay among them and counts them). A hidden ReLU (a near 0)
or a hardsigmoid edge (g near +-3) within its bound has both outcomes enumerated by
`decision_variants`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

F64 = torch.float64
GRAD_NAMES = ("x", "w1", "b1", "w2", "b2", "residual")
ONE_SIXTH = 1.0 / 6.0  # float64: the exact 1/6 rounded once


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return F64 if dtype == F64 else torch.float32


@dataclass
class Bounded:
    """A float64 value and an absolute bound on a correct fp32/fp64 kernel's error in it."""
    v: torch.Tensor
    e: torch.Tensor

    @property
    def mag(self) -> torch.Tensor:
        return self.v.abs() + self.e


class Analysis:
    """Error-bound arithmetic at unit roundoff u."""

    def __init__(self, u: float):
        self.u = u

    def gamma(self, n: int) -> float:
        nu = max(n, 1) * self.u
        return nu / (1 - nu)

    def exact(self, v: torch.Tensor) -> Bounded:
        return Bounded(v, torch.zeros_like(v))

    def linear(self, x: Bounded, w: torch.Tensor, b: torch.Tensor | None) -> Bounded:
        """x @ w.T (+ b), w exact: n = in_features (+1 for the bias) terms per output."""
        n = w.shape[1] + (b is not None)
        v = x.v @ w.t()
        e = x.e @ w.abs().t() + self.gamma(n) * (x.mag @ w.abs().t())
        if b is not None:
            v = v + b
            e = e + self.gamma(n) * b.abs()
        return Bounded(v, e)

    def matmul_exact_right(self, x: Bounded, w: torch.Tensor) -> Bounded:
        """x @ w, w exact, n = w.shape[0] terms."""
        return Bounded(x.v @ w, x.e @ w.abs() + self.gamma(w.shape[0]) * (x.mag @ w.abs()))

    def outer_sum(self, a: Bounded, b: Bounded) -> Bounded:
        """a.T @ b (sum over the batch), both inexact."""
        v = a.v.t() @ b.v
        e = a.e.t() @ b.mag + a.v.abs().t() @ b.e + self.gamma(a.v.shape[0]) * (a.mag.t() @ b.mag)
        return Bounded(v, e)

    def batch_sum(self, a: Bounded) -> Bounded:
        return Bounded(a.v.sum(0), a.e.sum(0) + self.gamma(a.v.shape[0]) * a.mag.sum(0))

    def mul(self, a: Bounded, b: Bounded) -> Bounded:
        v = a.v * b.v
        return Bounded(v, a.e * b.mag + a.v.abs() * b.e + self.u * (a.mag * b.mag))

    def scale(self, a: Bounded, c: float) -> Bounded:
        """a * c for a float64 constant c that the kernel may hold rounded to its dtype."""
        v = a.v * c
        return Bounded(v, a.e * abs(c) + 2 * self.u * a.mag * abs(c))

    def add(self, a: Bounded, b: Bounded) -> Bounded:
        v = a.v + b.v
        return Bounded(v, a.e + b.e + self.u * (a.mag + b.mag))

    def transcendental(self, x: Bounded, value: torch.Tensor, lipschitz: float, magnitude=None) -> Bounded:
        """f(x) for f with |f'| <= lipschitz, evaluated with relative error (32 + |x|) u."""
        mag = value.abs() if magnitude is None else magnitude
        return Bounded(value, lipschitz * x.e + (32 + x.v.abs()) * self.u * mag)


@dataclass
class Decisions:
    """Overrides for the decisions that rounding can flip: hidden ReLU [a > 0] [N, S],
    hardsigmoid's active region (-3 < g < 3) [N, C]. None: the reference's own."""
    hidden: torch.Tensor | None = None
    gate: torch.Tensor | None = None


@dataclass
class OracleResult:
    values: dict          # name -> float64 tensor (None for absent inputs)
    bounds: dict          # name -> float64 tensor of allowed |error|
    relu_uncertain: torch.Tensor    # [N, C, H, W] bool: output ReLU within rounding of y = 0
    uncertain_hidden: torch.Tensor  # [N, S] bool: hidden ReLU within rounding of a = 0
    uncertain_gate: torch.Tensor    # [N, C] bool: hardsigmoid within rounding of g = +-3
    a: torch.Tensor  # [N, S] hidden pre-activation
    g: torch.Tensor  # [N, C] gate logit
    y: torch.Tensor  # [N, C, H, W] before the output activation


# ---- the options (DESIGN.md §1.3), one entry each -------------------------------------
# An activation maps the bounded pre-activation a to (h, the positions where rounding may flip
# a decision, what its derivative needs); its derivative maps (dh, that) to da. A gate does
# the same for g -> s and ds -> dg. `decision` is the override of Decisions for it, if any.


def _relu(an, a, decision):
    alive = a.v > 0 if decision is None else decision
    uncertain = (a.v.abs() <= a.e) & (a.e > 0)
    return Bounded(torch.where(alive, a.v, 0.0), a.e), uncertain, alive  # 1-Lipschitz


def _relu_grad(an, a, dh, alive):
    return Bounded(torch.where(alive, dh.v, 0.0), torch.where(alive, dh.e, 0.0))


def _silu(an, a, decision):
    sig_a = torch.sigmoid(a.v)
    h = an.transcendental(a, a.v * sig_a, 1.1)  # |silu'| <= 1.1
    return h, torch.zeros_like(a.v, dtype=torch.bool), sig_a


def _silu_grad(an, a, dh, sig_a):
    silu_p = sig_a * (1 + a.v * (1 - sig_a))
    return an.mul(dh, an.transcendental(a, silu_p, 0.5, magnitude=1 + a.v.abs()))  # |silu''| <= 0.5


def _sigmoid(an, g, decision):
    s = an.transcendental(g, torch.sigmoid(g.v), 0.25)
    return s, torch.zeros_like(g.v, dtype=torch.bool), s


def _sigmoid_grad(an, g, ds, s):
    sp = s.v * (1 - s.v)
    return an.mul(ds, Bounded(sp, s.e * (1 + s.e) + 3 * an.u * sp))


def _hardsigmoid(an, g, decision):
    inside = (g.v > -3) & (g.v < 3) if decision is None else decision
    s_v = torch.where(inside, (g.v + 3) / 6, torch.where(g.v > 0, 1.0, 0.0))
    # (g + 3) * 1/6 or g * 1/6 + 1/2 with a rounded 1/6: a few u of |g|/6 + 1/2.
    s = Bounded(s_v, g.e * ONE_SIXTH + 4 * an.u * (g.v.abs() * ONE_SIXTH + 0.5))
    # s may round to 0 or 1 within 6 u of the edges: either region is then correct.
    band = g.e + 12 * an.u * (g.v.abs() + 3)
    uncertain = (((g.v + 3).abs() <= band) | ((g.v - 3).abs() <= band)) & (band > 0)
    return s, uncertain, inside


def _hardsigmoid_grad(an, g, ds, inside):
    return an.scale(Bounded(torch.where(inside, ds.v, 0.0), torch.where(inside, ds.e, 0.0)), ONE_SIXTH)


ACTIVATIONS = {"relu": (_relu, _relu_grad), "silu": (_silu, _silu_grad)}
GATES = {"sigmoid": (_sigmoid, _sigmoid_grad), "hardsigmoid": (_hardsigmoid, _hardsigmoid_grad)}
POOL_WEIGHTS = {"avg": (1.0, 0.0), "max": (0.0, 1.0), "avgmax": (0.5, 0.5)}  # (w_avg, w_max)
OUT_RELU = {"none": False, "relu": True}


def se_oracle(opts, inputs: dict, dout: torch.Tensor, *, out_dtype: torch.dtype,
              decisions: Decisions | None = None, truncates: bool = False) -> OracleResult:
    """Forward and backward of the SE block, float64, with error bounds for a kernel that
    accumulates in accumulate_dtype(out_dtype) and rounds its results to out_dtype.

    opts: anything with activation, gate, pool, out_activation attributes.
    inputs: x, w1, b1, w2, b2, residual (the rounded tensors the kernel got; None if absent).
    truncates: the final conversion to out_dtype truncates instead of rounding to nearest
    (Triton's interpreter does so for bf16): one unit in the last place instead of half.
    """
    decisions = decisions or Decisions()
    u_acc = unit_roundoff(accumulate_dtype(out_dtype)) + unit_roundoff(F64)
    an = Analysis(u_acc)
    t = {k: None if v is None else v.detach().to(device="cpu", dtype=F64) for k, v in inputs.items()}
    x4, w1, b1, w2, b2, r4 = t["x"], t["w1"], t["b1"], t["w2"], t["b2"], t["residual"]
    w1 = w1.reshape(w1.shape[0], -1)
    w2 = w2.reshape(w2.shape[0], -1)
    n, c, hh, ww = x4.shape
    p = hh * ww
    x = x4.reshape(n, c, p)
    r = None if r4 is None else r4.reshape(n, c, p)
    dout = dout.detach().to(device="cpu", dtype=F64).reshape(n, c, p)

    # ---- forward ----
    # squeeze: z = mean (sum of P terms, then * 1/P), max (exact), or their halves' sum
    if p == 0:
        raise ValueError("the oracle needs H*W >= 1")
    z_avg = Bounded(x.sum(-1) / p, an.gamma(p + 2) * x.abs().sum(-1) / p)
    x_max = x.amax(-1)
    is_max = x == x_max[..., None]
    ties = is_max.sum(-1).to(F64)
    w_avg, w_max = POOL_WEIGHTS[opts.pool]
    if w_max == 0:
        z = z_avg
    elif w_avg == 0:
        z = an.exact(x_max)
    else:
        z = an.add(an.scale(z_avg, w_avg), an.exact(w_max * x_max))

    activation, activation_grad = ACTIVATIONS[opts.activation]
    gate, gate_grad = GATES[opts.gate]
    a = an.linear(z, w1, b1)
    h, uncertain_hidden, hidden_state = activation(an, a, decisions.hidden)
    g = an.linear(h, w2, b2)
    s, uncertain_gate, gate_state = gate(an, g, decisions.gate)

    sx = an.mul(Bounded(s.v[..., None].expand_as(x), s.e[..., None].expand_as(x)), an.exact(x))
    y = sx if r is None else an.add(sx, an.exact(r))
    relu_uncertain = torch.zeros_like(x, dtype=torch.bool)
    out_relu = OUT_RELU[opts.out_activation or "none"]
    if out_relu:
        out_bound = final_bound(y, out_dtype, truncates)
        relu_uncertain = (y.v.abs() <= out_bound) & (out_bound > 0)
        out = Bounded(torch.where(y.v > 0, y.v, 0.0), y.e)
    else:
        out = y

    # ---- backward ----
    # dy = dout * [out > 0]; where the decision is within rounding, either outcome is
    # correct: dy carries |dout| as its error there, which bounds what a flip changes.
    dy = torch.where(y.v > 0, dout, 0.0) if out_relu else dout
    dy_e = torch.where(relu_uncertain, dout.abs(), 0.0)
    ds = Bounded((dy * x).sum(-1), an.gamma(p) * (dy * x).abs().sum(-1) + (dy_e * x.abs()).sum(-1))
    dg = gate_grad(an, g, ds, gate_state)
    dw2 = an.outer_sum(dg, h)
    db2 = an.batch_sum(dg)
    dh = an.matmul_exact_right(dg, w2)
    da = activation_grad(an, a, dh, hidden_state)
    dw1 = an.outer_sum(da, z)
    db1 = an.batch_sum(da)
    dz = an.matmul_exact_right(da, w1)

    dys = an.mul(Bounded(dy, dy_e), Bounded(s.v[..., None].expand_as(x), s.e[..., None].expand_as(x)))
    share = torch.zeros_like(x)
    share_e = torch.zeros_like(x)
    if w_avg:
        share = share + (w_avg / p) * dz.v[..., None]
        share_e = share_e + (w_avg / p) * (dz.e + 2 * an.u * dz.mag)[..., None]
    if w_max:
        per_tie = w_max * dz.v / ties
        per_tie_e = w_max * (dz.e + 3 * an.u * dz.mag) / ties
        share = share + torch.where(is_max, per_tie[..., None], 0.0)
        share_e = share_e + torch.where(is_max, per_tie_e[..., None], 0.0)
    dx = an.add(dys, Bounded(share, share_e))

    values = {"out": out, "x": dx, "w1": dw1, "b1": db1 if b1 is not None else None,
              "w2": dw2, "b2": db2 if b2 is not None else None,
              "residual": Bounded(dy, dy_e) if r is not None else None}
    shapes = {"out": x4.shape, "x": x4.shape, "residual": x4.shape,
              "w1": t["w1"].shape, "w2": t["w2"].shape}
    result_values, result_bounds = {}, {}
    for name, b in values.items():
        if b is None:
            result_values[name] = result_bounds[name] = None
            continue
        shape = shapes.get(name, b.v.shape)
        result_values[name] = b.v.reshape(shape)
        result_bounds[name] = final_bound(b, out_dtype, truncates).reshape(shape)
    return OracleResult(result_values, result_bounds, relu_uncertain.reshape(x4.shape),
                        uncertain_hidden, uncertain_gate, a.v, g.v, y.v.reshape(x4.shape))


def final_bound(b: Bounded, dtype: torch.dtype, truncates: bool = False) -> torch.Tensor:
    """Accumulation error, then one rounding to dtype (half its smallest subnormal at worst;
    twice that for a truncating conversion)."""
    if dtype == F64:
        return b.e + unit_roundoff(F64) * b.mag
    fi = torch.finfo(dtype)
    ulps = 2 if truncates else 1
    return b.e + ulps * (unit_roundoff(dtype) * b.mag + fi.tiny * fi.eps / 2)


def decision_variants(result: OracleResult, limit: int = 6):
    """Decisions to try: the reference's own first, then every combination of outcomes of
    the hidden-ReLU and hardsigmoid-edge decisions that lie within rounding."""
    yield None
    hidden_idx = result.uncertain_hidden.nonzero().tolist()
    gate_idx = result.uncertain_gate.nonzero().tolist()
    k = len(hidden_idx) + len(gate_idx)
    if k == 0:
        return
    if k > limit:
        raise AssertionError(f"{k} hidden-ReLU/hardsigmoid decisions lie within rounding of their "
                             "kink: choose inputs away from them")
    base_hidden = result.a > 0
    base_gate = (result.g > -3) & (result.g < 3)
    for flips in itertools.product((False, True), repeat=k):
        if not any(flips):
            continue
        hidden, gate = base_hidden.clone(), base_gate.clone()
        for (i, j), flip in zip(hidden_idx, flips[:len(hidden_idx)]):
            hidden[i, j] ^= flip
        for (i, j), flip in zip(gate_idx, flips[len(hidden_idx):]):
            gate[i, j] ^= flip
        yield Decisions(hidden=hidden, gate=gate)
