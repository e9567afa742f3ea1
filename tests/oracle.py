"""The SE block's forward and backward written out from its equations, in float64, with a
rigorous bound on how far a correct kernel may land from it.

Nothing here calls se_kernels or autograd: every gradient is the hand-derived formula of
the block (squeeze, two FCs, gate, scale, residual, output ReLU), so the oracle is
independent of every backend, the "torch" one included. Its conventions:

- hardsigmoid(g) = (g + 3) / 6 clamped to [0, 1], derivative exactly 1/6 on the open
  interval (-3, 3) and 0 elsewhere (no float32 1/6 anywhere); hardswish's derivative is
  torch's: 0 below -3, a/3 + 1/2 on [-3, 3], 1 above;
- ReLU's derivative is [a > 0] (hidden, gate); the output ReLU passes the gradient where
  out > 0;
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
checks that the kernel's flips stay among them and counts them). A kink of the hidden
activation or the gate (ReLU at 0, hardsigmoid and hardswish at +-3) within its bound has
both outcomes enumerated by `decision_variants`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

F64 = torch.float64
GRAD_NAMES = ("x", "w1", "b1", "w2", "b2", "residual")
ONE_SIXTH = 1.0 / 6.0  # float64: the exact 1/6 rounded once
LEAKY_RELU_SLOPE = 0.01  # nn.LeakyReLU's default


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
    """Overrides for the decisions that rounding can flip, as region indices (which side of
    each kink a value is on, see _regions): hidden activation [N, S], gate [N, C]. None: the
    reference's own."""
    hidden: torch.Tensor | None = None
    gate: torch.Tensor | None = None


@dataclass
class OracleResult:
    values: dict          # name -> float64 tensor (None for absent inputs)
    bounds: dict          # name -> float64 tensor of allowed |error|
    relu_uncertain: torch.Tensor    # [N, C, H, W] bool: output ReLU within rounding of y = 0
    hidden: "Kinks"                 # [N, S]: the hidden activation's regions
    gate: "Kinks"                   # [N, C]: the gate's regions
    a: torch.Tensor  # [N, S] hidden pre-activation
    g: torch.Tensor  # [N, C] gate logit
    y: torch.Tensor  # [N, C, H, W] before the output activation


# ---- the options (DESIGN.md §1.3), one entry each -------------------------------------
# An activation maps the bounded pre-activation a to (h, its Kinks); its derivative maps
# (dh, the regions) to da. A gate does the same for g -> s and ds -> dg. A function with a
# kink (a point where its derivative jumps) has regions 0, 1, ... between its kinks;
# wherever rounding may put a value on either side of one, both outcomes are correct, and
# `decision_variants` tries each.


# Where each option's function has a kink (its derivative jumps), by option name; the
# others are smooth. ReLU is the same function as an activation and as a gate.
KINKS = {"relu": (0.0,), "leaky_relu": (0.0,), "hardswish": (-3.0, 3.0), "hardsigmoid": (-3.0, 3.0)}


def kink_distance(v: torch.Tensor, option: str) -> torch.Tensor | None:
    """How far each value is from the nearest kink of `option`'s function (None: smooth)."""
    points = KINKS.get(option)
    if points is None:
        return None
    return torch.stack([(v - point).abs() for point in points]).amin(0)


@dataclass
class Kinks:
    """Which region each value is in, where rounding may move it into a neighbouring one,
    and which region that would be."""
    region: torch.Tensor       # int64
    uncertain: torch.Tensor    # bool
    alternative: torch.Tensor  # int64: the other side of the nearest kink, where uncertain

    @staticmethod
    def none(v: torch.Tensor) -> "Kinks":
        zeros = torch.zeros_like(v, dtype=torch.int64)
        return Kinks(zeros, torch.zeros_like(v, dtype=torch.bool), zeros)


def _regions(v: Bounded, region: torch.Tensor, kinks: tuple[float, ...], band: torch.Tensor,
             decision: torch.Tensor | None) -> Kinks:
    """Kinks of v for the sorted `kinks`, region k lying between kinks k - 1 and k (the
    function's own convention decides a value exactly at a kink); a decision overrides
    the region."""
    uncertain = torch.zeros_like(v.v, dtype=torch.bool)
    alternative = region.clone()
    for k, point in enumerate(kinks):
        near = ((v.v - point).abs() <= band) & (band > 0)
        uncertain |= near
        alternative = torch.where(near, torch.where(region > k, k, k + 1), alternative)
    return Kinks(region if decision is None else decision, uncertain, alternative)


