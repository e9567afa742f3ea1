"""The stream ops of the staged path (DESIGN.md §1.4) on Triton: se_kernels::stream_reduce_triton,
stream_map_triton, stream_grad_reduce_triton and stream_grad_map_triton, and the act tail's
(§1.5) stream_act_reduce_triton, stream_act_map_triton, stream_act_grad_reduce_triton and
stream_act_grad_map_triton, the same passes with the input prologue switched on (PRE_ACT).

They are torch.library.triton_op ops as the SE ops are (ops.py), with the schemas, checks,
fake kernels (their bodies) and FLOP formulas of se_kernels._stream_ops, and they run the
SE passes' kernels with the stream ops' constexpr branches on (kernels.py): one launch over
x per op. The reduce ops cut H*W into pieces as the SE passes do to fill the GPU at small
N*C; more than one piece is then added up by a torch reduction of the [pieces, N, C]
partials (no atomics anywhere: run to run the same bits). Plans are cached per shape, dtype, layout,
arguments given and device, as in driver.py, whose launch plumbing they reuse. Like the
drivers, the ops' bodies take the device profile to plan for and the `launch` that makes the
launches: se_kernels.plan runs them on fake tensors with its own (planning_ops).

Importing this module does not import triton: the drivers and kernels load on the first
call.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import Tensor

from ... import _ops, _stream_ops, options
from ...options import OUT_RELU
from .heuristics import DeviceProfile, device_profile, map_walks_backwards, pass_config
from .interpreter import keep_opaque_under_interpreter
from .ops import driver, launch_device


@functools.lru_cache(maxsize=512)
def _reduce_plan(shape, dtype, channels_last, profile, constexprs):
    view = driver()._view(shape, channels_last)
    cfg = pass_config(shape[0], shape[1], view.p, channels_last, dtype.itemsize, profile)
    return driver()._reduce_launch(view, cfg, dtype.itemsize, **dict(constexprs)), cfg.splits


@functools.lru_cache(maxsize=512)
def _map_plan(shape, dtype, channels_last, profile, first, second, reread, constexprs):
    """The map launch; per sample, the reduce op before it touched `first` samples' bytes of
    x-sized tensors, this one touches `second`, of which `reread` were the reduce op's
    (heuristics.map_walks_backwards)."""
    n = shape[0]
    view = driver()._view(shape, channels_last)
    cfg = pass_config(n, shape[1], view.p, channels_last, dtype.itemsize, profile)
    sample = shape[1] * view.p * dtype.itemsize
    backwards = map_walks_backwards(n, first * sample, second * sample, reread * sample, profile)
    return driver()._map_launch(view, cfg, n * shape[1] * view.p, backwards, **dict(constexprs))


def forget_plans() -> None:
    """Drops the cached plans (for tests that change what plans are made of)."""
    _reduce_plan.cache_clear()
    _map_plan.cache_clear()


def _kernels():
    """The kernels, imported on first use (as driver() imports them)."""
    from . import kernels
    return kernels


def _dense(t: Tensor | None, memory_format: torch.memory_format) -> Tensor | None:
    return None if t is None else t.contiguous(memory_format=memory_format)


def _vector(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _x_sized(x: Tensor, memory_format: torch.memory_format) -> Tensor:
    return torch.empty_like(x, memory_format=memory_format)


def _pieces(x: Tensor, splits: int, wanted: bool, dtype: torch.dtype) -> Tensor:
    """Where a reduce kernel stores one statistic: [N, C], or [splits, N, C] partials; an
    empty [0] tensor when the statistic is not asked for."""
    n, c = x.shape[0], x.shape[1]
    shape = ((n, c) if splits == 1 else (splits, n, c)) if wanted else (0,)
    return x.new_empty(shape, dtype=dtype)


# The PyTorch reduction of a split reduce's [pieces, N, C] partials, as a launch the plan
# records: a kernel's name and @touches declaration (kernels.py), its grid PyTorch's own.
PIECES_REDUCTION = types.SimpleNamespace(
    __name__="torch_reduce_pieces", arg_names=("pieces_ptr", "out_ptr"),
    accesses=(("pieces_ptr", False, None), ("out_ptr", True, None)))


def _combined(pieces: Tensor, how: str, dtype: torch.dtype, launch) -> Tensor:
    """The [N, C] statistic from its pieces (sum, amax or amin over them, in order); a
    recording `launch` (se_kernels.plan's) is shown the reduction as PIECES_REDUCTION."""
    if pieces.dim() == 3:
        combined = getattr(pieces, how)(0)
        if launch is not None:
            launch(PIECES_REDUCTION, 1, pieces, combined)
        pieces = combined
    return pieces.to(dtype)


def _profile(x: Tensor, profile: DeviceProfile | None) -> DeviceProfile:
    """The device profile to plan for: x's device's unless one is given."""
    return device_profile(x.device) if profile is None else profile


def _launcher(launch):
    """What makes a body's launches: the drivers' (on the GPU, or interpreted) unless a
    `launch` is given."""
    return driver()._launch if launch is None else launch


def _stand_in(t: Tensor | None, x: Tensor) -> Tensor:
    """x for a pointer that the launch's constexprs leave untouched (see driver.py)."""
    return x if t is None or t.numel() == 0 else t


def _reduce(x, squares, maxima, minima, *, profile=None, launch=None):
    memory_format = _ops.kernel_memory_format(x)
    x = _dense(x, memory_format)
    acc = _ops.accumulate_dtype(x.dtype)
    pass_, splits = _reduce_plan(tuple(map(int, x.shape)), x.dtype,
                                 memory_format == torch.channels_last, _profile(x, profile),
                                 (("SQUARES", squares), ("USE_MAX", maxima), ("MINIMA", minima)))
    sums, sumsq, maxes, mins = (_pieces(x, splits, wanted, acc)
                                for wanted in (True, squares, maxima, minima))
    _launcher(launch)(_kernels()._pool_kernel, pass_.programs, x, sums,
                      _stand_in(sumsq, x), _stand_in(maxes, x), _stand_in(mins, x), x, x,
                      *pass_.scalars, **pass_.meta)
    return (_combined(sums, "sum", acc, launch), _combined(sumsq, "sum", acc, launch),
            _combined(maxes, "amax", acc, launch), _combined(mins, "amin", acc, launch))


def _map(x, scale, shift, residual, out_activation, *, profile=None, launch=None):
    memory_format = _ops.kernel_memory_format(x)
    x, residual = _dense(x, memory_format), _dense(residual, memory_format)
    scale, shift = _vector(scale), _vector(shift)
    kernels = _kernels()
    # x read by the reduce op; x (+ residual) read here and out written
    planned = _map_plan(tuple(map(int, x.shape)), x.dtype, memory_format == torch.channels_last,
                        _profile(x, profile), 1, 2 + (residual is not None), 1,
                        (("GATE", kernels.AS_GIVEN.value), ("HAS_SHIFT", shift is not None),
                         ("HAS_RESIDUAL", residual is not None),
                         ("OUT_RELU", out_activation == OUT_RELU)))
    out = _x_sized(x, memory_format)
    _launcher(launch)(kernels._scale_kernel, planned.programs, x, _stand_in(residual, x), out,
                      scale, _stand_in(shift, x), x, x, *planned.scalars, **planned.meta)
    return out


def _grad_reduce(grad_out, out, x, peak, out_activation, sum_dy, residual_grad, *, profile=None,
                 launch=None):
    memory_format = _ops.kernel_memory_format(x)
    out_relu = out_activation == OUT_RELU
    x, grad_out = _dense(x, memory_format), _dense(grad_out, memory_format)
    out = _dense(out, memory_format) if out_relu else None
    peak = _vector(peak)
    acc = _ops.accumulate_dtype(x.dtype)
    write_dres = bool(residual_grad) and out_relu
    pass_, splits = _reduce_plan(tuple(map(int, x.shape)), x.dtype,
                                 memory_format == torch.channels_last, _profile(x, profile),
                                 (("OUT_RELU", out_relu), ("USE_MAX", peak is not None),
                                  ("SUM_DY", sum_dy), ("WRITE_DRES", write_dres)))
    sdyx = _pieces(x, splits, True, acc)
    sdy = _pieces(x, splits, sum_dy, acc)
    count = _pieces(x, splits, peak is not None, torch.int32)
    dres = _x_sized(x, memory_format) if write_dres else x.new_empty((0,))
    _launcher(launch)(_kernels()._grad_reduce_kernel, pass_.programs, grad_out,
                      _stand_in(out, x), x, _stand_in(peak, x), sdyx, _stand_in(sdy, x),
                      _stand_in(count, x), _stand_in(dres, x), x, x, x, x, x, *pass_.scalars,
                      **pass_.meta)
    return (_combined(sdy, "sum", acc, launch), _combined(sdyx, "sum", acc, launch),
            _combined(count, "sum", acc, launch), dres)


def _grad_map(grad_out, out, x, dy_scale, x_scale, shift, peak, peak_shift, out_activation, *,
              profile=None, launch=None):
    memory_format = _ops.kernel_memory_format(x)
    out_relu = out_activation == OUT_RELU
    x, grad_out = _dense(x, memory_format), _dense(grad_out, memory_format)
    out = _dense(out, memory_format) if out_relu else None
    dy_scale, x_scale, shift, peak, peak_shift = (
        _vector(t) for t in (dy_scale, x_scale, shift, peak, peak_shift))
    reads_x = x_scale is not None or peak is not None
    kernels = _kernels()
    # grad_out, x (+ out) read by the reduce op; grad_out (+ out, + x) read here, dx written
    planned = _map_plan(tuple(map(int, x.shape)), x.dtype, memory_format == torch.channels_last,
                        _profile(x, profile), 2 + out_relu, 2 + out_relu + reads_x,
                        1 + out_relu + reads_x,
                        (("GATE", kernels.AS_GIVEN.value), ("OUT_RELU", out_relu),
                         ("X_SCALE", x_scale is not None), ("HAS_AVG", shift is not None),
                         ("USE_MAX", peak is not None), ("WRITE_DRES", False)))
    dx = _x_sized(x, memory_format)
    _launcher(launch)(kernels._grad_input_kernel, planned.programs, grad_out, _stand_in(out, x),
                      x, dy_scale, _stand_in(x_scale, x), _stand_in(peak, x),
                      _stand_in(shift, x), _stand_in(peak_shift, x), dx, x, x, x, x,
                      *planned.scalars, **planned.meta)
    return dx


# The act tail's ops: the same passes with the input prologue v = act(in_scale·x + in_shift)
# (the PRE_ACT constexpr), whose [C] coefficients the kernels read as [N, C] ones, as they
# index every coefficient (a copy of N·C values).
def _prologue(x: Tensor, in_scale: Tensor, in_shift: Tensor) -> tuple[Tensor, Tensor]:
    n, c = x.shape[0], x.shape[1]
    return in_scale.expand(n, c).contiguous(), in_shift.expand(n, c).contiguous()


def _act_code(activation: str) -> int:
    return int(options.Activation[activation.upper()])


def _act_reduce(x, in_scale, in_shift, activation, *, profile=None, launch=None):
    memory_format = _ops.kernel_memory_format(x)
    x = _dense(x, memory_format)
    acc = _ops.accumulate_dtype(x.dtype)
    pass_, splits = _reduce_plan(tuple(map(int, x.shape)), x.dtype,
                                 memory_format == torch.channels_last, _profile(x, profile),
                                 (("SQUARES", False), ("USE_MAX", False), ("MINIMA", False),
                                  ("PRE_ACT", _act_code(activation))))
    sums = _pieces(x, splits, True, acc)
    pre_scale, pre_shift = _prologue(x, in_scale, in_shift)
    _launcher(launch)(_kernels()._pool_kernel, pass_.programs, x, sums, x, x, x, pre_scale,
                      pre_shift, *pass_.scalars, **pass_.meta)
    return _combined(sums, "sum", acc, launch)


def _act_map(x, in_scale, in_shift, activation, scale, *, profile=None, launch=None):
    memory_format = _ops.kernel_memory_format(x)
    x = _dense(x, memory_format)
    kernels = _kernels()
    # x read by the reduce op; x read here and out written
    planned = _map_plan(tuple(map(int, x.shape)), x.dtype, memory_format == torch.channels_last,
                        _profile(x, profile), 1, 2, 1,
                        (("GATE", kernels.AS_GIVEN.value), ("HAS_SHIFT", False),
                         ("HAS_RESIDUAL", False), ("OUT_RELU", False),
                         ("PRE_ACT", _act_code(activation))))
    out = _x_sized(x, memory_format)
    pre_scale, pre_shift = _prologue(x, in_scale, in_shift)
    _launcher(launch)(kernels._scale_kernel, planned.programs, x, x, out, _vector(scale), x,
                      pre_scale, pre_shift, *planned.scalars, **planned.meta)
    return out


def _act_grad_reduce(grad_out, x, in_scale, in_shift, activation, statistics, *, profile=None,
                     launch=None):
    memory_format = _ops.kernel_memory_format(x)
    x, grad_out = _dense(x, memory_format), _dense(grad_out, memory_format)
    acc = _ops.accumulate_dtype(x.dtype)
    pass_, splits = _reduce_plan(tuple(map(int, x.shape)), x.dtype,
                                 memory_format == torch.channels_last, _profile(x, profile),
                                 (("OUT_RELU", False), ("USE_MAX", False), ("SUM_DY", False),
                                  ("WRITE_DRES", False), ("PRE_ACT", _act_code(activation)),
                                  ("STATS", bool(statistics))))
    sdyv = _pieces(x, splits, True, acc)
    sdyd, sdydx, sd, sdx = (_pieces(x, splits, statistics, acc) for _ in range(4))
    pre_scale, pre_shift = _prologue(x, in_scale, in_shift)
    _launcher(launch)(_kernels()._grad_reduce_kernel, pass_.programs, grad_out, x, x, x, sdyv,
                      _stand_in(sdyd, x), x, x, pre_scale, pre_shift, _stand_in(sdydx, x),
                      _stand_in(sd, x), _stand_in(sdx, x), *pass_.scalars, **pass_.meta)
    return tuple(_combined(t, "sum", acc, launch) for t in (sdyv, sdyd, sdydx, sd, sdx))


def _act_grad_map(grad_out, x, in_scale, in_shift, activation, dy_scale, act_shift, x_scale,
                  shift, *, profile=None, launch=None):
    memory_format = _ops.kernel_memory_format(x)
    x, grad_out = _dense(x, memory_format), _dense(grad_out, memory_format)
    dy_scale, act_shift, x_scale, shift = (_vector(t) for t in (dy_scale, act_shift, x_scale,
                                                                  shift))
    kernels = _kernels()
    # grad_out, x read by the reduce op; both read here, dx written
    planned = _map_plan(tuple(map(int, x.shape)), x.dtype, memory_format == torch.channels_last,
                        _profile(x, profile), 2, 3, 2,
                        (("GATE", kernels.AS_GIVEN.value), ("OUT_RELU", False),
                         ("X_SCALE", x_scale is not None), ("HAS_AVG", shift is not None),
                         ("USE_MAX", False), ("WRITE_DRES", False),
                         ("PRE_ACT", _act_code(activation))))
    dx = _x_sized(x, memory_format)
    pre_scale, pre_shift = _prologue(x, in_scale, in_shift)
    _launcher(launch)(kernels._grad_input_kernel, planned.programs, grad_out, x, x, dy_scale,
                      _stand_in(x_scale, x), x, _stand_in(shift, x), x, dx, x, pre_scale,
                      pre_shift, act_shift, *planned.scalars, **planned.meta)
    return dx


_BODIES = {"stream_reduce": _reduce, "stream_map": _map, "stream_grad_reduce": _grad_reduce,
           "stream_grad_map": _grad_map, "stream_act_reduce": _act_reduce,
           "stream_act_map": _act_map, "stream_act_grad_reduce": _act_grad_reduce,
           "stream_act_grad_map": _act_grad_map}


def planning_ops(profile: DeviceProfile, launch) -> dict:
    """The ops' bodies by base name, planning for `profile` and handing their launches
    (PIECES_REDUCTION included) to `launch` instead of making them."""
    return {name: functools.partial(body, profile=profile, launch=launch)
            for name, body in _BODIES.items()}


# The annotations spell the schemas of _stream_ops.SCHEMAS: torch 2.11's triton_op ignores
# `schema=` and infers the schema from them.
@torch.library.triton_op("se_kernels::stream_reduce_triton", mutates_args=(),
                         schema=_stream_ops.REDUCE_SCHEMA)
def stream_reduce_triton(x: Tensor, squares: bool, maxima: bool,
                         minima: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _stream_ops.check_reduce_args(x, squares, maxima, minima)
    with launch_device(x):
        return _reduce(x, squares, maxima, minima)


@torch.library.triton_op("se_kernels::stream_map_triton", mutates_args=(),
                         schema=_stream_ops.MAP_SCHEMA)
def stream_map_triton(x: Tensor, scale: Tensor, shift: Tensor | None, residual: Tensor | None,
                      out_activation: str) -> Tensor:
    _stream_ops.check_map_args(x, scale, shift, residual, out_activation)
    with launch_device(x):
        return _map(x, scale, shift, residual, out_activation)


@torch.library.triton_op("se_kernels::stream_grad_reduce_triton", mutates_args=(),
                         schema=_stream_ops.GRAD_REDUCE_SCHEMA)
def stream_grad_reduce_triton(
    grad_out: Tensor, out: Tensor | None, x: Tensor, peak: Tensor | None, out_activation: str,
    sum_dy: bool, residual_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _stream_ops.check_grad_reduce_args(grad_out, out, x, peak, out_activation, sum_dy,
                                       residual_grad)
    with launch_device(x):
        return _grad_reduce(grad_out, out, x, peak, out_activation, sum_dy, residual_grad)


@torch.library.triton_op("se_kernels::stream_grad_map_triton", mutates_args=(),
                         schema=_stream_ops.GRAD_MAP_SCHEMA)
def stream_grad_map_triton(
    grad_out: Tensor, out: Tensor | None, x: Tensor, dy_scale: Tensor, x_scale: Tensor | None,
    shift: Tensor | None, peak: Tensor | None, peak_shift: Tensor | None, out_activation: str,
) -> Tensor:
    _stream_ops.check_grad_map_args(grad_out, out, x, dy_scale, x_scale, shift, peak,
                                    peak_shift, out_activation)
    with launch_device(x):
        return _grad_map(grad_out, out, x, dy_scale, x_scale, shift, peak, peak_shift,
                         out_activation)


@torch.library.triton_op("se_kernels::stream_act_reduce_triton", mutates_args=(),
                         schema=_stream_ops.ACT_SCHEMAS["stream_act_reduce"])
def stream_act_reduce_triton(x: Tensor, in_scale: Tensor, in_shift: Tensor,
                             activation: str) -> Tensor:
    _stream_ops.check_act_reduce_args(x, in_scale, in_shift, activation)
    with launch_device(x):
        return _act_reduce(x, in_scale, in_shift, activation)


@torch.library.triton_op("se_kernels::stream_act_map_triton", mutates_args=(),
                         schema=_stream_ops.ACT_SCHEMAS["stream_act_map"])
def stream_act_map_triton(x: Tensor, in_scale: Tensor, in_shift: Tensor, activation: str,
                          scale: Tensor) -> Tensor:
    _stream_ops.check_act_map_args(x, in_scale, in_shift, activation, scale)
    with launch_device(x):
        return _act_map(x, in_scale, in_shift, activation, scale)


@torch.library.triton_op("se_kernels::stream_act_grad_reduce_triton", mutates_args=(),
                         schema=_stream_ops.ACT_SCHEMAS["stream_act_grad_reduce"])
def stream_act_grad_reduce_triton(
    grad_out: Tensor, x: Tensor, in_scale: Tensor, in_shift: Tensor, activation: str,
    statistics: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _stream_ops.check_act_grad_reduce_args(grad_out, x, in_scale, in_shift, activation,
                                           statistics)
    with launch_device(x):
        return _act_grad_reduce(grad_out, x, in_scale, in_shift, activation, statistics)


@torch.library.triton_op("se_kernels::stream_act_grad_map_triton", mutates_args=(),
                         schema=_stream_ops.ACT_SCHEMAS["stream_act_grad_map"])
def stream_act_grad_map_triton(
    grad_out: Tensor, x: Tensor, in_scale: Tensor, in_shift: Tensor, activation: str,
    dy_scale: Tensor, act_shift: Tensor, x_scale: Tensor | None, shift: Tensor | None,
) -> Tensor:
    _stream_ops.check_act_grad_map_args(grad_out, x, in_scale, in_shift, activation, dy_scale,
                                        act_shift, x_scale, shift)
    with launch_device(x):
        return _act_grad_map(grad_out, x, in_scale, in_shift, activation, dy_scale, act_shift,
                             x_scale, shift)


for _op in (stream_reduce_triton, stream_map_triton, stream_grad_reduce_triton,
            stream_grad_map_triton, stream_act_reduce_triton, stream_act_map_triton,
            stream_act_grad_reduce_triton, stream_act_grad_map_triton):
    keep_opaque_under_interpreter(_op)
# triton_op registered the bodies above as the fake kernels.
OPS = {**_stream_ops.register_stream_family("_triton", fake=False),
       **_stream_ops.register_stream_family("_triton", fake=False,
                                            schemas=_stream_ops.ACT_SCHEMAS)}
