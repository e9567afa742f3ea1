"""The Triton kernels of the SE block (the math and its names: DESIGN.md §1).

Imported on first use, by driver.py (importing triton costs time and may fail);
TRITON_INTERPRET is read by triton.jit here, when the kernels are defined.

Forward, for x [N, C, P] (P = H*W) in its own layout:
  _pool_kernel                 one pass over x: per-channel sums (and maxima) of H*W pieces
  _squeeze_fc_kernel           combines the pieces in a fixed order into z, then a = W1 z + b1
  _excite_fc_kernel            g = W2 act(a) + b2
  _scale_kernel                one pass: out = out_act(gate(g) * x + residual)
Backward:
  _grad_reduce_kernel          one pass over grad_out and x: ds = sum_p dy*x (and, for max
                               pooling, count = how many x equal zmax)
  _excite_fc_backward_kernel   dg = ds * gate'(g), dh = dg W2, da = dh * act'(a)
  _mlp_grads_kernel            dW2 = dg^T h, db2, dW1 = da^T z, db1 (sums over N in one
                               program), and, in the same launch, dz = da W1, turned into
                               the per-channel terms dx_avg, dx_max
  _grad_input_kernel           one pass: dx = dy * s + dx_avg + [x == zmax] dx_max,
                               dresidual = dy

The four passes over x also run the stream ops of the staged path (DESIGN.md §1.4,
stream.py), through constexpr branches that the SE launches leave off: the pool pass adds
sums of squares and minima, the scale pass a per-channel shift, the grad reduce pass sums
of dy and the dresidual store, the grad input pass an x_scale * x term; with GATE =
AS_GIVEN the map passes take their per-channel coefficients as given. With PRE_ACT (an
activation's code; NO_PROLOGUE otherwise) the four read v = act(pre_scale * x + pre_shift)
where they read x, the act tail's input prologue: the pool pass sums v, the scale pass
scales v, the grad reduce pass sums dy * v and, with STATS, dy * d, dy * d * x, d and
d * x (d = act'), the grad input pass multiplies its dy term by d.

Every reduction has a fixed order that depends only on the shape and the launch config, so
results are bit-identical from run to run (no float atomics). Values are converted to the
accumulation dtype (fp32, fp64 for fp64) right after tl.load and back right before tl.store,
which fp32 accumulation wants anyway and which sidesteps the interpreter's bf16 arithmetic
bug (triton#11584).

Both layouts run through the same kernels. A pass sees x as [groups, channels, P] with
strides: NCHW is one group of N*C rows of P contiguous pixels, channels-last is N groups of
P pixels of C contiguous channels. Triton specializes the stride that equals 1, so loads
along the contiguous axis are vectorized in both layouts where rows start on 16-byte
boundaries. NCHW rows do not when H*W is not a multiple of 8 (fp16, bf16) or 4 (fp32): the
NCHW map passes see x as one flat run instead, and the NCHW reduction passes read each
row's aligned body in vectors and its head and tail apart (_row_body), so their x-sized
accesses stay 16-byte vectors.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ... import options
from ...options import Activation, Gate, Pool

# The options' codes (se_kernels.options), which the drivers pass as constexprs; globals
# that @triton.jit code reads must be tl.constexpr.
RELU, SILU, GELU, GELU_TANH, HARDSWISH, LEAKY_RELU = (tl.constexpr(int(a)) for a in Activation)
SIGMOID, HARDSIGMOID, TANH, RELU_GATE = (tl.constexpr(int(g)) for g in Gate)
# The GATE of the map passes when they serve the stream ops, whose [N, C] coefficients come
# gated already: no option's code.
AS_GIVEN = tl.constexpr(-1)
AVG, MAX, AVGMAX = (tl.constexpr(int(Pool.AVG)), tl.constexpr(int(Pool.MAX)),
                   tl.constexpr(int(Pool.AVGMAX)))
# The PRE_ACT of the passes without an input prologue: no activation's code. With one
# (the act tail's stream ops), the passes read v = act(in_scale * x + in_shift) for x.
NO_PROLOGUE = tl.constexpr(-1)


# ---- what each kernel touches ------------------------------------------------------------
# Beside each kernel, @touches declares the pointer parameters it reads and writes, in the
# order a program touches them, each always or when a predicate of the launch's constexprs
# holds: the plan (trace.py) turns a recorded launch into byte ranges with it. A parameter
# whose constexpr branch is off gets x as a stand-in (driver.py) and is not listed then.
READ, WRITE = False, True


def _pool_uses(*pools: Pool):
    codes = {int(p) for p in pools}
    return lambda meta: meta["POOL"] in codes


def _constexpr(name: str):
    return lambda meta: bool(meta[name])


def touches(*accesses):
    """Declares a kernel's accesses: (pointer parameter, READ or WRITE, None (always) or a
    predicate of the launch's constexprs)."""
    def declare(kernel):
        kernel.accesses = accesses
        return kernel
    return declare


# The option math of DESIGN.md §1.3, one exhaustive switch per function over the codes: a
# code without its branch fails to compile (static_assert), never falls into another's.
# Irrational constants go through _const: a bare float literal is a float32 constant, which
# would be 3e-8 off in fp64 code.
SQRT_HALF = tl.constexpr(0.7071067811865476)         # 1/sqrt(2)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)      # 1/sqrt(2 pi)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)    # sqrt(2/pi)
GELU_TANH_CUBIC = tl.constexpr(0.044715)
LEAKY_RELU_SLOPE = tl.constexpr(options.LEAKY_RELU_SLOPE)


@triton.jit
def _const(value: tl.constexpr, like):
    """`value` in like's dtype, rounded once from the Python float."""
    return tl.full([1], value, like.dtype)


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _tanh(v):
    """tanh from one exp of a non-positive argument (no overflow); NaN stays NaN."""
    t = tl.exp(-2.0 * tl.abs(v))
    r = (1.0 - t) / (1.0 + t)
    return tl.where(v < 0, -r, r)


@triton.jit
def _gelu_cdf(a):
    return 0.5 * (1.0 + tl.erf(a * _const(SQRT_HALF, a)))


@triton.jit
def _gelu_tanh_inner(a):
    return _const(SQRT_2_OVER_PI, a) * (a + _const(GELU_TANH_CUBIC, a) * a * a * a)


@triton.jit
def _activation(a, ACT: tl.constexpr):
    if ACT == RELU:
        h = tl.where(a < 0, 0.0, a)  # keeps NaN, as torch.relu does
    elif ACT == SILU:
        h = a / (1.0 + tl.exp(-a))
    elif ACT == GELU:
        h = a * _gelu_cdf(a)
    elif ACT == GELU_TANH:
        h = 0.5 * a * (1.0 + _tanh(_gelu_tanh_inner(a)))
    elif ACT == HARDSWISH:
        h = a * tl.minimum(tl.maximum(a + 3.0, 0.0), 6.0) / 6.0
    elif ACT == LEAKY_RELU:
        h = tl.where(a > 0, a, a * _const(LEAKY_RELU_SLOPE, a))
    else:
        tl.static_assert(False, "unknown activation code")
    return h