def _pick(region: torch.Tensor, *values) -> torch.Tensor:
    """values[region] elementwise (each a tensor or a float)."""
    out = torch.zeros(region.shape, dtype=F64)
    for k, value in enumerate(values):
        out = torch.where(region == k, value, out)
    return out


def _relu(an, a, decision):
    kinks = _regions(a, (a.v > 0).long(), KINKS["relu"], a.e, decision)
    return Bounded(torch.where(kinks.region == 1, a.v, 0.0), a.e), kinks  # 1-Lipschitz


def _relu_grad(an, a, dh, kinks):
    alive = kinks.region == 1
    return Bounded(torch.where(alive, dh.v, 0.0), torch.where(alive, dh.e, 0.0))


def _leaky_relu(an, a, decision):
    # a where a > 0, else slope * a with the slope rounded to the kernel's dtype.
    kinks = _regions(a, (a.v > 0).long(), KINKS["leaky_relu"], a.e, decision)
    negative = an.scale(a, LEAKY_RELU_SLOPE)
    positive = kinks.region == 1
    return Bounded(torch.where(positive, a.v, negative.v), torch.where(positive, a.e, negative.e)), kinks


def _leaky_relu_grad(an, a, dh, kinks):
    positive = kinks.region == 1
    negative = an.scale(dh, LEAKY_RELU_SLOPE)
    return Bounded(torch.where(positive, dh.v, negative.v), torch.where(positive, dh.e, negative.e))


def _silu(an, a, decision):
    return an.transcendental(a, a.v * torch.sigmoid(a.v), 1.1), Kinks.none(a.v)  # |silu'| <= 1.1


def _silu_grad(an, a, dh, kinks):
    sig_a = torch.sigmoid(a.v)
    silu_p = sig_a * (1 + a.v * (1 - sig_a))
    return an.mul(dh, an.transcendental(a, silu_p, 0.5, magnitude=1 + a.v.abs()))  # |silu''| <= 0.5


def _gelu_parts(a: torch.Tensor, tanh_form: bool):
    """GELU's value and derivative in float64 (DESIGN.md §1.3)."""
    if tanh_form:
        k, c = (2 / torch.pi) ** 0.5, 0.044715
        t = torch.tanh(k * (a + c * a ** 3))
        return 0.5 * a * (1 + t), 0.5 * (1 + t) + 0.5 * a * (1 - t * t) * k * (1 + 3 * c * a * a)
    cdf = 0.5 * (1 + torch.erf(a / 2 ** 0.5))
    return a * cdf, cdf + a * torch.exp(-0.5 * a * a) / (2 * torch.pi) ** 0.5


def _gelu_forms(tanh_form: bool):
    # |gelu'| < 1.2 and |gelu''| < 1 (both forms, with margin). A kernel computes 1 + erf or 1 + tanh,
    # which cancels for negative a: an absolute error of a few u, times |a|. The tanh form's
    # argument carries a cubic's rounding too: (1 + a^2) more of it.
    def forward(an, a, decision):
        value, _ = _gelu_parts(a.v, tanh_form)
        mag = value.abs() + a.v.abs() * (1 + a.v * a.v)
        return an.transcendental(a, value, 1.2, magnitude=mag), Kinks.none(a.v)

    def backward(an, a, dh, kinks):
        _, slope = _gelu_parts(a.v, tanh_form)
        mag = (1 + a.v.abs()) * (1 + a.v * a.v)
        return an.mul(dh, an.transcendental(a, slope, 1.0, magnitude=mag))

    return forward, backward


def _hardswish(an, a, decision):
    # torch: 0 below -3, a (a + 3) / 6 up to 3 (inclusive), a above; continuous, so a
    # flipped region moves only the derivative. Lipschitz 1.5; the clamp's a + 3 rounds.
    region = (a.v >= -3).long() + (a.v > 3).long()
    kinks = _regions(a, region, KINKS["hardswish"], a.e + 12 * an.u * (a.v.abs() + 3), decision)
    h_v = _pick(kinks.region, 0.0, a.v * (a.v + 3) * ONE_SIXTH, a.v)
    return Bounded(h_v, 1.5 * a.e + 4 * an.u * (a.v.abs() * (a.v.abs() + 3) * ONE_SIXTH + a.v.abs())), kinks


def _hardswish_grad(an, a, dh, kinks):
    middle = kinks.region == 1
    slope = _pick(kinks.region, 0.0, a.v / 3 + 0.5, 1.0)
    slope_e = torch.where(middle, a.e / 3 + 3 * an.u * (a.v.abs() / 3 + 0.5), 0.0)
    return an.mul(dh, Bounded(slope, slope_e))


