"""The Triton backend's drivers: they allocate the outputs and launch the kernels.

They run inside the triton_op bodies (ops.py), so they may only call torch operators and
launch kernels: torch.compile traces them with fake tensors. Everything that depends only on
the call's shape, dtype, options and device (launch configs from heuristics.py, grids, the
kernels' integer arguments and constexprs) is planned once per such key (_forward_plan,
_backward_plan) and a call only allocates and launches: the host time per call is a few
allocations and the launches themselves (benchmarks/host_overhead.py). x stands in for every
pointer that a constexpr branch never touches: no kernel writes x, so no stand-in aliases a
kernel's output (torch.compile's functionalization of the launches would have to assume
they overlap). The schedule, with its launches and bytes, is in DESIGN.md §3.2.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..._ops import accumulate_dtype
from ...options import AVG, MAX, OUT_RELU, code
from . import interpreter
from .heuristics import (DeviceProfile, device_profile, map_walks_backwards, mlp_config, pass_config,
                         weight_grad_config)
from .kernels import (_excite_fc_backward_kernel, _excite_fc_kernel, _grad_input_kernel,
                      _grad_reduce_kernel, _mlp_grads_kernel, _pool_kernel, _scale_kernel,
                      _squeeze_fc_kernel)

INTERPRETED = interpreter.kernels_interpreted()
if INTERPRETED:
    interpreter.squeeze_loop_bounds()


def _launch(kernel, programs: int, *args, **meta) -> None:
    if programs == 0:
        return
    if INTERPRETED:
        interpreter.launch(kernel, programs, *args, **meta)
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


def _view(shape: tuple[int, ...], channels_last: bool) -> _View:
    n, c, h, w = shape
    p = h * w
    wide = n * c * p >= 2**31
    if channels_last:
        return _View(n, c, p, p * c, 1, c, True, wide)
    return _View(1, n * c, p, 0, p, 1, False, wide)


@dataclass(frozen=True)
class _Launch:
    """A kernel launch as planned: its grid, the integer arguments after its tensors, and
    its constexprs and launch options."""
    programs: int
    scalars: tuple
    meta: dict


def _map_launch(view: _View, cfg, total: int, backwards: bool, **constexprs) -> _Launch:
    """The map pass (_scale_kernel, _grad_input_kernel): flat blocks for NCHW, tiles for
    channels-last, walked in either direction (kernels._map_program)."""
    flat = cfg.flat_block > 0
    if flat:
        programs = math.ceil(total / cfg.flat_block)
        block_c, block_p, warps = 1, cfg.flat_block, cfg.flat_warps
    else:
        programs = (view.groups * math.ceil(view.channels / cfg.block_c)
                    * math.ceil(view.p / cfg.block_p))
        block_c, block_p, warps = cfg.block_c, cfg.block_p, cfg.num_warps
    return _Launch(programs,
                   (view.channels, view.p, total, view.stride_n, view.stride_c, view.stride_p),
                   dict(constexprs, BLOCK_C=block_c, BLOCK_P=block_p, FLAT=flat,
                        BACKWARDS=backwards, WIDE=view.wide, num_warps=warps))


def _reduce_launch(view: _View, cfg, elem_size: int, **constexprs) -> _Launch:
    """The reduction pass (_pool_kernel, _grad_reduce_kernel). NCHW rows are read in 16-byte
    vectors of VEC elements, with EDGES when a row or a piece of it starts or ends off a
    vector boundary (kernels._row_body)."""
    vec = 1 if view.channels_last else max(1, 16 // elem_size)
    edges = vec > 1 and (view.p % vec != 0 or (cfg.splits > 1 and cfg.p_per_split % vec != 0))
    return _Launch(view.groups * math.ceil(view.channels / cfg.block_c) * cfg.splits,
                   (view.groups, view.channels, view.p, view.stride_n, view.stride_c,
                    view.stride_p, cfg.p_per_split, cfg.splits),
                   dict(constexprs, BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p, VEC=vec,
                        EDGES=edges, WIDE=view.wide, num_warps=cfg.num_warps))


def _mlp_launch(programs: int, cfg, scalars: tuple, names: tuple[str, str, str],
                **constexprs) -> _Launch:
    """An MLP kernel, its [block_n, block_m, block_k] tile under the kernel's own names."""
    blocks = dict(zip(names, (cfg.block_n, cfg.block_m, cfg.block_k)))
    return _Launch(programs, scalars, dict(constexprs, **blocks, num_warps=cfg.num_warps))


