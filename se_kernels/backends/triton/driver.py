"""The Triton backend's drivers: they allocate the outputs and launch the kernels.

They run inside the triton_op bodies (ops.py), so they may only call torch operators and
launch kernels: torch.compile traces them with fake tensors. Launch configs are chosen per
concrete shape (heuristics.py; torch.compile specializes on shapes). x stands in for every
pointer that a constexpr branch never touches: no kernel writes x, so no stand-in aliases a
kernel's output (torch.compile's functionalization of the launches would have to assume
they overlap). The schedule, with its launches and bytes, is in DESIGN.md §3.2.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from ..._ops import accumulate_dtype
from ...vocabulary import AVG, MAX, OUT_RELU, code
from . import interpreter
from .heuristics import DeviceProfile, device_profile, mlp_config, pass_config, weight_grad_config
from .kernels import (_excite_fc_backward_kernel, _excite_fc_kernel, _grad_input_kernel,
                      _grad_reduce_kernel, _pool_kernel, _scale_kernel,
                      _squeeze_fc_backward_kernel, _squeeze_fc_kernel, _weight_grad_kernel)

INTERPRETED = interpreter.kernels_interpreted()
if INTERPRETED:
    interpreter.squeeze_loop_bounds()


# While `recording` is active: the profile every call plans with, and the list its launches
# go to instead of the GPU.
_recording: tuple[DeviceProfile, list] | None = None


@contextlib.contextmanager
def recording(profile: DeviceProfile):
    """Calls plan with `profile` and record their launches as (kernel, programs, args, meta)
    in the list this yields, launching nothing (se_kernels.plan's traces)."""
    global _recording
    launches: list = []
    previous, _recording = _recording, (profile, launches)
    try:
        yield launches
    finally:
        _recording = previous


def _profile(device: torch.device) -> DeviceProfile:
    return device_profile(device) if _recording is None else _recording[0]


def _launch(kernel, programs: int, *args, **meta) -> None:
    if programs == 0:
        return
    if _recording is not None:
        _recording[1].append((kernel, programs, args, meta))
    elif INTERPRETED:
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


def _view(x: torch.Tensor, channels_last: bool) -> _View:
    n, c, h, w = (int(d) for d in x.shape)
    p = h * w
    wide = n * c * p >= 2**31
    if channels_last:
        return _View(n, c, p, p * c, 1, c, True, wide)
    return _View(1, n * c, p, 0, p, 1, False, wide)


def forward(x, w1, b1, w2, b2, residual, activation, gate, pool, out_activation, memory_format):
    x = x.contiguous(memory_format=memory_format)
    residual = None if residual is None else residual.contiguous(memory_format=memory_format)
    w1, w2 = w1.contiguous(), w2.contiguous()
    b1 = None if b1 is None else b1.contiguous()
    b2 = None if b2 is None else b2.contiguous()
    n, c, s = int(x.shape[0]), int(x.shape[1]), int(w1.shape[0])
    acc = accumulate_dtype(x.dtype)
    use_max = pool != AVG
    view = _view(x, memory_format == torch.channels_last)
    profile = _profile(x.device)

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
            POOL=code("pool", pool), HAS_BIAS=b1 is not None,
            BLOCK_N=fc1.block_n, BLOCK_S=fc1.block_m, BLOCK_C=fc1.block_k,
            num_warps=fc1.num_warps)

    fc2 = mlp_config(n, c, s, acc.itemsize, profile)
    _launch(_excite_fc_kernel, math.ceil(n / fc2.block_n) * math.ceil(c / fc2.block_m),
            a, g, w2, x if b2 is None else b2, n, c, s,
            ACT=code("activation", activation), HAS_BIAS=b2 is not None,
            BLOCK_N=fc2.block_n, BLOCK_C=fc2.block_m, BLOCK_S=fc2.block_k,
            num_warps=fc2.num_warps)

    p_blocks = math.ceil(view.p / cfg.block_p)
    _launch(_scale_kernel, view.groups * c_blocks * p_blocks,
            x, x if residual is None else residual, out, g,
            view.channels, view.p, view.stride_n, view.stride_c, view.stride_p,
            GATE=code("gate", gate), HAS_RESIDUAL=residual is not None,
            OUT_RELU=out_activation == OUT_RELU,
            BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p, WIDE=view.wide, num_warps=cfg.num_warps)
    return out, z, zmax, a, g


