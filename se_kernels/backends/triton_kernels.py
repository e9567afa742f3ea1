"""Triton kernels of the SE block, their launch heuristics, and the forward/backward drivers.

Imported on first use by se_kernels.backends.triton_ops (importing triton costs time and
may fail); TRITON_INTERPRET is read here, when the kernels are defined.

Forward, for x [N, C, P] (P = H*W) in its own layout:
  _pool_kernel                 one pass over x: per-channel sums (and maxima) of H*W pieces
  _squeeze_fc_kernel           combines the pieces in a fixed order into z, then a = W1 z + b1
  _excite_fc_kernel            g = W2 act(a) + b2
  _scale_kernel                one pass: out = out_act(gate(g) * x + residual)
Backward:
  _grad_reduce_kernel          one pass over grad_out and x: ds = sum_p dy*x (and max ties)
  _excite_fc_backward_kernel   dg = ds * gate'(g), dh = dg W2, da = dh * act'(a)
  _weight_grad_kernel          dW2 = dg^T h, db2, dW1 = da^T z, db1: sums over N in one program
  _squeeze_fc_backward_kernel  dz = da W1, turned into the per-channel terms of dx
  _grad_input_kernel           one pass: dx = dy * s + dz / P (or at the max), dresidual = dy

Every reduction has a fixed order that depends only on the shape and the launch config, so
results are bit-identical from run to run (no float atomics). Values are converted to the
accumulation dtype (fp32, fp64 for fp64) right after tl.load and back right before tl.store,
which fp32 accumulation wants anyway and which sidesteps the interpreter's bf16 arithmetic
bug (triton#11584).

Both layouts run through the same kernels. A pass sees x as [groups, channels, P] with
strides: NCHW is one group of N*C rows of P contiguous pixels, channels-last is N groups of
P pixels of C contiguous channels. Triton specializes the stride that equals 1, so loads
along the contiguous axis are vectorized in both layouts.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------

# Option codes, passed to the kernels as constexprs (globals read by @triton.jit code
# must be tl.constexpr).
ACTIVATIONS = {"relu": 0, "silu": 1}
GATES = {"sigmoid": 0, "hardsigmoid": 1}
POOLS = {"avg": 0, "max": 1, "avgmax": 2}
RELU, SILU = tl.constexpr(0), tl.constexpr(1)
SIGMOID, HARDSIGMOID = tl.constexpr(0), tl.constexpr(1)
AVG, MAX, AVGMAX = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _activation(a, ACT: tl.constexpr):
    if ACT == RELU:
        h = tl.where(a < 0, 0.0, a)  # keeps NaN, as torch.relu does
    else:
        h = a / (1.0 + tl.exp(-a))
    return h


@triton.jit
def _activation_grad(a, dh, ACT: tl.constexpr):
    if ACT == RELU:
        da = tl.where(a > 0, dh, 0.0)
    else:
        sig = 1.0 / (1.0 + tl.exp(-a))
        da = dh * sig * (1.0 + a * (1.0 - sig))
    return da


@triton.jit
def _gate(g, GATE: tl.constexpr):
    if GATE == SIGMOID:
        s = 1.0 / (1.0 + tl.exp(-g))
    else:
        s = tl.minimum(tl.maximum(g + 3.0, 0.0), 6.0) / 6.0
    return s


@triton.jit
def _gate_grad(g, GATE: tl.constexpr):
    if GATE == SIGMOID:
        s = 1.0 / (1.0 + tl.exp(-g))
        d = s * (1.0 - s)
    else:
        # The open interval of torch's hardsigmoid_backward. The division happens in g's
        # dtype: a literal 1.0 / 6.0 would be a float32 constant, 3e-8 off in fp64.
        d = tl.where((g > -3.0) & (g < 3.0), 1.0, 0.0).to(g.dtype) / 6.0
    return d


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
def _pool_kernel(
    x_ptr, sum_ptr, max_ptr,
    groups, channels, P, stride_n, stride_c, stride_p, p_per_split, splits,
    USE_MAX: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, WIDE: tl.constexpr,
):
    """Partial sums (and maxima) over the H*W piece `split` of BLOCK_C channels:
    sum_ptr[split, n*C + c]."""
    acc_t = sum_ptr.dtype.element_ty
    pid = tl.program_id(0)
    split = pid % splits
    rest = pid // splits
    c_blocks = tl.cdiv(channels, BLOCK_C)
    group, cb = rest // c_blocks, rest % c_blocks
    group, c, chan, c_mask = _channel_block(group, cb, channels, BLOCK_C, WIDE)
    p_lo = split * p_per_split
    p_hi = tl.minimum(p_lo + p_per_split, P)
    total = tl.zeros([BLOCK_C, BLOCK_P], acc_t)
    peak = tl.full([BLOCK_C, BLOCK_P], float("-inf"), acc_t)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        offs, mask = _tile(group, c, c_mask, p0, p_hi, stride_n, stride_c, stride_p, BLOCK_P,
                           WIDE)
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t)
        total += v
        if USE_MAX:
            peak = tl.maximum(peak, tl.where(mask, v, float("-inf")),
                              propagate_nan=tl.PropagateNan.ALL)
    out = split * (groups * channels) + chan
    tl.store(sum_ptr + out, tl.sum(total, 1), mask=c_mask)
    if USE_MAX:
        tl.store(max_ptr + out, _nan_max_reduce(peak, 1), mask=c_mask)


@triton.jit
def _scale_kernel(
    x_ptr, res_ptr, out_ptr, g_ptr,
    channels, P, stride_n, stride_c, stride_p,
    GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, OUT_RELU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, WIDE: tl.constexpr,
):
    """out = out_act(gate(g) * x + residual) on one [BLOCK_C, BLOCK_P] tile."""
    acc_t = g_ptr.dtype.element_ty
    pid = tl.program_id(0)
    p_blocks = tl.cdiv(P, BLOCK_P)
    c_blocks = tl.cdiv(channels, BLOCK_C)
    pb, rest = pid % p_blocks, pid // p_blocks
    group, cb = rest // c_blocks, rest % c_blocks
    group, c, chan, c_mask = _channel_block(group, cb, channels, BLOCK_C, WIDE)
    offs, mask = _tile(group, c, c_mask, pb * BLOCK_P, P, stride_n, stride_c, stride_p, BLOCK_P,
                       WIDE)
    s = _gate(tl.load(g_ptr + chan, mask=c_mask, other=0.0), GATE)
    y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t) * s[:, None]
    if HAS_RESIDUAL:
        y += tl.load(res_ptr + offs, mask=mask, other=0.0).to(acc_t)
    if OUT_RELU:
        y = tl.where(y < 0, 0.0, y)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_reduce_kernel(
    dout_ptr, out_ptr, x_ptr, zmax_ptr, ds_ptr, count_ptr,
    groups, channels, P, stride_n, stride_c, stride_p, p_per_split, splits,
    OUT_RELU: tl.constexpr, USE_MAX: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, WIDE: tl.constexpr,
):
    """Partial sums over one H*W piece of ds = dy * x, dy = grad_out masked by out > 0 under
    an output ReLU, and (max pooling) of how many x equal the channel's max."""
    acc_t = ds_ptr.dtype.element_ty
    pid = tl.program_id(0)
    split = pid % splits
    rest = pid // splits
    c_blocks = tl.cdiv(channels, BLOCK_C)
    group, cb = rest // c_blocks, rest % c_blocks
    group, c, chan, c_mask = _channel_block(group, cb, channels, BLOCK_C, WIDE)
    p_lo = split * p_per_split
    p_hi = tl.minimum(p_lo + p_per_split, P)
    if USE_MAX:
        peak = tl.load(zmax_ptr + chan, mask=c_mask, other=0.0)
    total = tl.zeros([BLOCK_C, BLOCK_P], acc_t)
    ties = tl.zeros([BLOCK_C, BLOCK_P], tl.int32)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        offs, mask = _tile(group, c, c_mask, p0, p_hi, stride_n, stride_c, stride_p, BLOCK_P,
                           WIDE)
        dy = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(acc_t)
        if OUT_RELU:
            o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(acc_t)
            dy = tl.where(o > 0, dy, 0.0)
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t)
        total += dy * v
        if USE_MAX:
            ties += (mask & (v == peak[:, None])).to(tl.int32)
    out = split * (groups * channels) + chan
    tl.store(ds_ptr + out, tl.sum(total, 1), mask=c_mask)
    if USE_MAX:
        tl.store(count_ptr + out, tl.sum(ties, 1), mask=c_mask)