def _dense(*shape: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape, strides) of a contiguous tensor: torch.empty_strided's arguments, the
    cheapest allocation call."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return shape, tuple(reversed(strides))


# The plans hold every allocation's (shape, strides).
@dataclass(frozen=True)
class _ForwardPlan:
    x: tuple  # out
    acc: torch.dtype
    nc: tuple
    ns: tuple
    zmax: tuple
    partials: tuple
    use_max: bool
    launches: tuple[_Launch, ...]  # pool, squeeze FC, excite FC, scale; none for N == 0


def _strides(shape: tuple[int, ...], channels_last: bool) -> tuple[int, ...]:
    """torch's strides of a dense [N, C, H, W] tensor in the layout."""
    n, c, h, w = shape
    if not channels_last:
        return _dense(*shape)[1]
    return (h * w * c, 1, w * c, c)


@functools.lru_cache(maxsize=512)
def _forward_plan(shape, s, dtype, channels_last, has_residual, has_b1, has_b2, activation,
                  gate, pool, out_activation, profile) -> _ForwardPlan:
    n, c = shape[0], shape[1]
    acc = accumulate_dtype(dtype)
    use_max = pool != AVG
    view = _view(shape, channels_last)
    total = n * c * view.p
    elem = dtype.itemsize
    sample = c * view.p * elem  # bytes of one sample of x
    cfg = pass_config(n, c, view.p, channels_last, elem, profile)
    launches = ()
    if n > 0:
        fc1 = mlp_config(n, s, c, acc.itemsize, profile)
        fc2 = mlp_config(n, c, s, acc.itemsize, profile)
        launches = (
            _reduce_launch(view, cfg, elem, SQUARES=False, USE_MAX=use_max, MINIMA=False),
            _mlp_launch(math.ceil(n / fc1.block_n) * math.ceil(s / fc1.block_m),
                        fc1, (n, c, s, view.p, cfg.splits, n * c), ("BLOCK_N", "BLOCK_S", "BLOCK_C"),
                        POOL=code("pool", pool), HAS_BIAS=has_b1),
            _mlp_launch(math.ceil(n / fc2.block_n) * math.ceil(c / fc2.block_m),
                        fc2, (n, c, s), ("BLOCK_N", "BLOCK_C", "BLOCK_S"),
                        ACT=code("activation", activation), HAS_BIAS=has_b2),
            # x read, then x (+ residual) read again and out written
            _map_launch(view, cfg, total,
                        map_walks_backwards(n, sample, (2 + has_residual) * sample, sample, profile),
                        GATE=code("gate", gate), HAS_SHIFT=False, HAS_RESIDUAL=has_residual,
                        OUT_RELU=out_activation == OUT_RELU),
        )
    return _ForwardPlan((shape, _strides(shape, channels_last)), acc, _dense(n, c), _dense(n, s),
                        _dense(n, c) if use_max else _dense(0), _dense(cfg.splits, n * c),
                        use_max, launches)


def forget_plans() -> None:
    """Drops the cached plans (for tests that change what plans are made of)."""
    _forward_plan.cache_clear()
    _backward_plan.cache_clear()