@triton.jit
def _activation_grad(a, dh, ACT: tl.constexpr):
    if ACT == RELU:
        da = tl.where(a > 0, dh, 0.0)
    elif ACT == SILU:
        sig = _sigmoid(a)
        da = dh * sig * (1.0 + a * (1.0 - sig))
    elif ACT == GELU:
        da = dh * (_gelu_cdf(a) + a * _const(INV_SQRT_2PI, a) * tl.exp(-0.5 * a * a))
    elif ACT == GELU_TANH:
        t = _tanh(_gelu_tanh_inner(a))
        inner_grad = _const(SQRT_2_OVER_PI, a) * (1.0 + 3.0 * _const(GELU_TANH_CUBIC, a) * a * a)
        da = dh * (0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * inner_grad)
    elif ACT == HARDSWISH:  # torch's hardswish_backward: 0 below -3, a/3 + 1/2 up to 3, then 1
        da = dh * tl.where(a < -3.0, 0.0, tl.where(a <= 3.0, a / 3.0 + 0.5, 1.0))
    elif ACT == LEAKY_RELU:
        da = tl.where(a > 0, dh, dh * _const(LEAKY_RELU_SLOPE, a))
    else:
        tl.static_assert(False, "unknown activation code")
    return da


@triton.jit
def _gate(g, GATE: tl.constexpr):
    if GATE == SIGMOID:
        s = _sigmoid(g)
    elif GATE == HARDSIGMOID:
        s = tl.minimum(tl.maximum(g + 3.0, 0.0), 6.0) / 6.0
    elif GATE == TANH:
        s = _tanh(g)
    elif GATE == RELU_GATE:
        s = tl.where(g < 0, 0.0, g)
    else:
        tl.static_assert(False, "unknown gate code")
    return s


@triton.jit
def _gate_grad(g, GATE: tl.constexpr):
    if GATE == SIGMOID:
        s = _sigmoid(g)
        d = s * (1.0 - s)
    elif GATE == HARDSIGMOID:
        # The open interval of torch's hardsigmoid_backward, 1/6 divided in g's dtype.
        d = tl.where((g > -3.0) & (g < 3.0), 1.0, 0.0).to(g.dtype) / 6.0
    elif GATE == TANH:
        t = _tanh(g)
        d = 1.0 - t * t
    elif GATE == RELU_GATE:
        d = tl.where(g > 0, 1.0, 0.0).to(g.dtype)
    else:
        tl.static_assert(False, "unknown gate code")
    return d


@triton.jit
def _prologue_u(v, scale_ptr, shift_ptr, chan, c_mask):
    """u = in_scale * x + in_shift, the [N*C] coefficients at chan (rows of a tile: chan and
    c_mask shaped to broadcast against v)."""
    a = tl.load(scale_ptr + chan, mask=c_mask, other=0.0)
    b = tl.load(shift_ptr + chan, mask=c_mask, other=0.0)
    return a * v + b


@triton.jit
def _nan_max_reduce(acc, axis: tl.constexpr):
    """tl.max along `axis`, but NaN wins, as in torch.amax."""
    m = tl.max(acc, axis)
    has_nan = tl.max((acc != acc).to(tl.int32), axis) > 0
    return tl.where(has_nan, float("nan"), m)


@triton.jit
def _channel_block(group, cb, channels, BLOCK_C: tl.constexpr, WIDE: tl.constexpr):
    """The rows of a program's tiles: group and channel indices into x, the indices into
    [N*C] vectors, and which rows exist."""
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    if WIDE:  # x has 2**31 elements or more: index in int64
        c = c.to(tl.int64)
        group = group.to(tl.int64)
    return group, c, group * channels + c, c < channels


@triton.jit
def _tile(group, c, c_mask, p0, p_end, stride_n, stride_c, stride_p,
          BLOCK_P: tl.constexpr, WIDE: tl.constexpr):
    """Offsets into x of the [BLOCK_C, BLOCK_P] tile at pixel p0, and its mask."""
    p = p0 + tl.arange(0, BLOCK_P)
    if WIDE:
        p = p.to(tl.int64)
    offs = group * stride_n + c[:, None] * stride_c + p[None, :] * stride_p
    return offs, c_mask[:, None] & (p < p_end)[None, :]


@triton.jit
def _piece_program(channels, P, p_per_split, splits, BLOCK_C: tl.constexpr,
                   WIDE: tl.constexpr):
    """A reduction pass's program: its piece `split` of H*W, [p_lo, p_hi), and the rows of
    its tiles (see _channel_block)."""
    pid = tl.program_id(0)
    split, rest = pid % splits, pid // splits
    c_blocks = tl.cdiv(channels, BLOCK_C)
    group, c, chan, c_mask = _channel_block(rest // c_blocks, rest % c_blocks, channels,
                                            BLOCK_C, WIDE)
    p_lo = split * p_per_split
    return split, p_lo, tl.minimum(p_lo + p_per_split, P), group, c, chan, c_mask