def backward(grad_out, x, out, w1, w2, z, zmax, a, g, activation, gate, pool, out_activation,
             residual_grad, memory_format):
    x = x.contiguous(memory_format=memory_format)
    grad_out = grad_out.contiguous(memory_format=memory_format)
    out_relu = out_activation == OUT_RELU
    out = out.contiguous(memory_format=memory_format) if out_relu else None
    w1, w2 = w1.contiguous(), w2.contiguous()
    z, a, g = z.contiguous(), a.contiguous(), g.contiguous()
    use_max = pool != AVG
    zmax = zmax.contiguous() if use_max else None
    n, c, s = int(x.shape[0]), int(x.shape[1]), int(w1.shape[0])
    acc = accumulate_dtype(x.dtype)
    view = _view(x, memory_format == torch.channels_last)
    profile = _profile(x.device)

    dx = torch.empty_like(x, memory_format=memory_format)
    write_dres = out_relu and residual_grad
    dres = torch.empty_like(x, memory_format=memory_format) if write_dres else x.new_empty((0,))
    dw1, db1 = torch.empty_like(w1), w1.new_empty((s,))
    dw2, db2 = torch.empty_like(w2), w2.new_empty((c,))

    cfg = pass_config(n, c, view.p, view.channels_last, x.element_size(), profile)
    ds = x.new_empty((cfg.splits, n * c), dtype=acc)
    count = x.new_empty((cfg.splits, n * c), dtype=torch.int32) if use_max else x
    c_blocks = math.ceil(view.channels / cfg.block_c)
    _launch(_grad_reduce_kernel, view.groups * c_blocks * cfg.splits,
            grad_out, x if out is None else out, x, x if zmax is None else zmax, ds, count,
            view.groups, view.channels, view.p, view.stride_n, view.stride_c, view.stride_p,
            cfg.p_per_split, cfg.splits,
            OUT_RELU=out_relu, USE_MAX=use_max,
            BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p, WIDE=view.wide, num_warps=cfg.num_warps)

    dg = x.new_empty((n, c), dtype=acc)
    da = x.new_empty((n, s), dtype=acc)
    bwd2 = mlp_config(n, s, c, acc.itemsize, profile)
    _launch(_excite_fc_backward_kernel, math.ceil(n / bwd2.block_n) * math.ceil(s / bwd2.block_m),
            ds, g, a, w2, dg, da, n, c, s, cfg.splits, n * c,
            ACT=code("activation", activation), GATE=code("gate", gate),
            BLOCK_N=bwd2.block_n, BLOCK_S=bwd2.block_m, BLOCK_C=bwd2.block_k,
            num_warps=bwd2.num_warps)

    wg = weight_grad_config(n, c, s, acc.itemsize, profile)
    _launch(_weight_grad_kernel, 2 * math.ceil(c / wg.block_m) * math.ceil(s / wg.block_k),
            dg, a, da, z, dw1, db1, dw2, db2, n, c, s,
            ACT=code("activation", activation),
            BLOCK_N=wg.block_n, BLOCK_C=wg.block_m, BLOCK_S=wg.block_k, num_warps=wg.num_warps)

    has_avg = pool != MAX
    dx_avg = x.new_empty((n, c), dtype=acc) if has_avg else x
    dx_max = x.new_empty((n, c), dtype=acc) if use_max else x
    bwd1 = mlp_config(n, c, s, acc.itemsize, profile)
    _launch(_squeeze_fc_backward_kernel, math.ceil(n / bwd1.block_n) * math.ceil(c / bwd1.block_m),
            da, w1, count, dx_avg, dx_max, n, c, s, view.p, cfg.splits, n * c,
            POOL=code("pool", pool),
            BLOCK_N=bwd1.block_n, BLOCK_C=bwd1.block_m, BLOCK_S=bwd1.block_k,
            num_warps=bwd1.num_warps)

    p_blocks = math.ceil(view.p / cfg.block_p)
    _launch(_grad_input_kernel, view.groups * c_blocks * p_blocks,
            grad_out, x if out is None else out, x, g, x if zmax is None else zmax,
            dx_avg, dx_max, dx, dres if write_dres else x,
            view.channels, view.p, view.stride_n, view.stride_c, view.stride_p,
            GATE=code("gate", gate), OUT_RELU=out_relu, HAS_AVG=has_avg, USE_MAX=use_max,
            WRITE_DRES=write_dres, BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p, WIDE=view.wide,
            num_warps=cfg.num_warps)
    return dx, dw1, db1, dw2, db2, dres