def forward(x, w1, b1, w2, b2, residual, activation, gate, pool, out_activation, memory_format,
            *, profile: DeviceProfile | None = None, launch=None):
    """The forward's outputs (out, z, zmax, a, g). `profile` (default: x's device's) is what
    the launches are planned for, and `launch(kernel, programs, *args, **meta)` (default:
    launch on the GPU, or interpret) makes them: se_kernels.plan records them instead."""
    launch = _launch if launch is None else launch
    x = x.contiguous(memory_format=memory_format)
    residual = None if residual is None else residual.contiguous(memory_format=memory_format)
    w1, w2 = w1.contiguous(), w2.contiguous()
    b1 = None if b1 is None else b1.contiguous()
    b2 = None if b2 is None else b2.contiguous()
    device = x.device
    plan = _forward_plan(tuple(map(int, x.shape)), int(w1.shape[0]), x.dtype,
                         memory_format == torch.channels_last, residual is not None,
                         b1 is not None, b2 is not None, activation, gate, pool, out_activation,
                         device_profile(device) if profile is None else profile)
    acc = plan.acc
    out = torch.empty_strided(*plan.x, dtype=x.dtype, device=device)
    z = torch.empty_strided(*plan.nc, dtype=acc, device=device)
    zmax = torch.empty_strided(*plan.zmax, dtype=acc, device=device)
    a = torch.empty_strided(*plan.ns, dtype=acc, device=device)
    g = torch.empty_strided(*plan.nc, dtype=acc, device=device)
    if not plan.launches:
        return out, z, zmax, a, g
    pool_pass, squeeze_fc, excite_fc, scale = plan.launches
    sums = torch.empty_strided(*plan.partials, dtype=acc, device=device)
    maxes = torch.empty_strided(*plan.partials, dtype=acc, device=device) if plan.use_max else x
    launch(_pool_kernel, pool_pass.programs, x, sums, x, maxes, x, x, x, *pool_pass.scalars,
           **pool_pass.meta)
    launch(_squeeze_fc_kernel, squeeze_fc.programs, sums, maxes, z, zmax if plan.use_max else x,
            a, w1, x if b1 is None else b1, *squeeze_fc.scalars, **squeeze_fc.meta)
    launch(_excite_fc_kernel, excite_fc.programs, a, g, w2, x if b2 is None else b2,
            *excite_fc.scalars, **excite_fc.meta)
    launch(_scale_kernel, scale.programs, x, x if residual is None else residual, out, g, x,
            x, x, *scale.scalars, **scale.meta)
    return out, z, zmax, a, g


@dataclass(frozen=True)
class _BackwardPlan:
    x: tuple  # dx, dresidual
    acc: torch.dtype
    nc: tuple
    ns: tuple
    partials: tuple
    w1: tuple
    w2: tuple
    s: tuple
    c: tuple
    nothing: tuple
    use_max: bool
    has_avg: bool
    write_dres: bool
    # grad reduce, excite FC backward, weight gradients + squeeze FC backward, grad input
    launches: tuple[_Launch, ...]


@functools.lru_cache(maxsize=512)
def _backward_plan(shape, s, dtype, channels_last, activation, gate, pool, out_activation,
                   residual_grad, profile) -> _BackwardPlan:
    n, c = shape[0], shape[1]
    acc = accumulate_dtype(dtype)
    use_max, has_avg = pool != AVG, pool != MAX
    out_relu = out_activation == OUT_RELU
    write_dres = out_relu and residual_grad
    view = _view(shape, channels_last)
    total = n * c * view.p
    elem = dtype.itemsize
    sample = c * view.p * elem  # bytes of one sample of x
    reread = (1 + out_relu + use_max) * sample
    cfg = pass_config(n, c, view.p, channels_last, elem, profile)
    bwd2 = mlp_config(n, s, c, acc.itemsize, profile)
    wg = weight_grad_config(n, c, s, acc.itemsize, profile)
    bwd1 = mlp_config(n, c, s, acc.itemsize, profile)
    weight_programs = 2 * math.ceil(c / wg.block_m) * math.ceil(s / wg.block_k)
    launches = (
        _reduce_launch(view, cfg, elem, OUT_RELU=out_relu, USE_MAX=use_max, SUM_DY=False,
                       WRITE_DRES=False),
        _mlp_launch(math.ceil(n / bwd2.block_n) * math.ceil(s / bwd2.block_m),
                    bwd2, (n, c, s, cfg.splits, n * c), ("BLOCK_N", "BLOCK_S", "BLOCK_C"),
                    ACT=code("activation", activation), GATE=code("gate", gate)),
        # the weight gradients' tiles first, then dz's blocks
        _Launch(weight_programs + math.ceil(n / bwd1.block_n) * math.ceil(c / bwd1.block_m),
                (n, c, s, view.p, cfg.splits, n * c, weight_programs),
                dict(ACT=code("activation", activation), POOL=code("pool", pool),
                     BLOCK_N=bwd1.block_n, BLOCK_C=bwd1.block_m, BLOCK_S=bwd1.block_k,
                     WG_BLOCK_N=wg.block_n, WG_BLOCK_C=wg.block_m, WG_BLOCK_S=wg.block_k,
                     num_warps=max(wg.num_warps, bwd1.num_warps))),
        # grad_out, x (+ out) read; grad_out (+ out, + x for max) read again, dx (+ dres) written
        _map_launch(view, cfg, total,
                    map_walks_backwards(n, (2 + out_relu) * sample, reread + (1 + write_dres) * sample,
                                        reread, profile),
                    GATE=code("gate", gate), OUT_RELU=out_relu, X_SCALE=False, HAS_AVG=has_avg,
                    USE_MAX=use_max, WRITE_DRES=write_dres),
    )
    return _BackwardPlan((shape, _strides(shape, channels_last)), acc, _dense(n, c), _dense(n, s),
                         _dense(cfg.splits, n * c), _dense(s, c), _dense(c, s), _dense(s),
                         _dense(c), _dense(0), use_max, has_avg, write_dres, launches)