@triton.jit
def _grad_input_kernel(
    dout_ptr, out_ptr, x_ptr, g_ptr, zmax_ptr, coef_avg_ptr, coef_max_ptr, dx_ptr, dres_ptr,
    channels, P, stride_n, stride_c, stride_p,
    GATE: tl.constexpr, OUT_RELU: tl.constexpr, HAS_AVG: tl.constexpr, USE_MAX: tl.constexpr,
    WRITE_DRES: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, WIDE: tl.constexpr,
):
    """dx = dy * s + coef_avg + [x == zmax] * coef_max on one tile; dresidual = dy."""
    acc_t = g_ptr.dtype.element_ty
    pid = tl.program_id(0)
    p_blocks = tl.cdiv(P, BLOCK_P)
    c_blocks = tl.cdiv(channels, BLOCK_C)
    pb, rest = pid % p_blocks, pid // p_blocks
    group, cb = rest // c_blocks, rest % c_blocks
    group, c, chan, c_mask = _channel_block(group, cb, channels, BLOCK_C, WIDE)
    offs, mask = _tile(group, c, c_mask, pb * BLOCK_P, P, stride_n, stride_c, stride_p, BLOCK_P,
                       WIDE)
    dy = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(acc_t)
    if OUT_RELU:
        o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(acc_t)
        dy = tl.where(o > 0, dy, 0.0)
    s = _gate(tl.load(g_ptr + chan, mask=c_mask, other=0.0), GATE)
    dx = dy * s[:, None]
    if HAS_AVG:
        dx += tl.load(coef_avg_ptr + chan, mask=c_mask, other=0.0)[:, None]
    if USE_MAX:
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t)
        peak = tl.load(zmax_ptr + chan, mask=c_mask, other=0.0)
        share = tl.load(coef_max_ptr + chan, mask=c_mask, other=0.0)
        dx += tl.where(v == peak[:, None], share[:, None], 0.0)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if WRITE_DRES:
        tl.store(dres_ptr + offs, dy.to(dres_ptr.dtype.element_ty), mask=mask)