@triton.jit
def _row_body(c, p_lo, p_hi, P, VEC: tl.constexpr):
    """NCHW (rows of P contiguous pixels): the whole VEC-element vectors that a row's piece
    [c*P + p_lo, c*P + p_hi) holds, as their start and length, both multiples of VEC, so
    the loads of the body are 16-byte vectors even where the rows start unaligned."""
    start, end = c * P + p_lo, c * P + p_hi
    body_lo = tl.multiple_of((start + VEC - 1) // VEC * VEC, VEC)
    body_hi = tl.maximum(body_lo, end // VEC * VEC)
    return start, end, body_lo, tl.multiple_of(body_hi - body_lo, VEC)


@triton.jit
def _body_tile(group, c, c_mask, p_lo, p_hi, body_lo, body_len, step, stride_n, stride_c,
               stride_p, BLOCK_P: tl.constexpr, VEC: tl.constexpr, WIDE: tl.constexpr):
    """Offsets into x of a reduction's tile `step` of its piece, and its mask: with VEC > 1
    (NCHW) along each row's aligned body (_row_body), else the strided [BLOCK_C, BLOCK_P]
    tile at pixel p_lo + step * BLOCK_P."""
    if VEC > 1:
        p = step * BLOCK_P + tl.arange(0, BLOCK_P)
        if WIDE:
            p = p.to(tl.int64)
        return (body_lo[:, None] + p[None, :],
                c_mask[:, None] & (p[None, :] < body_len[:, None]))
    else:
        return _tile(group, c, c_mask, p_lo + step * BLOCK_P, p_hi, stride_n, stride_c,
                     stride_p, BLOCK_P, WIDE)


@triton.jit
def _row_edges(start, end, body_lo, body_len, c_mask, VEC: tl.constexpr):
    """Offsets and mask of what a row's piece holds outside its body: the head
    [start, body_lo) in the first VEC columns, the tail [body_lo + body_len, end) in the
    last VEC (fewer than VEC elements each; a piece shorter than a vector is all head)."""
    j = tl.arange(0, 2 * VEC)
    head = j < VEC
    tail_lo = body_lo + body_len
    offs = tl.where(head[None, :], start[:, None] + j[None, :],
                    tail_lo[:, None] + (j - VEC)[None, :])
    lens = tl.where(head[None, :], (tl.minimum(body_lo, end) - start)[:, None],
                    (end - tail_lo)[:, None])
    return offs, c_mask[:, None] & (tl.where(head, j, j - VEC)[None, :] < lens)


@triton.jit
def _map_program(channels, P, total, stride_n, stride_c, stride_p,
                 BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, FLAT: tl.constexpr,
                 BACKWARDS: tl.constexpr, WIDE: tl.constexpr):
    """A map pass's program: the indices into [N*C] vectors of its elements and their mask,
    shaped to broadcast against its offsets into x and their mask.

    BACKWARDS: the programs walk the tensor from its end to its start, so the first ones
    find in L2 what the reduction pass before read last (heuristics.map_walks_backwards).
    FLAT (NCHW): the programs take BLOCK_P consecutive elements of the flat N*C*P run, so
    loads and stores are 16-byte vectors whatever H*W is; otherwise a [BLOCK_C, BLOCK_P]
    tile."""
    pid = tl.program_id(0)
    if BACKWARDS:
        pid = tl.num_programs(0) - 1 - pid
    if WIDE:  # x has 2**31 elements or more: index in int64
        pid = pid.to(tl.int64)
    if FLAT:
        offs = pid * BLOCK_P + tl.arange(0, BLOCK_P)
        mask = offs < total
        return offs // P, mask, offs, mask
    else:
        p_blocks = tl.cdiv(P, BLOCK_P)
        c_blocks = tl.cdiv(channels, BLOCK_C)
        pb, rest = pid % p_blocks, pid // p_blocks
        group, c, chan, c_mask = _channel_block(rest // c_blocks, rest % c_blocks, channels,
                                                BLOCK_C, WIDE)
        offs, mask = _tile(group, c, c_mask, pb * BLOCK_P, P, stride_n, stride_c, stride_p,
                           BLOCK_P, WIDE)
        return chan[:, None], c_mask[:, None], offs, mask


@triton.jit
def _masked_dy(dout_ptr, out_ptr, offs, mask, acc_t: tl.constexpr, OUT_RELU: tl.constexpr,
               EVICT: tl.constexpr):
    """dy = grad_out, zeroed where out <= 0 under an output ReLU."""
    dy = tl.load(dout_ptr + offs, mask=mask, other=0.0, eviction_policy=EVICT).to(acc_t)
    if OUT_RELU:
        o = tl.load(out_ptr + offs, mask=mask, other=0.0, eviction_policy=EVICT).to(acc_t)
        dy = tl.where(o > 0, dy, 0.0)
    return dy


@triton.jit
def _pool_start(BLOCK_C: tl.constexpr, WIDTH: tl.constexpr, acc_t: tl.constexpr):
    """The running sums, sums of squares, maxima and minima of a [BLOCK_C, WIDTH] tile."""
    zeros = tl.zeros([BLOCK_C, WIDTH], acc_t)
    return (zeros, zeros, tl.full([BLOCK_C, WIDTH], float("-inf"), acc_t),
            tl.full([BLOCK_C, WIDTH], float("inf"), acc_t))


@triton.jit
def _pool_values(x_ptr, offs, mask, acc_t: tl.constexpr, total, squares, peak, low,
                 SQUARES: tl.constexpr, USE_MAX: tl.constexpr, MINIMA: tl.constexpr,
                 pre_a, pre_b, PRE_ACT: tl.constexpr):
    """Adds one tile of x (or of v = act(pre_a * x + pre_b), 0 off the mask) to the running
    sums (and sums of squares, maxima, minima)."""
    v = tl.load(x_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_last").to(acc_t)
    if PRE_ACT != NO_PROLOGUE:
        v = tl.where(mask, _activation(pre_a[:, None] * v + pre_b[:, None], PRE_ACT), 0.0)
    total += v
    if SQUARES:
        squares += v * v
    if USE_MAX:
        peak = tl.maximum(peak, tl.where(mask, v, float("-inf")),
                          propagate_nan=tl.PropagateNan.ALL)
    if MINIMA:
        low = tl.minimum(low, tl.where(mask, v, float("inf")), propagate_nan=tl.PropagateNan.ALL)
    return total, squares, peak, low


@triton.jit
def _pool_rows(total, squares, peak, low, SQUARES: tl.constexpr, USE_MAX: tl.constexpr,
               MINIMA: tl.constexpr):
    """The running values of a tile reduced along its rows (NaN wins in maxima and minima;
    -max(-v) is min(v) exactly); those not asked for are the sums, unused."""
    row_sum = tl.sum(total, 1)
    row_squares, row_max, row_min = row_sum, row_sum, row_sum
    if SQUARES:
        row_squares = tl.sum(squares, 1)
    if USE_MAX:
        row_max = _nan_max_reduce(peak, 1)
    if MINIMA:
        row_min = -_nan_max_reduce(-low, 1)
    return row_sum, row_squares, row_max, row_min


def _prologue_given(meta) -> bool:
    return meta.get("PRE_ACT", int(NO_PROLOGUE)) != int(NO_PROLOGUE)


@touches(("pre_scale_ptr", READ, _prologue_given), ("pre_shift_ptr", READ, _prologue_given),
         ("x_ptr", READ, None), ("sum_ptr", WRITE, None),
         ("sumsq_ptr", WRITE, _constexpr("SQUARES")), ("max_ptr", WRITE, _constexpr("USE_MAX")),
         ("min_ptr", WRITE, _constexpr("MINIMA")))
@triton.jit
def _pool_kernel(
    x_ptr, sum_ptr, sumsq_ptr, max_ptr, min_ptr, pre_scale_ptr, pre_shift_ptr,
    groups, channels, P, stride_n, stride_c, stride_p, p_per_split, splits,
    SQUARES: tl.constexpr, USE_MAX: tl.constexpr, MINIMA: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    VEC: tl.constexpr, EDGES: tl.constexpr, WIDE: tl.constexpr,
    PRE_ACT: tl.constexpr = NO_PROLOGUE,
):
    """Partial sums (and sums of squares, maxima, minima: the stream reduce op) over the
    H*W piece `split` of BLOCK_C channels: sum_ptr[split, n*C + c]; with PRE_ACT (the act
    reduce op), of v = act(pre_scale * x + pre_shift), the [N*C] coefficients. VEC > 1
    (NCHW): the rows' aligned bodies in tiles, and, with EDGES (rows or pieces that start
    or end off a vector boundary), their heads and tails in one small tile (_row_body,
    _row_edges)."""
    acc_t = sum_ptr.dtype.element_ty
    split, p_lo, p_hi, group, c, chan, c_mask = _piece_program(channels, P, p_per_split, splits,
                                                               BLOCK_C, WIDE)
    start, end, body_lo, body_len = _row_body(chan, p_lo, p_hi, P, VEC)
    pre_a = tl.zeros([BLOCK_C], acc_t)
    pre_b = tl.zeros([BLOCK_C], acc_t)
    if PRE_ACT != NO_PROLOGUE:
        pre_a = tl.load(pre_scale_ptr + chan, mask=c_mask, other=0.0)
        pre_b = tl.load(pre_shift_ptr + chan, mask=c_mask, other=0.0)
    total, squares, peak, low = _pool_start(BLOCK_C, BLOCK_P, acc_t)
    for step in range(0, tl.cdiv(p_hi - p_lo, BLOCK_P)):
        offs, mask = _body_tile(group, c, c_mask, p_lo, p_hi, body_lo, body_len, step,
                                stride_n, stride_c, stride_p, BLOCK_P, VEC, WIDE)
        total, squares, peak, low = _pool_values(x_ptr, offs, mask, acc_t, total, squares,
                                                 peak, low, SQUARES, USE_MAX, MINIMA,
                                                 pre_a, pre_b, PRE_ACT)
    row_sum, row_squares, row_max, row_min = _pool_rows(total, squares, peak, low, SQUARES,
                                                        USE_MAX, MINIMA)
    if EDGES:
        offs, mask = _row_edges(start, end, body_lo, body_len, c_mask, VEC)
        total, squares, peak, low = _pool_start(BLOCK_C, 2 * VEC, acc_t)
        total, squares, peak, low = _pool_values(x_ptr, offs, mask, acc_t, total, squares,
                                                 peak, low, SQUARES, USE_MAX, MINIMA,
                                                 pre_a, pre_b, PRE_ACT)
        edge_sum, edge_squares, edge_max, edge_min = _pool_rows(total, squares, peak, low,
                                                                SQUARES, USE_MAX, MINIMA)
        row_sum += edge_sum
        row_squares += edge_squares
        row_max = tl.maximum(row_max, edge_max, propagate_nan=tl.PropagateNan.ALL)
        row_min = tl.minimum(row_min, edge_min, propagate_nan=tl.PropagateNan.ALL)
    out = split * (groups * channels) + chan
    tl.store(sum_ptr + out, row_sum, mask=c_mask)
    if SQUARES:
        tl.store(sumsq_ptr + out, row_squares, mask=c_mask)
    if USE_MAX:
        tl.store(max_ptr + out, row_max, mask=c_mask)
    if MINIMA:
        tl.store(min_ptr + out, row_min, mask=c_mask)


@triton.jit
def _coefficient(g_ptr, chan, c_mask, GATE: tl.constexpr):
    """The per-channel factor on x (forward) or dy (backward): gate(g), or, with AS_GIVEN
    (the stream ops), the [N, C] vector itself."""
    g = tl.load(g_ptr + chan, mask=c_mask, other=0.0)
    if GATE == AS_GIVEN:
        s = g
    else:
        s = _gate(g, GATE)
    return s


@touches(("g_ptr", READ, None), ("shift_ptr", READ, _constexpr("HAS_SHIFT")),
         ("pre_scale_ptr", READ, _prologue_given), ("pre_shift_ptr", READ, _prologue_given),
         ("x_ptr", READ, None), ("res_ptr", READ, _constexpr("HAS_RESIDUAL")),
         ("out_ptr", WRITE, None))
@triton.jit
def _scale_kernel(
    x_ptr, res_ptr, out_ptr, g_ptr, shift_ptr, pre_scale_ptr, pre_shift_ptr,
    channels, P, total, stride_n, stride_c, stride_p,
    GATE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    OUT_RELU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, FLAT: tl.constexpr,
    BACKWARDS: tl.constexpr, WIDE: tl.constexpr, PRE_ACT: tl.constexpr = NO_PROLOGUE,
):
    """out = out_act(gate(g) * x + shift + residual) on one block of x (_map_program); with
    PRE_ACT (the act map op), of v = act(pre_scale * x + pre_shift) for x. This is the last
    use of x and the only one of the residual and out: evict_first keeps them from pushing
    out of L2 what the programs still to come re-read."""
    acc_t = g_ptr.dtype.element_ty
    chan, c_mask, offs, mask = _map_program(channels, P, total, stride_n, stride_c, stride_p,
                                            BLOCK_C, BLOCK_P, FLAT, BACKWARDS, WIDE)
    s = _coefficient(g_ptr, chan, c_mask, GATE)
    v = tl.load(x_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(acc_t)
    if PRE_ACT != NO_PROLOGUE:
        v = _activation(_prologue_u(v, pre_scale_ptr, pre_shift_ptr, chan, c_mask), PRE_ACT)
    y = v * s
    if HAS_SHIFT:
        y += tl.load(shift_ptr + chan, mask=c_mask, other=0.0)
    if HAS_RESIDUAL:
        y += tl.load(res_ptr + offs, mask=mask, other=0.0,
                     eviction_policy="evict_first").to(acc_t)
    if OUT_RELU:
        y = tl.where(y < 0, 0.0, y)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask,
             eviction_policy="evict_first")


@triton.jit
def _grad_reduce_values(dout_ptr, out_ptr, x_ptr, dres_ptr, offs, mask, peak,
                        acc_t: tl.constexpr, total, dy_total, count, OUT_RELU: tl.constexpr,
                        USE_MAX: tl.constexpr, SUM_DY: tl.constexpr, WRITE_DRES: tl.constexpr,
                        pre_a, pre_b, dydx_total, d_total, dx_total, PRE_ACT: tl.constexpr,
                        STATS: tl.constexpr):
    """Adds one tile's dy * x to the running sums (and dy to theirs, x == peak to the
    counts); stores dresidual = dy. With PRE_ACT (the act grad reduce op; u = pre_a * x +
    pre_b, v = act(u), d = act'(u), 0 off the mask): dy * v to the first sums and, with
    STATS, dy * d, dy * d * x, d and d * x to the others."""
    dy = _masked_dy(dout_ptr, out_ptr, offs, mask, acc_t, OUT_RELU, "evict_last")
    v = tl.load(x_ptr + offs, mask=mask, other=0.0,
                eviction_policy="evict_last" if USE_MAX or PRE_ACT != NO_PROLOGUE
                else "evict_first").to(acc_t)
    if PRE_ACT != NO_PROLOGUE:
        u = pre_a[:, None] * v + pre_b[:, None]
        total += dy * tl.where(mask, _activation(u, PRE_ACT), 0.0)
        if STATS:
            d = tl.where(mask, _activation_grad(u, tl.full(u.shape, 1.0, acc_t), PRE_ACT), 0.0)
            dy_total += dy * d
            dydx_total += dy * d * v
            d_total += d
            dx_total += d * v
    else:
        total += dy * v
        if SUM_DY:
            dy_total += dy
    if USE_MAX:
        count += (mask & (v == peak[:, None])).to(tl.int32)
    if WRITE_DRES:
        tl.store(dres_ptr + offs, dy.to(dres_ptr.dtype.element_ty), mask=mask)
    return total, dy_total, count, dydx_total, d_total, dx_total


def _act_statistics(meta) -> bool:
    return _prologue_given(meta) and bool(meta.get("STATS", False))


@touches(("zmax_ptr", READ, _constexpr("USE_MAX")), ("pre_scale_ptr", READ, _prologue_given),
         ("pre_shift_ptr", READ, _prologue_given), ("dout_ptr", READ, None),
         ("out_ptr", READ, _constexpr("OUT_RELU")), ("x_ptr", READ, None),
         ("dres_ptr", WRITE, _constexpr("WRITE_DRES")), ("ds_ptr", WRITE, None),
         ("dsum_ptr", WRITE, lambda meta: meta["SUM_DY"] or _act_statistics(meta)),
         ("count_ptr", WRITE, _constexpr("USE_MAX")), ("sdydx_ptr", WRITE, _act_statistics),
         ("sd_ptr", WRITE, _act_statistics), ("sdx_ptr", WRITE, _act_statistics))
@triton.jit
def _grad_reduce_kernel(
    dout_ptr, out_ptr, x_ptr, zmax_ptr, ds_ptr, dsum_ptr, count_ptr, dres_ptr,
    pre_scale_ptr, pre_shift_ptr, sdydx_ptr, sd_ptr, sdx_ptr,
    groups, channels, P, stride_n, stride_c, stride_p, p_per_split, splits,
    OUT_RELU: tl.constexpr, USE_MAX: tl.constexpr, SUM_DY: tl.constexpr,
    WRITE_DRES: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, VEC: tl.constexpr,
    EDGES: tl.constexpr, WIDE: tl.constexpr, PRE_ACT: tl.constexpr = NO_PROLOGUE,
    STATS: tl.constexpr = False,
):
    """Partial sums over one H*W piece of ds = dy * x, (max pooling, or a peak given) of
    count, how many x equal the channel's max, and (the stream op) of dy, walked as in
    _pool_kernel; the stream op also writes dresidual = dy here. With PRE_ACT (the act grad
    reduce op): ds = dy * v, and with STATS dsum = dy * d, sdydx = dy * d * x, sd = d,
    sdx = d * x (_grad_reduce_values). grad_out and out (and x under max pooling or a
    prologue) are read again by _grad_input_kernel: evict_last."""
    acc_t = ds_ptr.dtype.element_ty
    split, p_lo, p_hi, group, c, chan, c_mask = _piece_program(channels, P, p_per_split, splits,
                                                               BLOCK_C, WIDE)
    start, end, body_lo, body_len = _row_body(chan, p_lo, p_hi, P, VEC)
    peak = tl.zeros([BLOCK_C], acc_t)
    if USE_MAX:
        peak = tl.load(zmax_ptr + chan, mask=c_mask, other=0.0)
    pre_a = tl.zeros([BLOCK_C], acc_t)
    pre_b = tl.zeros([BLOCK_C], acc_t)
    if PRE_ACT != NO_PROLOGUE:
        pre_a = tl.load(pre_scale_ptr + chan, mask=c_mask, other=0.0)
        pre_b = tl.load(pre_shift_ptr + chan, mask=c_mask, other=0.0)
    total = tl.zeros([BLOCK_C, BLOCK_P], acc_t)
    dy_total = tl.zeros([BLOCK_C, BLOCK_P], acc_t)
    count = tl.zeros([BLOCK_C, BLOCK_P], tl.int32)
    dydx_total = tl.zeros([BLOCK_C, BLOCK_P], acc_t)
    d_total = tl.zeros([BLOCK_C, BLOCK_P], acc_t)
    dx_total = tl.zeros([BLOCK_C, BLOCK_P], acc_t)
    for step in range(0, tl.cdiv(p_hi - p_lo, BLOCK_P)):
        offs, mask = _body_tile(group, c, c_mask, p_lo, p_hi, body_lo, body_len, step,
                                stride_n, stride_c, stride_p, BLOCK_P, VEC, WIDE)
        total, dy_total, count, dydx_total, d_total, dx_total = _grad_reduce_values(
            dout_ptr, out_ptr, x_ptr, dres_ptr, offs, mask, peak, acc_t, total, dy_total, count,
            OUT_RELU, USE_MAX, SUM_DY, WRITE_DRES, pre_a, pre_b, dydx_total, d_total, dx_total,
            PRE_ACT, STATS)
    row_ds = tl.sum(total, 1)
    row_dsum = tl.sum(dy_total, 1)
    row_count = tl.sum(count, 1)
    row_dydx = tl.sum(dydx_total, 1)
    row_d = tl.sum(d_total, 1)
    row_dx = tl.sum(dx_total, 1)
    if EDGES:
        offs, mask = _row_edges(start, end, body_lo, body_len, c_mask, VEC)
        edge = tl.zeros([BLOCK_C, 2 * VEC], acc_t)
        e_total, e_dy_total, e_count, e_dydx, e_d, e_dx = _grad_reduce_values(
            dout_ptr, out_ptr, x_ptr, dres_ptr, offs, mask, peak, acc_t, edge, edge,
            tl.zeros([BLOCK_C, 2 * VEC], tl.int32), OUT_RELU, USE_MAX, SUM_DY, WRITE_DRES,
            pre_a, pre_b, edge, edge, edge, PRE_ACT, STATS)
        row_ds += tl.sum(e_total, 1)
        row_dsum += tl.sum(e_dy_total, 1)
        row_count += tl.sum(e_count, 1)
        row_dydx += tl.sum(e_dydx, 1)
        row_d += tl.sum(e_d, 1)
        row_dx += tl.sum(e_dx, 1)
    out = split * (groups * channels) + chan
    tl.store(ds_ptr + out, row_ds, mask=c_mask)
    if SUM_DY or (PRE_ACT != NO_PROLOGUE and STATS):
        tl.store(dsum_ptr + out, row_dsum, mask=c_mask)
    if USE_MAX:
        tl.store(count_ptr + out, row_count, mask=c_mask)
    if PRE_ACT != NO_PROLOGUE and STATS:
        tl.store(sdydx_ptr + out, row_dydx, mask=c_mask)
        tl.store(sd_ptr + out, row_d, mask=c_mask)
        tl.store(sdx_ptr + out, row_dx, mask=c_mask)


@touches(("g_ptr", READ, None), ("x_scale_ptr", READ, _constexpr("X_SCALE")),
         ("zmax_ptr", READ, _constexpr("USE_MAX")),
         ("dx_avg_ptr", READ, _constexpr("HAS_AVG")), ("dx_max_ptr", READ, _constexpr("USE_MAX")),
         ("pre_scale_ptr", READ, _prologue_given), ("pre_shift_ptr", READ, _prologue_given),
         ("act_shift_ptr", READ, _prologue_given),
         ("dout_ptr", READ, None), ("out_ptr", READ, _constexpr("OUT_RELU")),
         ("x_ptr", READ, lambda meta: meta["USE_MAX"] or meta["X_SCALE"] or _prologue_given(meta)),
         ("dx_ptr", WRITE, None), ("dres_ptr", WRITE, _constexpr("WRITE_DRES")))
@triton.jit
def _grad_input_kernel(
    dout_ptr, out_ptr, x_ptr, g_ptr, x_scale_ptr, zmax_ptr, dx_avg_ptr, dx_max_ptr, dx_ptr,
    dres_ptr, pre_scale_ptr, pre_shift_ptr, act_shift_ptr,
    channels, P, total, stride_n, stride_c, stride_p,
    GATE: tl.constexpr, OUT_RELU: tl.constexpr, X_SCALE: tl.constexpr, HAS_AVG: tl.constexpr,
    USE_MAX: tl.constexpr, WRITE_DRES: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr, FLAT: tl.constexpr, BACKWARDS: tl.constexpr, WIDE: tl.constexpr,
    PRE_ACT: tl.constexpr = NO_PROLOGUE,
):
    """dx = dy * s + x_scale * x + dx_avg + [x == zmax] * dx_max on one block
    (_map_program); dresidual = dy. With PRE_ACT (the act grad map op) the first term is
    act'(pre_scale * x + pre_shift) * (dy * s + act_shift). Under AS_GIVEN (the stream ops)
    the max term is the product, so a non-finite dx_max reaches every element as in its
    reference; the SE backward selects dx_max at the max as the CPU kernels do. Last uses
    and writes: evict_first (see _scale_kernel)."""
    acc_t = g_ptr.dtype.element_ty
    chan, c_mask, offs, mask = _map_program(channels, P, total, stride_n, stride_c, stride_p,
                                            BLOCK_C, BLOCK_P, FLAT, BACKWARDS, WIDE)
    dy = _masked_dy(dout_ptr, out_ptr, offs, mask, acc_t, OUT_RELU, "evict_first")
    dx = dy * _coefficient(g_ptr, chan, c_mask, GATE)
    if USE_MAX or X_SCALE or PRE_ACT != NO_PROLOGUE:
        v = tl.load(x_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(acc_t)
    if PRE_ACT != NO_PROLOGUE:
        u = _prologue_u(v, pre_scale_ptr, pre_shift_ptr, chan, c_mask)
        dx += tl.load(act_shift_ptr + chan, mask=c_mask, other=0.0)
        dx = _activation_grad(u, dx, PRE_ACT)
    if X_SCALE:
        dx += tl.load(x_scale_ptr + chan, mask=c_mask, other=0.0) * v
    if HAS_AVG:
        dx += tl.load(dx_avg_ptr + chan, mask=c_mask, other=0.0)
    if USE_MAX:
        peak = tl.load(zmax_ptr + chan, mask=c_mask, other=0.0)
        share = tl.load(dx_max_ptr + chan, mask=c_mask, other=0.0)
        if GATE == AS_GIVEN:
            dx += (v == peak).to(acc_t) * share
        else:
            dx += tl.where(v == peak, share, 0.0)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask,
             eviction_policy="evict_first")
    if WRITE_DRES:
        tl.store(dres_ptr + offs, dy.to(dres_ptr.dtype.element_ty), mask=mask,
                 eviction_policy="evict_first")


# The MLP kernels work on [N, C] / [N, S] vectors and the [S, C] / [C, S] weights. Each
# program owns a [BLOCK_N, BLOCK_M] block of outputs and walks the reduction axis in blocks
# of BLOCK_K, accumulating products in a [BLOCK_N, BLOCK_M, BLOCK_K] register tile that is
# summed once at the end: plain FMAs in the loop, one fixed-order reduction, any dtype
# (fp64 included, which tl.dot does not promise), any S and C. The four share the tile
# helpers below and differ in what they load, which weight, and their epilogue.


@triton.jit
def _mlp_block(pid, N, M, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """The samples n and output features m of block `pid`, [BLOCK_N, BLOCK_M], their masks,
    and whether it is in the first block of features (whose programs store the [N, K]
    vectors they compute on the way)."""
    m_blocks = tl.cdiv(M, BLOCK_M)
    nb, mb = pid // m_blocks, pid % m_blocks
    n = (nb * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    return n, m, n < N, m < M, mb == 0


@triton.jit
def _vector_block(n, n_mask, j, j_mask, J):
    """Offsets and mask of the [BLOCK_N, BLOCK_J] block (n, j) of an [N, J] vector."""
    return n[:, None] * J + j[None, :], n_mask[:, None] & j_mask[None, :]


@triton.jit
def _mlp_step(k0, n, n_mask, K, BLOCK_K: tl.constexpr):
    """The reduction block at k0: its indices and mask, and the offsets and mask of the
    samples' [BLOCK_N, BLOCK_K] block of an [N, K] vector."""
    k = k0 + tl.arange(0, BLOCK_K)
    k_mask = k < K
    idx, mask = _vector_block(n, n_mask, k, k_mask, K)
    return k, k_mask, idx, mask


@triton.jit
def _weight_block(w_ptr, m, m_mask, k, k_mask, stride_m, stride_k):
    """The [BLOCK_M, BLOCK_K] block (m, k) of a weight whose element (m, k) is at
    m * stride_m + k * stride_k, 0 outside it."""
    return tl.load(w_ptr + m[:, None] * stride_m + k[None, :] * stride_k,
                   mask=m_mask[:, None] & k_mask[None, :], other=0.0)


@triton.jit
def _store_fc(out_ptr, acc, bias_ptr, n, n_mask, m, m_mask, M, HAS_BIAS: tl.constexpr):
    """An FC's [N, M] output block: out[n, m] = sum_k acc[n, m, k] + bias[m]."""
    y = tl.sum(acc, 2)
    if HAS_BIAS:
        y += tl.load(bias_ptr + m, mask=m_mask, other=0.0).to(out_ptr.dtype.element_ty)[None, :]
    out, out_mask = _vector_block(n, n_mask, m, m_mask, M)
    tl.store(out_ptr + out, y, mask=out_mask)


@triton.jit
def _combine_pool(sum_ptr, max_ptr, idx, mask, nc, splits, P, POOL: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """z (0 where masked) and the channel max from the pooling pieces, in piece order."""
    acc_t = sum_ptr.dtype.element_ty
    total = tl.zeros([BLOCK_N, BLOCK_C], acc_t)
    peak = tl.full([BLOCK_N, BLOCK_C], float("-inf"), acc_t)
    for k in range(splits):
        if POOL != MAX:
            total += tl.load(sum_ptr + k * nc + idx, mask=mask, other=0.0)
        if POOL != AVG:
            peak = tl.maximum(peak, tl.load(max_ptr + k * nc + idx, mask=mask, other=0.0),
                              propagate_nan=tl.PropagateNan.ALL)
    if POOL == AVG:
        z = total / P
    elif POOL == MAX:
        z = peak
    elif POOL == AVGMAX:
        z = 0.5 * (total / P) + 0.5 * peak
    else:
        tl.static_assert(False, "unknown pool code")
    return tl.where(mask, z, 0.0), peak


@touches(("sum_ptr", READ, None), ("max_ptr", READ, _pool_uses(Pool.MAX, Pool.AVGMAX)),
         ("w1_ptr", READ, None), ("b1_ptr", READ, _constexpr("HAS_BIAS")), ("z_ptr", WRITE, None),
         ("zmax_ptr", WRITE, _pool_uses(Pool.MAX, Pool.AVGMAX)), ("a_ptr", WRITE, None))
@triton.jit
def _squeeze_fc_kernel(
    sum_ptr, max_ptr, z_ptr, zmax_ptr, a_ptr, w1_ptr, b1_ptr,
    N, C, S, P, splits, nc,
    POOL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """z (and zmax) from the pooling pieces, and a = z W1^T + b1, for BLOCK_N samples and
    BLOCK_S hidden units. The programs of the first S block also store z and zmax."""
    acc_t = a_ptr.dtype.element_ty
    n, s, n_mask, s_mask, first = _mlp_block(tl.program_id(0), N, S, BLOCK_N, BLOCK_S)
    acc = tl.zeros([BLOCK_N, BLOCK_S, BLOCK_C], acc_t)
    for c0 in range(0, C, BLOCK_C):
        c, c_mask, idx, mask = _mlp_step(c0, n, n_mask, C, BLOCK_C)
        z, peak = _combine_pool(sum_ptr, max_ptr, idx, mask, nc, splits, P, POOL,
                                BLOCK_N, BLOCK_C)
        if first:
            tl.store(z_ptr + idx, z, mask=mask)
            if POOL != AVG:
                tl.store(zmax_ptr + idx, peak, mask=mask)
        w = _weight_block(w1_ptr, s, s_mask, c, c_mask, C, 1).to(acc_t)  # W1[s, c]
        acc += z[:, None, :] * w[None, :, :]
    _store_fc(a_ptr, acc, b1_ptr, n, n_mask, s, s_mask, S, HAS_BIAS)


@touches(("a_ptr", READ, None), ("w2_ptr", READ, None), ("b2_ptr", READ, _constexpr("HAS_BIAS")),
         ("g_ptr", WRITE, None))
@triton.jit
def _excite_fc_kernel(
    a_ptr, g_ptr, w2_ptr, b2_ptr,
    N, C, S,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """g = act(a) W2^T + b2 for BLOCK_N samples and BLOCK_C channels."""
    acc_t = g_ptr.dtype.element_ty
    n, c, n_mask, c_mask, first = _mlp_block(tl.program_id(0), N, C, BLOCK_N, BLOCK_C)
    acc = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], acc_t)
    for s0 in range(0, S, BLOCK_S):
        s, s_mask, idx, mask = _mlp_step(s0, n, n_mask, S, BLOCK_S)
        h = _activation(tl.load(a_ptr + idx, mask=mask, other=0.0), ACT)  # act(0) == 0
        w = _weight_block(w2_ptr, c, c_mask, s, s_mask, S, 1).to(acc_t)  # W2[c, s]
        acc += h[:, None, :] * w[None, :, :]
    _store_fc(g_ptr, acc, b2_ptr, n, n_mask, c, c_mask, C, HAS_BIAS)


@touches(("ds_ptr", READ, None), ("g_ptr", READ, None), ("w2_ptr", READ, None), ("a_ptr", READ, None),
         ("dg_ptr", WRITE, None), ("da_ptr", WRITE, None))
@triton.jit
def _excite_fc_backward_kernel(
    ds_ptr, g_ptr, a_ptr, w2_ptr, dg_ptr, da_ptr,
    N, C, S, splits, nc,
    ACT: tl.constexpr, GATE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dg = ds * gate'(g) (ds summed over its pieces in order), dh = dg W2 and
    da = dh * act'(a) for BLOCK_N samples and BLOCK_S hidden units. The programs of the
    first S block also store dg."""
    acc_t = da_ptr.dtype.element_ty
    n, s, n_mask, s_mask, first = _mlp_block(tl.program_id(0), N, S, BLOCK_N, BLOCK_S)
    acc = tl.zeros([BLOCK_N, BLOCK_S, BLOCK_C], acc_t)
    for c0 in range(0, C, BLOCK_C):
        c, c_mask, idx, mask = _mlp_step(c0, n, n_mask, C, BLOCK_C)
        ds = tl.zeros([BLOCK_N, BLOCK_C], acc_t)
        for k in range(splits):
            ds += tl.load(ds_ptr + k * nc + idx, mask=mask, other=0.0)
        dg = ds * _gate_grad(tl.load(g_ptr + idx, mask=mask, other=0.0), GATE)
        if first:
            tl.store(dg_ptr + idx, dg, mask=mask)
        w = _weight_block(w2_ptr, s, s_mask, c, c_mask, 1, S).to(acc_t)  # W2[c, s] as [s, c]
        acc += dg[:, None, :] * w[None, :, :]
    dh = tl.sum(acc, 2)
    out, out_mask = _vector_block(n, n_mask, s, s_mask, S)
    a = tl.load(a_ptr + out, mask=out_mask, other=0.0)
    tl.store(da_ptr + out, _activation_grad(a, dh, ACT), mask=out_mask)


@triton.jit
def _squeeze_fc_backward_block(
    pid, da_ptr, w1_ptr, count_ptr, dx_avg_ptr, dx_max_ptr,
    N, C, S, P, splits, nc,
    POOL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """dz = da W1 for block `pid` of BLOCK_N samples and BLOCK_C channels, stored as what dx
    adds per channel: dx_avg = dz / P everywhere, dx_max = dz / count at the max (halves of
    each for avgmax)."""
    acc_t = da_ptr.dtype.element_ty
    n, c, n_mask, c_mask, first = _mlp_block(pid, N, C, BLOCK_N, BLOCK_C)
    acc = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], acc_t)
    for s0 in range(0, S, BLOCK_S):
        s, s_mask, idx, mask = _mlp_step(s0, n, n_mask, S, BLOCK_S)
        da = tl.load(da_ptr + idx, mask=mask, other=0.0)
        w = _weight_block(w1_ptr, c, c_mask, s, s_mask, 1, C).to(acc_t)  # W1[s, c] as [c, s]
        acc += da[:, None, :] * w[None, :, :]
    dz = tl.sum(acc, 2)
    idx, mask = _vector_block(n, n_mask, c, c_mask, C)
    if POOL == AVG:
        tl.store(dx_avg_ptr + idx, dz / P, mask=mask)
    else:
        count = tl.zeros([BLOCK_N, BLOCK_C], tl.int32)
        for k in range(splits):
            count += tl.load(count_ptr + k * nc + idx, mask=mask, other=1)
        count = tl.where(count > 0, count, 1).to(acc_t)  # 0 only off the edge, or for NaN rows
        if POOL == MAX:
            tl.store(dx_max_ptr + idx, dz / count, mask=mask)
        elif POOL == AVGMAX:
            tl.store(dx_avg_ptr + idx, dz * 0.5 / P, mask=mask)
            tl.store(dx_max_ptr + idx, dz * 0.5 / count, mask=mask)
        else:
            tl.static_assert(False, "unknown pool code")


@triton.jit
def _weight_grad_tile(
    u_ptr, v_ptr, out_ptr, bias_ptr, N, U, V, ub, vb, out_stride_u, out_stride_v,
    ACTIVATE_V: tl.constexpr, ACT: tl.constexpr, BIAS_FROM_U: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """out[u, v] = sum_n u[n, u] * f(v[n, v]) for one [BLOCK_U, BLOCK_V] tile, with the
    samples summed in order, f the activation ACT when ACTIVATE_V, else the identity;
    bias = sum_n of the u (or v) operand, stored by the tiles of the first v (or u) block."""
    acc_t = u_ptr.dtype.element_ty
    iu = ub * BLOCK_U + tl.arange(0, BLOCK_U)
    iv = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    u_mask, v_mask = iu < U, iv < V
    acc = tl.zeros([BLOCK_N, BLOCK_U, BLOCK_V], acc_t)
    bias_u = tl.zeros([BLOCK_N, BLOCK_U], acc_t)
    bias_v = tl.zeros([BLOCK_N, BLOCK_V], acc_t)
    for n0 in range(0, N, BLOCK_N):
        n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_mask = n < N
        u = tl.load(u_ptr + n[:, None] * U + iu[None, :],
                    mask=n_mask[:, None] & u_mask[None, :], other=0.0)
        v = tl.load(v_ptr + n[:, None] * V + iv[None, :],
                    mask=n_mask[:, None] & v_mask[None, :], other=0.0)
        if ACTIVATE_V:
            v = _activation(v, ACT)
        acc += u[:, :, None] * v[:, None, :]
        if BIAS_FROM_U:
            bias_u += u
        else:
            bias_v += v
    grad = tl.sum(acc, 0)
    tl.store(out_ptr + iu[:, None] * out_stride_u + iv[None, :] * out_stride_v,
             grad.to(out_ptr.dtype.element_ty), mask=u_mask[:, None] & v_mask[None, :])
    if BIAS_FROM_U:
        if vb == 0:
            tl.store(bias_ptr + iu, tl.sum(bias_u, 0).to(bias_ptr.dtype.element_ty), mask=u_mask)
    else:
        if ub == 0:
            tl.store(bias_ptr + iv, tl.sum(bias_v, 0).to(bias_ptr.dtype.element_ty), mask=v_mask)


@triton.jit
def _weight_grad_block(
    pid, dg_ptr, a_ptr, da_ptr, z_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
    N, C, S,
    ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Even blocks `pid`: a tile of dW2 = dg^T act(a) and db2 = sum_n dg; odd blocks: the
    same tile of dW1^T = z^T da and db1 = sum_n da."""
    which, tile = pid % 2, pid // 2
    s_blocks = tl.cdiv(S, BLOCK_S)
    cb, sb = tile // s_blocks, tile % s_blocks
    if which == 0:
        # dW2[c, s] at c * S + s
        _weight_grad_tile(dg_ptr, a_ptr, dw2_ptr, db2_ptr, N, C, S, cb, sb, S, 1,
                          True, ACT, True, BLOCK_N, BLOCK_C, BLOCK_S)
    else:
        # dW1[s, c] at s * C + c
        _weight_grad_tile(z_ptr, da_ptr, dw1_ptr, db1_ptr, N, C, S, cb, sb, 1, C,
                          False, ACT, False, BLOCK_N, BLOCK_C, BLOCK_S)


@touches(("dg_ptr", READ, None), ("a_ptr", READ, None), ("z_ptr", READ, None), ("da_ptr", READ, None),
         ("w1_ptr", READ, None), ("count_ptr", READ, _pool_uses(Pool.MAX, Pool.AVGMAX)),
         ("dw2_ptr", WRITE, None), ("db2_ptr", WRITE, None), ("dw1_ptr", WRITE, None),
         ("db1_ptr", WRITE, None), ("dx_avg_ptr", WRITE, _pool_uses(Pool.AVG, Pool.AVGMAX)),
         ("dx_max_ptr", WRITE, _pool_uses(Pool.MAX, Pool.AVGMAX)))
@triton.jit
def _mlp_grads_kernel(
    dg_ptr, a_ptr, da_ptr, z_ptr, w1_ptr, count_ptr,
    dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, dx_avg_ptr, dx_max_ptr,
    N, C, S, P, splits, nc, weight_programs,
    ACT: tl.constexpr, POOL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    WG_BLOCK_N: tl.constexpr, WG_BLOCK_C: tl.constexpr, WG_BLOCK_S: tl.constexpr,
):
    """The two independent consumers of dg and da in one launch: the first weight_programs
    programs the weight gradients (_weight_grad_block, [WG_BLOCK_C, WG_BLOCK_S] tiles), the
    rest dz and the per-channel terms of dx (_squeeze_fc_backward_block)."""
    pid = tl.program_id(0)
    if pid < weight_programs:
        _weight_grad_block(pid, dg_ptr, a_ptr, da_ptr, z_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
                           N, C, S, ACT, WG_BLOCK_N, WG_BLOCK_C, WG_BLOCK_S)
    else:
        _squeeze_fc_backward_block(pid - weight_programs, da_ptr, w1_ptr, count_ptr, dx_avg_ptr,
                                   dx_max_ptr, N, C, S, P, splits, nc, POOL,
                                   BLOCK_N, BLOCK_C, BLOCK_S)