def _sigmoid(an, g, decision):
    return an.transcendental(g, torch.sigmoid(g.v), 0.25), Kinks.none(g.v)


def _sigmoid_grad(an, g, ds, kinks):
    s = an.transcendental(g, torch.sigmoid(g.v), 0.25)
    sp = s.v * (1 - s.v)
    return an.mul(ds, Bounded(sp, s.e * (1 + s.e) + 3 * an.u * sp))


def _hardsigmoid(an, g, decision):
    # s may round to 0 or 1 within 6 u of the edges: either region is then correct.
    region = (g.v > -3).long() + (g.v >= 3).long()
    kinks = _regions(g, region, KINKS["hardsigmoid"], g.e + 12 * an.u * (g.v.abs() + 3), decision)
    s_v = _pick(kinks.region, 0.0, (g.v + 3) / 6, 1.0)
    # (g + 3) * 1/6 or g * 1/6 + 1/2 with a rounded 1/6: a few u of |g|/6 + 1/2.
    return Bounded(s_v, g.e * ONE_SIXTH + 4 * an.u * (g.v.abs() * ONE_SIXTH + 0.5)), kinks


def _hardsigmoid_grad(an, g, ds, kinks):
    inside = kinks.region == 1
    return an.scale(Bounded(torch.where(inside, ds.v, 0.0), torch.where(inside, ds.e, 0.0)), ONE_SIXTH)


def _tanh_value(an, g) -> Bounded:
    # 1-Lipschitz; a kernel may form tanh from exp as (1 - e)/(1 + e), which is a few u off
    # in absolute terms near 0 where tanh itself is small: magnitude 1, not |tanh|.
    return an.transcendental(g, torch.tanh(g.v), 1.0, magnitude=torch.ones_like(g.v))


def _tanh(an, g, decision):
    return _tanh_value(an, g), Kinks.none(g.v)


def _tanh_grad(an, g, ds, kinks):
    s = _tanh_value(an, g)
    sp = 1 - s.v * s.v
    return an.mul(ds, Bounded(sp, 2 * s.e * (s.v.abs() + s.e) + 3 * an.u))


ACTIVATIONS = {"relu": (_relu, _relu_grad), "silu": (_silu, _silu_grad),
               "gelu": _gelu_forms(tanh_form=False), "gelu_tanh": _gelu_forms(tanh_form=True),
               "hardswish": (_hardswish, _hardswish_grad),
               "leaky_relu": (_leaky_relu, _leaky_relu_grad)}
GATES = {"sigmoid": (_sigmoid, _sigmoid_grad), "hardsigmoid": (_hardsigmoid, _hardsigmoid_grad),
         "tanh": (_tanh, _tanh_grad), "relu": (_relu, _relu_grad)}
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
    h, hidden_kinks = activation(an, a, decisions.hidden)
    g = an.linear(h, w2, b2)
    s, gate_kinks = gate(an, g, decisions.gate)

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
    dg = gate_grad(an, g, ds, gate_kinks)
    dw2 = an.outer_sum(dg, h)
    db2 = an.batch_sum(dg)
    dh = an.matmul_exact_right(dg, w2)
    da = activation_grad(an, a, dh, hidden_kinks)
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
                        hidden_kinks, gate_kinks, a.v, g.v, y.v.reshape(x4.shape))


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
    the hidden activation's and the gate's kink decisions that lie within rounding."""
    yield None
    hidden_idx = result.hidden.uncertain.nonzero().tolist()
    gate_idx = result.gate.uncertain.nonzero().tolist()
    k = len(hidden_idx) + len(gate_idx)
    if k == 0:
        return
    if k > limit:
        raise AssertionError(f"{k} hidden-activation/gate decisions lie within rounding of their "
                             "kinks: choose inputs away from them")
    for flips in itertools.product((False, True), repeat=k):
        if not any(flips):
            continue
        hidden, gate = result.hidden.region.clone(), result.gate.region.clone()
        for kinks, regions, idx, part in ((result.hidden, hidden, hidden_idx, flips[:len(hidden_idx)]),
                                          (result.gate, gate, gate_idx, flips[len(hidden_idx):])):
            for (i, j), flip in zip(idx, part):
                if flip:
                    regions[i, j] = kinks.alternative[i, j]
        yield Decisions(hidden=hidden, gate=gate)