# The MLP kernels work on [N, C] / [N, S] vectors and the [S, C] / [C, S] weights. Each
# program owns a [BLOCK_N, BLOCK_M] block of outputs and walks the reduction axis in blocks
# of BLOCK_K, accumulating products in a [BLOCK_N, BLOCK_M, BLOCK_K] register tile that is
# summed once at the end: plain FMAs in the loop, one fixed-order reduction, any dtype
# (fp64 included, which tl.dot does not promise), any S and C.


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
    else:
        z = 0.5 * (total / P) + 0.5 * peak
    return tl.where(mask, z, 0.0), peak


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
    pid = tl.program_id(0)
    s_blocks = tl.cdiv(S, BLOCK_S)
    nb, sb = pid // s_blocks, pid % s_blocks
    n = (nb * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    n_mask, s_mask = n < N, s < S
    acc = tl.zeros([BLOCK_N, BLOCK_S, BLOCK_C], acc_t)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        mask = n_mask[:, None] & c_mask[None, :]
        idx = n[:, None] * C + c[None, :]
        z, peak = _combine_pool(sum_ptr, max_ptr, idx, mask, nc, splits, P, POOL,
                                BLOCK_N, BLOCK_C)
        if sb == 0:
            tl.store(z_ptr + idx, z, mask=mask)
            if POOL != AVG:
                tl.store(zmax_ptr + idx, peak, mask=mask)
        w = tl.load(w1_ptr + s[:, None] * C + c[None, :],
                    mask=s_mask[:, None] & c_mask[None, :], other=0.0).to(acc_t)
        acc += z[:, None, :] * w[None, :, :]
    a = tl.sum(acc, 2)
    if HAS_BIAS:
        a += tl.load(b1_ptr + s, mask=s_mask, other=0.0).to(acc_t)[None, :]
    tl.store(a_ptr + n[:, None] * S + s[None, :], a, mask=n_mask[:, None] & s_mask[None, :])


@triton.jit
def _excite_fc_kernel(
    a_ptr, g_ptr, w2_ptr, b2_ptr,
    N, C, S,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """g = act(a) W2^T + b2 for BLOCK_N samples and BLOCK_C channels."""
    acc_t = g_ptr.dtype.element_ty
    pid = tl.program_id(0)
    c_blocks = tl.cdiv(C, BLOCK_C)
    nb, cb = pid // c_blocks, pid % c_blocks
    n = (nb * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    n_mask, c_mask = n < N, c < C
    acc = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], acc_t)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_mask = s < S
        a = tl.load(a_ptr + n[:, None] * S + s[None, :],
                    mask=n_mask[:, None] & s_mask[None, :], other=0.0)
        h = _activation(a, ACT)  # act(0) == 0: masked units add nothing
        w = tl.load(w2_ptr + c[:, None] * S + s[None, :],
                    mask=c_mask[:, None] & s_mask[None, :], other=0.0).to(acc_t)
        acc += h[:, None, :] * w[None, :, :]
    g = tl.sum(acc, 2)
    if HAS_BIAS:
        g += tl.load(b2_ptr + c, mask=c_mask, other=0.0).to(acc_t)[None, :]
    tl.store(g_ptr + n[:, None] * C + c[None, :], g, mask=n_mask[:, None] & c_mask[None, :])


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
    pid = tl.program_id(0)
    s_blocks = tl.cdiv(S, BLOCK_S)
    nb, sb = pid // s_blocks, pid % s_blocks
    n = (nb * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    n_mask, s_mask = n < N, s < S
    acc = tl.zeros([BLOCK_N, BLOCK_S, BLOCK_C], acc_t)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        mask = n_mask[:, None] & c_mask[None, :]
        idx = n[:, None] * C + c[None, :]
        ds = tl.zeros([BLOCK_N, BLOCK_C], acc_t)
        for k in range(splits):
            ds += tl.load(ds_ptr + k * nc + idx, mask=mask, other=0.0)
        dg = ds * _gate_grad(tl.load(g_ptr + idx, mask=mask, other=0.0), GATE)
        if sb == 0:
            tl.store(dg_ptr + idx, dg, mask=mask)
        # w[s, c] = W2[c, s]
        w = tl.load(w2_ptr + c[None, :] * S + s[:, None],
                    mask=s_mask[:, None] & c_mask[None, :], other=0.0).to(acc_t)
        acc += dg[:, None, :] * w[None, :, :]
    dh = tl.sum(acc, 2)
    out = n[:, None] * S + s[None, :]
    out_mask = n_mask[:, None] & s_mask[None, :]
    a = tl.load(a_ptr + out, mask=out_mask, other=0.0)
    tl.store(da_ptr + out, _activation_grad(a, dh, ACT), mask=out_mask)


@triton.jit
def _squeeze_fc_backward_kernel(
    da_ptr, w1_ptr, count_ptr, coef_avg_ptr, coef_max_ptr,
    N, C, S, P, splits, nc,
    POOL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """dz = da W1 for BLOCK_N samples and BLOCK_C channels, stored as what dx adds per
    channel: coef_avg = dz / P everywhere, coef_max = dz / ties at the max (halves of each
    for avgmax)."""
    acc_t = da_ptr.dtype.element_ty
    pid = tl.program_id(0)
    c_blocks = tl.cdiv(C, BLOCK_C)
    nb, cb = pid // c_blocks, pid % c_blocks
    n = (nb * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    n_mask, c_mask = n < N, c < C
    acc = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], acc_t)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_mask = s < S
        da = tl.load(da_ptr + n[:, None] * S + s[None, :],
                     mask=n_mask[:, None] & s_mask[None, :], other=0.0)
        # w[c, s] = W1[s, c]
        w = tl.load(w1_ptr + s[None, :] * C + c[:, None],
                    mask=c_mask[:, None] & s_mask[None, :], other=0.0).to(acc_t)
        acc += da[:, None, :] * w[None, :, :]
    dz = tl.sum(acc, 2)
    mask = n_mask[:, None] & c_mask[None, :]
    idx = n[:, None] * C + c[None, :]
    if POOL == AVG:
        tl.store(coef_avg_ptr + idx, dz / P, mask=mask)
    else:
        ties = tl.zeros([BLOCK_N, BLOCK_C], tl.int32)
        for k in range(splits):
            ties += tl.load(count_ptr + k * nc + idx, mask=mask, other=1)
        ties = tl.where(ties > 0, ties, 1).to(acc_t)  # 0 only off the edge, or for NaN rows
        if POOL == MAX:
            tl.store(coef_max_ptr + idx, dz / ties, mask=mask)
        else:
            tl.store(coef_avg_ptr + idx, dz * 0.5 / P, mask=mask)
            tl.store(coef_max_ptr + idx, dz * 0.5 / ties, mask=mask)


@triton.jit
def _weight_grad_tile(
    u_ptr, v_ptr, out_ptr, bias_ptr, N, U, V, ub, vb, out_stride_u, out_stride_v,
    ACT_ON_V: tl.constexpr, BIAS_FROM_U: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """out[u, v] = sum_n u[n, u] * f(v[n, v]) for one [BLOCK_U, BLOCK_V] tile, with the
    samples summed in order; bias = sum_n of the u (or v) operand, stored by the tiles of
    the first v (or u) block."""
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
        if ACT_ON_V:
            v = _activation(v, ACT_ON_V - 1)
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
def _weight_grad_kernel(
    dg_ptr, a_ptr, da_ptr, z_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
    N, C, S,
    ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Even programs: a tile of dW2 = dg^T act(a) and db2 = sum_n dg; odd programs: the
    same tile of dW1^T = z^T da and db1 = sum_n da. One launch for both layers."""
    pid = tl.program_id(0)
    which, tile = pid % 2, pid // 2
    s_blocks = tl.cdiv(S, BLOCK_S)
    cb, sb = tile // s_blocks, tile % s_blocks
    if which == 0:
        # dW2[c, s] at c * S + s
        _weight_grad_tile(dg_ptr, a_ptr, dw2_ptr, db2_ptr, N, C, S, cb, sb, S, 1,
                          ACT + 1, True, BLOCK_N, BLOCK_C, BLOCK_S)
    else:
        # dW1[s, c] at s * C + c
        _weight_grad_tile(z_ptr, da_ptr, dw1_ptr, db1_ptr, N, C, S, cb, sb, 1, C,
                          0, False, BLOCK_N, BLOCK_C, BLOCK_S)


# ---------------------------------------------------------------------------------------
# Launch heuristics
# ---------------------------------------------------------------------------------------
#
# No autotuning: every block size is a function of the shape, computed once per shape
# (functools.lru_cache), so a call never waits on a benchmark and CUDA-graph capture sees
# the same launches as eager. The reasoning, for H100/A100-class GPUs (retune the constants
# of GPU_PROFILE from benchmarks; tests/test_triton.py pins the choices they should make):
#
# * The four passes over x are memory-bound. A program loads an 8 KiB tile per operand and
#   iteration (tile_bytes: 4096 bf16, 2048 fp32 elements), 16 elements per thread (one or
#   two 16-byte vectors; 4 warps for fp32, 8 for bf16). At 32 elements per thread the
#   compiled passes needed 100-170 registers (ptxas, sm_80), one program per SM; at 16 they
#   leave room for three or more, i.e. ~24 KiB of loads in flight per SM, above the
#   ~18 KiB that H100's bandwidth-latency product asks per SM (3.35 TB/s x ~0.7 us / 132).
# * Tiles are [channels, pixels]. The contiguous axis (pixels in NCHW, channels in
#   channels-last) takes the whole extent rounded up to a power of two when that is at most
#   `contiguous_max`: the tile then covers a dense stretch of memory and the padding costs
#   lanes, not bytes. Longer extents are cut in the largest power-of-two block that pads
#   them by at most 1/16 (3136 = 56*56 pixels: 256, not 1024, which would pad by 31%).
# * The reduction passes must still fill the GPU at small N*C (N=1 inference, late stages):
#   H*W is split into pieces reduced by separate programs until there are
#   `programs_per_sm` programs per SM, keeping at least `min_tiles_per_piece` tiles of work
#   per piece; the MLP kernels combine the pieces in order.
# * The MLP kernels are small GEMMs (N x C x S) on CUDA cores. A program's register tile
#   holds `mlp_tile` fp32 products (half as many fp64). Its output block is kept square-ish
#   (samples x features): every program re-reads the weight rows of its features and the
#   vectors of its samples, so the L2 traffic goes as 1/block_n + 1/block_m. Blocks shrink
#   (the larger side first) until the grid has `programs_per_sm` programs per SM.
#
# The interpreter profile (CPU tensors, TRITON_INTERPRET=1) follows its own cost model:
# ~2.5 ms per program and per loop iteration, numpy-vectorized inside, so it wants the
# fewest, largest programs.


@dataclass(frozen=True)
class DeviceProfile:
    sm_count: int
    tile_bytes: int           # bytes of x per tile in the passes over x
    elems_per_thread: int     # tile elements per thread: sets num_warps, bounds registers
    contiguous_max: int       # longest block along the contiguous axis of x
    programs_per_sm: int      # programs wanted per SM (reduction passes, MLP kernels)
    min_tiles_per_piece: int  # least work (in tiles) for one H*W piece of a reduction
    mlp_tile: int             # fp32 products in an MLP program's register tile
    mlp_block_max: int        # longest MLP block along an output axis
    mlp_inner_max: int        # longest MLP block along the reduction
    max_warps: int


GPU_PROFILE = DeviceProfile(sm_count=132, tile_bytes=8192, elems_per_thread=16,
                            contiguous_max=1024,
                            programs_per_sm=4, min_tiles_per_piece=2, mlp_tile=4096,
                            mlp_block_max=64, mlp_inner_max=128, max_warps=8)
INTERPRETER_PROFILE = DeviceProfile(sm_count=1, tile_bytes=1 << 18, elems_per_thread=1 << 10,
                                    contiguous_max=1 << 14,
                                    programs_per_sm=1, min_tiles_per_piece=1,
                                    mlp_tile=1 << 16, mlp_block_max=1024, mlp_inner_max=1024,
                                    max_warps=4)


@dataclass(frozen=True)
class PassConfig:
    """Launch config of the passes over x: [block_c, block_p] tiles; the reduction passes
    cut H*W into `splits` pieces of `p_per_split` pixels (a multiple of block_p)."""
    block_c: int
    block_p: int
    num_warps: int
    splits: int
    p_per_split: int


@dataclass(frozen=True)
class MLPConfig:
    """Register tiles [block_n, block_m, block_k] of an MLP kernel: block_n samples and
    block_m output features per program, block_k along the reduction. For the weight
    gradients the output tile is [block_m of C, block_k of S] and block_n samples are summed
    per step."""
    block_n: int
    block_m: int
    block_k: int
    num_warps: int


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _contiguous_block(extent: int, largest: int) -> int:
    """Block along the contiguous axis (see the notes above)."""
    if _pow2(extent) <= largest:
        return _pow2(extent)
    block = largest
    while block > 16 and math.ceil(extent / block) * block > extent * 17 / 16:
        block //= 2
    return block


@functools.lru_cache(maxsize=1024)
def pass_config(n: int, c: int, p: int, channels_last: bool, elem_size: int,
                profile: DeviceProfile) -> PassConfig:
    tile = max(256, profile.tile_bytes // elem_size)
    num_warps = max(1, min(profile.max_warps, tile // (32 * profile.elems_per_thread)))
    if channels_last:
        block_c = _contiguous_block(c, min(profile.contiguous_max, tile))
        block_p = min(_pow2(p), max(1, tile // block_c))
        groups, channels = n, c
    else:
        block_p = _contiguous_block(p, min(profile.contiguous_max, tile))
        block_c = min(_pow2(n * c), max(1, tile // block_p))
        groups, channels = 1, n * c
    base = max(1, groups * math.ceil(channels / block_c))
    wanted = math.ceil(profile.programs_per_sm * profile.sm_count / base)
    most = max(1, math.ceil(p / (block_p * profile.min_tiles_per_piece)))
    splits = max(1, min(wanted, most))
    p_per_split = math.ceil(math.ceil(p / splits) / block_p) * block_p
    splits = math.ceil(p / p_per_split)
    return PassConfig(block_c, block_p, num_warps, splits, p_per_split)


def _square_tiles(rows: int, cols: int, inner: int, inner_max: int, acc_size: int,
                  profile: DeviceProfile, programs_per_tile: int = 1) -> tuple[int, int, int]:
    """[block_rows, block_cols] output tiles with a block_inner third axis, within the
    register budget, square-ish, and shrunk (larger side first) to fill the GPU."""
    budget = profile.mlp_tile * 4 // acc_size
    cap = profile.mlp_block_max
    bi = min(_pow2(inner), inner_max, budget)
    br, bc = min(_pow2(rows), cap), min(_pow2(cols), cap)
    while br * bc * bi > budget:
        if br > bc:
            br //= 2
        else:
            bc //= 2
    target = profile.programs_per_sm * profile.sm_count

    def programs():
        return programs_per_tile * math.ceil(rows / br) * math.ceil(cols / bc)

    while programs() < target and (br > 1 or bc > 1):
        if br >= bc and br > 1:
            br //= 2
        else:
            bc //= 2
    return br, bc, bi


@functools.lru_cache(maxsize=1024)
def mlp_config(n: int, m: int, k: int, acc_size: int, profile: DeviceProfile) -> MLPConfig:
    """Per-sample matrix-vector products: n samples, m outputs, a reduction over k."""
    # A long reduction block: fewer dependent iterations of load-then-FMA per program.
    block_n, block_m, block_k = _square_tiles(n, m, k, profile.mlp_inner_max, acc_size, profile)
    return MLPConfig(block_n, block_m, block_k, num_warps=4)


@functools.lru_cache(maxsize=1024)
def weight_grad_config(n: int, c: int, s: int, acc_size: int,
                       profile: DeviceProfile) -> MLPConfig:
    """dW tiles over [C, S]; the batch is the reduction, two programs (dW1, dW2) a tile."""
    # The batch block only sets the loop length; the budget goes to the output tile.
    block_c, block_s, block_n = _square_tiles(c, s, n, 16, acc_size, profile, programs_per_tile=2)
    return MLPConfig(block_n, block_c, block_s, num_warps=4)


@functools.lru_cache(maxsize=16)
def _cuda_profile(index: int) -> DeviceProfile:
    props = torch.cuda.get_device_properties(index)
    return DeviceProfile(**{**GPU_PROFILE.__dict__, "sm_count": props.multi_processor_count})


def device_profile(device: torch.device) -> DeviceProfile:
    if INTERPRETED:
        return INTERPRETER_PROFILE
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_profile(index)


# ---------------------------------------------------------------------------------------
# Drivers: allocate, launch. These run inside the triton_op bodies, so they may only call
# torch operators and launch kernels (they are traced by torch.compile with fake tensors).
# x stands in for every pointer that a constexpr branch never touches: no kernel writes x,
# so no stand-in aliases a kernel's output (torch.compile's functionalization of the
# launches would have to assume they overlap).
# ---------------------------------------------------------------------------------------

INTERPRETED = not isinstance(_pool_kernel, JITFunction)


def _squeeze_interpreter_loop_bounds() -> None:
    """Let the interpreter turn scalars into loop bounds on every supported Triton.

    The interpreter holds a scalar as a 1-element array and gives it `__index__` for
    `range(lo, hi, step)`. Triton 3.6 does that with `int(array)`, which numpy 2.5 refuses
    for arrays that are not 0-d ("only 0-dimensional arrays can be converted to Python
    scalars"); Triton 3.8 squeezes first. Re-set `__index__` after the interpreter's own
    patching, the 3.8 way, so the kernels' data-dependent loops need no interpreter-only
    form. A Triton without this hook gets nothing changed.
    """
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "squeezes_loop_bounds", False):
        return

    def patch_tensor_squeezing(tensor, scope, *rest, **kwargs):
        patch_tensor(tensor, scope, *rest, **kwargs)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch_tensor_squeezing.squeezes_loop_bounds = True
    interpreter._patch_lang_tensor = patch_tensor_squeezing


if INTERPRETED:
    _squeeze_interpreter_loop_bounds()


def _launch(kernel, programs: int, *args, **meta) -> None:
    if programs == 0:
        return
    if INTERPRETED:
        # The interpreter runs on real CPU tensors and cannot be traced; under fake tensors
        # (shape propagation: torch.compile, opcheck) a launch only writes its outputs, so
        # there is nothing to do. torch.compile keeps the op opaque here (triton_ops.py).
        if any(isinstance(a, torch.Tensor) and torch._subclasses.fake_tensor.is_fake(a)
               for a in args):
            return
        meta.pop("num_warps", None)
        kernel[(programs,)](*args, **meta)
    else:
        torch.library.wrap_triton(kernel)[(programs,)](*args, **meta)


@dataclass(frozen=True)
class _View:
    """x as [groups, channels, P] with strides, for the pass kernels."""
    groups: int
    channels: int
    p: int
    stride_n: int
    stride_c: int
    stride_p: int
    channels_last: bool
    wide: bool


def _view(x: torch.Tensor, channels_last: bool) -> _View:
    n, c, h, w = (int(d) for d in x.shape)
    p = h * w
    wide = n * c * p >= 2**31
    if channels_last:
        return _View(n, c, p, p * c, 1, c, True, wide)
    return _View(1, n * c, p, 0, p, 1, False, wide)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(x, w1, b1, w2, b2, residual, activation, gate, pool, out_activation, memory_format):
    x = x.contiguous(memory_format=memory_format)
    residual = None if residual is None else residual.contiguous(memory_format=memory_format)
    w1, w2 = w1.contiguous(), w2.contiguous()
    b1 = None if b1 is None else b1.contiguous()
    b2 = None if b2 is None else b2.contiguous()
    # Launch configs are chosen per concrete shape (torch.compile specializes on them).
    n, c, s = int(x.shape[0]), int(x.shape[1]), int(w1.shape[0])
    acc = _acc_dtype(x.dtype)
    use_max = pool != "avg"
    view = _view(x, memory_format == torch.channels_last)
    profile = device_profile(x.device)

    out = torch.empty_like(x, memory_format=memory_format)
    z = x.new_empty((n, c), dtype=acc)
    zmax = x.new_empty((n, c) if use_max else (0,), dtype=acc)
    a = x.new_empty((n, s), dtype=acc)
    g = x.new_empty((n, c), dtype=acc)
    if n == 0:
        return out, z, zmax, a, g

    cfg = pass_config(n, c, view.p, view.channels_last, x.element_size(), profile)
    sums = x.new_empty((cfg.splits, n * c), dtype=acc)
    maxes = x.new_empty((cfg.splits, n * c), dtype=acc) if use_max else x
    c_blocks = math.ceil(view.channels / cfg.block_c)
    _launch(_pool_kernel, view.groups * c_blocks * cfg.splits,
            x, sums, maxes, view.groups, view.channels, view.p, view.stride_n, view.stride_c,
            view.stride_p, cfg.p_per_split, cfg.splits,
            USE_MAX=use_max, BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p, WIDE=view.wide,
            num_warps=cfg.num_warps)

    fc1 = mlp_config(n, s, c, acc.itemsize, profile)
    _launch(_squeeze_fc_kernel, math.ceil(n / fc1.block_n) * math.ceil(s / fc1.block_m),
            sums, maxes, z, zmax if use_max else x, a, w1, x if b1 is None else b1,
            n, c, s, view.p, cfg.splits, n * c,
            POOL=POOLS[pool], HAS_BIAS=b1 is not None,
            BLOCK_N=fc1.block_n, BLOCK_S=fc1.block_m, BLOCK_C=fc1.block_k,
            num_warps=fc1.num_warps)

    fc2 = mlp_config(n, c, s, acc.itemsize, profile)
    _launch(_excite_fc_kernel, math.ceil(n / fc2.block_n) * math.ceil(c / fc2.block_m),
            a, g, w2, x if b2 is None else b2, n, c, s,
            ACT=ACTIVATIONS[activation], HAS_BIAS=b2 is not None,
            BLOCK_N=fc2.block_n, BLOCK_C=fc2.block_m, BLOCK_S=fc2.block_k,
            num_warps=fc2.num_warps)

    p_blocks = math.ceil(view.p / cfg.block_p)
    _launch(_scale_kernel, view.groups * c_blocks * p_blocks,
            x, x if residual is None else residual, out, g,
            view.channels, view.p, view.stride_n, view.stride_c, view.stride_p,
            GATE=GATES[gate], HAS_RESIDUAL=residual is not None,
            OUT_RELU=out_activation == "relu",
            BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p, WIDE=view.wide, num_warps=cfg.num_warps)
    return out, z, zmax, a, g


def backward(grad_out, x, out, w1, w2, z, zmax, a, g, activation, gate, pool, out_activation,
             residual_grad, memory_format):
    x = x.contiguous(memory_format=memory_format)
    grad_out = grad_out.contiguous(memory_format=memory_format)
    out_relu = out_activation == "relu"
    out = out.contiguous(memory_format=memory_format) if out_relu else None
    w1, w2 = w1.contiguous(), w2.contiguous()
    z, a, g = z.contiguous(), a.contiguous(), g.contiguous()
    use_max = pool != "avg"
    zmax = zmax.contiguous() if use_max else None
    n, c, s = int(x.shape[0]), int(x.shape[1]), int(w1.shape[0])
    acc = _acc_dtype(x.dtype)
    view = _view(x, memory_format == torch.channels_last)
    profile = device_profile(x.device)

    dx = torch.empty_like(x, memory_format=memory_format)
    write_dres = out_relu and residual_grad
    dres = torch.empty_like(x, memory_format=memory_format) if write_dres else x.new_empty((0,))
    dw1, db1 = torch.empty_like(w1), w1.new_empty((s,))
    dw2, db2 = torch.empty_like(w2), w2.new_empty((c,))

    cfg = pass_config(n, c, view.p, view.channels_last, x.element_size(), profile)
    ds = x.new_empty((cfg.splits, n * c), dtype=acc)
    ties = x.new_empty((cfg.splits, n * c), dtype=torch.int32) if use_max else x
    c_blocks = math.ceil(view.channels / cfg.block_c)
    _launch(_grad_reduce_kernel, view.groups * c_blocks * cfg.splits,
            grad_out, x if out is None else out, x, x if zmax is None else zmax, ds, ties,
            view.groups, view.channels, view.p, view.stride_n, view.stride_c, view.stride_p,
            cfg.p_per_split, cfg.splits,
            OUT_RELU=out_relu, USE_MAX=use_max,
            BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p, WIDE=view.wide, num_warps=cfg.num_warps)

    dg = x.new_empty((n, c), dtype=acc)
    da = x.new_empty((n, s), dtype=acc)
    bwd2 = mlp_config(n, s, c, acc.itemsize, profile)
    _launch(_excite_fc_backward_kernel, math.ceil(n / bwd2.block_n) * math.ceil(s / bwd2.block_m),
            ds, g, a, w2, dg, da, n, c, s, cfg.splits, n * c,
            ACT=ACTIVATIONS[activation], GATE=GATES[gate],
            BLOCK_N=bwd2.block_n, BLOCK_S=bwd2.block_m, BLOCK_C=bwd2.block_k,
            num_warps=bwd2.num_warps)

    wg = weight_grad_config(n, c, s, acc.itemsize, profile)
    _launch(_weight_grad_kernel, 2 * math.ceil(c / wg.block_m) * math.ceil(s / wg.block_k),
            dg, a, da, z, dw1, db1, dw2, db2, n, c, s,
            ACT=ACTIVATIONS[activation],
            BLOCK_N=wg.block_n, BLOCK_C=wg.block_m, BLOCK_S=wg.block_k, num_warps=wg.num_warps)

    has_avg = pool != "max"
    coef_avg = x.new_empty((n, c), dtype=acc) if has_avg else x
    coef_max = x.new_empty((n, c), dtype=acc) if use_max else x
    bwd1 = mlp_config(n, c, s, acc.itemsize, profile)
    _launch(_squeeze_fc_backward_kernel, math.ceil(n / bwd1.block_n) * math.ceil(c / bwd1.block_m),
            da, w1, ties, coef_avg, coef_max, n, c, s, view.p, cfg.splits, n * c,
            POOL=POOLS[pool],
            BLOCK_N=bwd1.block_n, BLOCK_C=bwd1.block_m, BLOCK_S=bwd1.block_k,
            num_warps=bwd1.num_warps)

    p_blocks = math.ceil(view.p / cfg.block_p)
    _launch(_grad_input_kernel, view.groups * c_blocks * p_blocks,
            grad_out, x if out is None else out, x, g, x if zmax is None else zmax,
            coef_avg, coef_max, dx, dres if write_dres else x,
            view.channels, view.p, view.stride_n, view.stride_c, view.stride_p,
            GATE=GATES[gate], OUT_RELU=out_relu, HAS_AVG=has_avg, USE_MAX=use_max,
            WRITE_DRES=write_dres, BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p, WIDE=view.wide,
            num_warps=cfg.num_warps)
    return dx, dw1, db1, dw2, db2, dres