def backward(grad_out, x, out, w1, w2, z, zmax, a, g, activation, gate, pool, out_activation,
             residual_grad, memory_format, *, profile: DeviceProfile | None = None, launch=None):
    """The backward's gradients (dx, dw1, db1, dw2, db2, dresidual); `profile` and `launch`
    as for forward."""
    launch = _launch if launch is None else launch
    x = x.contiguous(memory_format=memory_format)
    grad_out = grad_out.contiguous(memory_format=memory_format)
    out_relu = out_activation == OUT_RELU
    out = out.contiguous(memory_format=memory_format) if out_relu else None
    w1, w2 = w1.contiguous(), w2.contiguous()
    z, a, g = z.contiguous(), a.contiguous(), g.contiguous()
    zmax = zmax.contiguous() if pool != AVG else None
    device = x.device
    plan = _backward_plan(tuple(map(int, x.shape)), int(w1.shape[0]), x.dtype,
                          memory_format == torch.channels_last, activation, gate, pool,
                          out_activation, bool(residual_grad),
                          device_profile(device) if profile is None else profile)
    acc = plan.acc
    dx = torch.empty_strided(*plan.x, dtype=x.dtype, device=device)
    dres = torch.empty_strided(*(plan.x if plan.write_dres else plan.nothing), dtype=x.dtype,
                               device=device)
    dw1 = torch.empty_strided(*plan.w1, dtype=w1.dtype, device=device)
    db1 = torch.empty_strided(*plan.s, dtype=w1.dtype, device=device)
    dw2 = torch.empty_strided(*plan.w2, dtype=w2.dtype, device=device)
    db2 = torch.empty_strided(*plan.c, dtype=w2.dtype, device=device)
    reduce_pass, excite_fc, mlp_grads, grad_input = plan.launches
    ds = torch.empty_strided(*plan.partials, dtype=acc, device=device)
    count = torch.empty_strided(*plan.partials, dtype=torch.int32, device=device) if plan.use_max else x
    stand_in_zmax = x if zmax is None else zmax
    launch(_grad_reduce_kernel, reduce_pass.programs, grad_out, x if out is None else out, x,
            stand_in_zmax, ds, x, count, x, x, x, x, x, x, *reduce_pass.scalars,
            **reduce_pass.meta)
    dg = torch.empty_strided(*plan.nc, dtype=acc, device=device)
    da = torch.empty_strided(*plan.ns, dtype=acc, device=device)
    launch(_excite_fc_backward_kernel, excite_fc.programs, ds, g, a, w2, dg, da,
            *excite_fc.scalars, **excite_fc.meta)
    dx_avg = torch.empty_strided(*plan.nc, dtype=acc, device=device) if plan.has_avg else x
    dx_max = torch.empty_strided(*plan.nc, dtype=acc, device=device) if plan.use_max else x
    launch(_mlp_grads_kernel, mlp_grads.programs, dg, a, da, z, w1, count, dw1, db1, dw2, db2,
            dx_avg, dx_max, *mlp_grads.scalars, **mlp_grads.meta)
    launch(_grad_input_kernel, grad_input.programs, grad_out, x if out is None else out, x, g,
            x, stand_in_zmax, dx_avg, dx_max, dx, dres if plan.write_dres else x, x, x, x,
            *grad_input.scalars, **grad_input.meta)
    return dx, dw1, db1, dw2, db2, dres
