"""The stream ops: the x-sized passes of the staged path (DESIGN.md §1.4), one pass each.

Every excitation form other than the fused two-FC one runs staged: a reduce pass over x,
the excitation on [N, C] vectors in PyTorch (se_kernels/staged.py), a map pass; the
backward likewise. These four ops are the passes. They know nothing of the excitation:
each takes or gives per-(n, c) coefficients, so the same kernels serve any form.

  stream_reduce(x, squares, maxima, minima) -> (sum, sumsq, max, min)
      sum[n,c] = Σ_p x;  sumsq[n,c] = Σ_p x² (when squares);  max / min over p (when
      maxima / minima; NaN when any element is NaN, as torch.amax / amin)
  stream_map(x, scale, shift, residual, out_activation) -> out
      out = out_act(scale[n,c]·x + shift[n,c] + residual)
  stream_grad_reduce(grad_out, out, x, peak, out_activation, sum_dy, residual_grad)
          -> (sdy, sdyx, count, dresidual)
      dy = grad_out·[out > 0] under an output ReLU, else grad_out;
      sdyx[n,c] = Σ_p dy·x;  sdy[n,c] = Σ_p dy (when sum_dy);
      count[n,c] = #{p : x == peak[n,c]} (when peak is given);
      dresidual = dy, written when residual_grad and out_activation is "relu"
  stream_grad_map(grad_out, out, x, dy_scale, x_scale, shift, peak, peak_shift,
                  out_activation) -> dx
      dx = dy_scale[n,c]·dy + x_scale[n,c]·x + shift[n,c] + [x == peak[n,c]]·peak_shift[n,c]

Four more take an input prologue, u = in_scale[c]·x + in_shift[c] (a BatchNorm's affine
map, in_scale and in_shift [C]), v = act(u) and d = act'(u) with `activation` one of
options.ACTIVATIONS (DESIGN.md §1.3): the act tail's passes (§1.5, se_kernels/tail.py).

  stream_act_reduce(x, in_scale, in_shift, activation) -> sum
      sum[n,c] = Σ_p v
  stream_act_map(x, in_scale, in_shift, activation, scale) -> out
      out = scale[n,c]·v
  stream_act_grad_reduce(grad_out, x, in_scale, in_shift, activation, statistics)
          -> (sdyv, sdyd, sdydx, sd, sdx)
      sdyv = Σ_p dy·v; when statistics: sdyd = Σ_p dy·d, sdydx = Σ_p dy·d·x, sd = Σ_p d,
      sdx = Σ_p d·x
  stream_act_grad_map(grad_out, x, in_scale, in_shift, activation, dy_scale, act_shift,
                      x_scale, shift) -> dx
      dx = d·(dy_scale[n,c]·dy + act_shift[n,c]) + x_scale[n,c]·x + shift[n,c]

[N, C] and [C] vectors are in the accumulation dtype (fp32, fp64 for fp64 x); an output
not asked for is an empty [0] tensor. x-sized outputs have x's dtype and the kernels' layout
(_ops.kernel_memory_format); everything is computed in the accumulation dtype and rounded
once. Kernels: CPU and CUDA in se_kernels._C (these names), Triton as the "_triton" ops
(se_kernels/backends/triton/stream.py).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from ._ops import DTYPES, _check_like, _op_packet, accumulate_dtype, kernel_memory_format
from .options import OUT_ACTIVATIONS, OUT_RELU, check_choice

REDUCE_SCHEMA = ("(Tensor x, bool squares, bool maxima, bool minima) "
                 "-> (Tensor sum, Tensor sumsq, Tensor max, Tensor min)")
MAP_SCHEMA = ("(Tensor x, Tensor scale, Tensor? shift, Tensor? residual, str out_activation) "
              "-> Tensor")
GRAD_REDUCE_SCHEMA = (
    "(Tensor grad_out, Tensor? out, Tensor x, Tensor? peak, str out_activation, bool sum_dy, "
    "bool residual_grad) -> (Tensor sdy, Tensor sdyx, Tensor count, Tensor dresidual)")
GRAD_MAP_SCHEMA = (
    "(Tensor grad_out, Tensor? out, Tensor x, Tensor dy_scale, Tensor? x_scale, Tensor? shift, "
    "Tensor? peak, Tensor? peak_shift, str out_activation) -> Tensor")
SCHEMAS = {"stream_reduce": REDUCE_SCHEMA, "stream_map": MAP_SCHEMA,
           "stream_grad_reduce": GRAD_REDUCE_SCHEMA, "stream_grad_map": GRAD_MAP_SCHEMA}
_PROLOGUE = "Tensor x, Tensor in_scale, Tensor in_shift, str activation"
ACT_SCHEMAS = {
    "stream_act_reduce": f"({_PROLOGUE}) -> Tensor",
    "stream_act_map": f"({_PROLOGUE}, Tensor scale) -> Tensor",
    "stream_act_grad_reduce": (
        f"(Tensor grad_out, {_PROLOGUE}, bool statistics) "
        "-> (Tensor sdyv, Tensor sdyd, Tensor sdydx, Tensor sd, Tensor sdx)"),
    "stream_act_grad_map": (
        f"(Tensor grad_out, {_PROLOGUE}, Tensor dy_scale, Tensor act_shift, Tensor? x_scale, "
        "Tensor? shift) -> Tensor"),
}
# Each op's outputs by name: the schemas' names, and what the map ops' one output is.
OUTPUTS = {"stream_reduce": ("sum", "sumsq", "max", "min"), "stream_map": ("out",),
           "stream_grad_reduce": ("sdy", "sdyx", "count", "dresidual"),
           "stream_grad_map": ("dx",), "stream_act_reduce": ("sum",), "stream_act_map": ("out",),
           "stream_act_grad_reduce": ("sdyv", "sdyd", "sdydx", "sd", "sdx"),
           "stream_act_grad_map": ("dx",)}

_lib = torch.library.Library("se_kernels", "FRAGMENT")  # noqa: TOR901 - kept alive for the module's life
for _name, _schema in {**SCHEMAS, **ACT_SCHEMAS}.items():
    _lib.define(_name + _schema)


def check_x(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 4-D tensor [N, C, H, W], got {shape}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if min(x.shape[1:]) < 1:
        raise ValueError(f"x must have C, H and W >= 1, got shape {list(x.shape)}")


def check_residual(x: torch.Tensor, residual: torch.Tensor | None) -> None:
    """The residual of a staged call or a block tail: x's shape, dtype and device, as
    stream_map reads it."""
    _check_x_sized(x, residual=residual)


def check_vectors(x: torch.Tensor, **vectors: torch.Tensor | None) -> None:
    """[N, C] vectors beside x, each if given: the accumulation dtype, on x's device."""
    shape, acc = x.shape[:2], accumulate_dtype(x.dtype)
    for name, t in vectors.items():
        if t is not None:
            _check_like(name, t, shape, x, acc)


def _check_x_sized(x: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None:
            _check_like(name, t, x.shape, x)


def _check_out(out, out_activation: str) -> None:
    check_choice("out_activation", out_activation)
    if out_activation == OUT_RELU and out is None:
        raise ValueError(f"out is required when out_activation is {OUT_RELU!r}")


def check_reduce_args(x, squares, maxima, minima) -> None:
    check_x(x)


def check_map_args(x, scale, shift, residual, out_activation) -> None:
    check_x(x)
    check_vectors(x, scale=scale, shift=shift)
    _check_x_sized(x, residual=residual)
    check_choice("out_activation", out_activation)


def check_grad_inputs(grad_out, out, x, out_activation) -> None:
    """A backward pass's x-sized inputs (out only under an output ReLU), with x checked."""
    check_x(x)
    _check_x_sized(x, grad_out=grad_out, out=out)
    _check_out(out, out_activation)


def check_grad_reduce_args(grad_out, out, x, peak, out_activation, sum_dy, residual_grad) -> None:
    check_grad_inputs(grad_out, out, x, out_activation)
    check_vectors(x, peak=peak)


def check_grad_map_args(grad_out, out, x, dy_scale, x_scale, shift, peak, peak_shift,
                        out_activation) -> None:
    check_grad_inputs(grad_out, out, x, out_activation)
    check_vectors(x, dy_scale=dy_scale, x_scale=x_scale, shift=shift, peak=peak,
                   peak_shift=peak_shift)
    if (peak is None) != (peak_shift is None):
        raise ValueError("peak and peak_shift must be given together")


def _check_prologue(x, in_scale, in_shift, activation) -> None:
    check_x(x)
    acc = accumulate_dtype(x.dtype)
    _check_like("in_scale", in_scale, x.shape[1:2], x, acc)
    _check_like("in_shift", in_shift, x.shape[1:2], x, acc)
    check_choice("activation", activation)


def check_act_reduce_args(x, in_scale, in_shift, activation) -> None:
    _check_prologue(x, in_scale, in_shift, activation)


def check_act_map_args(x, in_scale, in_shift, activation, scale) -> None:
    _check_prologue(x, in_scale, in_shift, activation)
    check_vectors(x, scale=scale)


def check_act_grad_reduce_args(grad_out, x, in_scale, in_shift, activation, statistics) -> None:
    _check_prologue(x, in_scale, in_shift, activation)
    _check_x_sized(x, grad_out=grad_out)


def check_act_grad_map_args(grad_out, x, in_scale, in_shift, activation, dy_scale, act_shift,
                            x_scale, shift) -> None:
    _check_prologue(x, in_scale, in_shift, activation)
    _check_x_sized(x, grad_out=grad_out)
    check_vectors(x, dy_scale=dy_scale, act_shift=act_shift, x_scale=x_scale, shift=shift)


CHECKS = {"stream_reduce": check_reduce_args, "stream_map": check_map_args,
          "stream_grad_reduce": check_grad_reduce_args, "stream_grad_map": check_grad_map_args,
          "stream_act_reduce": check_act_reduce_args, "stream_act_map": check_act_map_args,
          "stream_act_grad_reduce": check_act_grad_reduce_args,
          "stream_act_grad_map": check_act_grad_map_args}


def _vector(x: torch.Tensor, wanted: bool = True) -> torch.Tensor:
    shape = tuple(x.shape[:2]) if wanted else (0,)
    return x.new_empty(shape, dtype=accumulate_dtype(x.dtype))


def _x_sized(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=kernel_memory_format(x))


def reduce_fake(x, squares, maxima, minima):
    check_reduce_args(x, squares, maxima, minima)
    return _vector(x), _vector(x, squares), _vector(x, maxima), _vector(x, minima)


def map_fake(x, scale, shift, residual, out_activation):
    check_map_args(x, scale, shift, residual, out_activation)
    return _x_sized(x)


def grad_reduce_fake(grad_out, out, x, peak, out_activation, sum_dy, residual_grad):
    check_grad_reduce_args(grad_out, out, x, peak, out_activation, sum_dy, residual_grad)
    dresidual = _x_sized(x) if residual_grad and out_activation == OUT_RELU else x.new_empty((0,))
    return _vector(x, sum_dy), _vector(x), _vector(x, peak is not None), dresidual


def grad_map_fake(grad_out, out, x, dy_scale, x_scale, shift, peak, peak_shift, out_activation):
    check_grad_map_args(grad_out, out, x, dy_scale, x_scale, shift, peak, peak_shift,
                        out_activation)
    return _x_sized(x)


def act_reduce_fake(x, in_scale, in_shift, activation):
    check_act_reduce_args(x, in_scale, in_shift, activation)
    return _vector(x)


def act_map_fake(x, in_scale, in_shift, activation, scale):
    check_act_map_args(x, in_scale, in_shift, activation, scale)
    return _x_sized(x)


def act_grad_reduce_fake(grad_out, x, in_scale, in_shift, activation, statistics):
    check_act_grad_reduce_args(grad_out, x, in_scale, in_shift, activation, statistics)
    return (_vector(x), *(_vector(x, statistics) for _ in range(4)))


def act_grad_map_fake(grad_out, x, in_scale, in_shift, activation, dy_scale, act_shift, x_scale,
                      shift):
    check_act_grad_map_args(grad_out, x, in_scale, in_shift, activation, dy_scale, act_shift,
                            x_scale, shift)
    return _x_sized(x)


FAKES = {"stream_reduce": reduce_fake, "stream_map": map_fake,
         "stream_grad_reduce": grad_reduce_fake, "stream_grad_map": grad_map_fake,
         "stream_act_reduce": act_reduce_fake, "stream_act_map": act_map_fake,
         "stream_act_grad_reduce": act_grad_reduce_fake, "stream_act_grad_map": act_grad_map_fake}


# FLOPs: one add per element and reduction (max and min compare), a multiply-add per
# coefficient applied; the output ReLU's mask is not counted, as for activations elsewhere.
def _reduce_flops(x_shape, squares, maxima, minima, *args, out_shape=None, **kwargs) -> int:
    elems = x_shape[0] * x_shape[1] * x_shape[2] * x_shape[3]
    return elems * (1 + 2 * bool(squares) + bool(maxima) + bool(minima))


def _map_flops(x_shape, scale_shape, shift_shape, residual_shape, *args, out_shape=None,
               **kwargs) -> int:
    elems = x_shape[0] * x_shape[1] * x_shape[2] * x_shape[3]
    return elems * (1 + (shift_shape is not None) + (residual_shape is not None))


def _grad_reduce_flops(grad_out_shape, out_shape_, x_shape, peak_shape, out_activation, sum_dy,
                       *args, out_shape=None, **kwargs) -> int:
    elems = x_shape[0] * x_shape[1] * x_shape[2] * x_shape[3]
    return elems * (2 + bool(sum_dy) + (peak_shape is not None))


def _grad_map_flops(grad_out_shape, out_shape_, x_shape, dy_scale_shape, x_scale_shape,
                    shift_shape, peak_shape, *args, out_shape=None, **kwargs) -> int:
    elems = x_shape[0] * x_shape[1] * x_shape[2] * x_shape[3]
    return elems * (1 + 2 * (x_scale_shape is not None) + (shift_shape is not None)
                    + 2 * (peak_shape is not None))


# The act ops: the prologue's a·x + b is 2 per element; the activation, as elsewhere, none.
def _act_reduce_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    return 3 * x_shape[0] * x_shape[1] * x_shape[2] * x_shape[3]


def _act_map_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    return 3 * x_shape[0] * x_shape[1] * x_shape[2] * x_shape[3]


def _act_grad_reduce_flops(grad_out_shape, x_shape, in_scale_shape, in_shift_shape, activation,
                           statistics, *args, out_shape=None, **kwargs) -> int:
    elems = x_shape[0] * x_shape[1] * x_shape[2] * x_shape[3]
    return elems * (4 + 8 * bool(statistics))  # S1 2; S2 2, S3 3, S4 1, S5 2


def _act_grad_map_flops(grad_out_shape, x_shape, in_scale_shape, in_shift_shape, activation,
                        dy_scale_shape, act_shift_shape, x_scale_shape, shift_shape, *args,
                        out_shape=None, **kwargs) -> int:
    elems = x_shape[0] * x_shape[1] * x_shape[2] * x_shape[3]
    return elems * (5 + 2 * (x_scale_shape is not None) + (shift_shape is not None))


FLOPS = {"stream_reduce": _reduce_flops, "stream_map": _map_flops,
         "stream_grad_reduce": _grad_reduce_flops, "stream_grad_map": _grad_map_flops,
         "stream_act_reduce": _act_reduce_flops, "stream_act_map": _act_map_flops,
         "stream_act_grad_reduce": _act_grad_reduce_flops,
         "stream_act_grad_map": _act_grad_map_flops}


# The forward ops' autograd: what a program that calls them directly differentiates (an
# exported training program: export traces through the staged path's and the tail's
# autograd.Functions, whose written-out backwards it cannot keep). Such a backward is the
# reference's own, recomputed: correct, not fast; the paths' Functions never reach it,
# since they call the ops where autograd records nothing (and in eager beneath autograd:
# as_called_now).
DIFFERENTIABLE = ("stream_reduce", "stream_map", "stream_act_reduce", "stream_act_map")


def _reference_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*(a if isinstance(a, torch.Tensor) else None for a in inputs))
    ctx.constants = tuple(None if isinstance(a, torch.Tensor) else a for a in inputs)


def _reference_backward(name: str):
    def backward(ctx, *grads):
        args = [t if t is not None else c for t, c in zip(ctx.saved_tensors, ctx.constants)]
        wanted = [i for i, needed in enumerate(ctx.needs_input_grad) if needed]
        for i in wanted:
            args[i] = args[i].detach().requires_grad_()
        with torch.enable_grad():
            outs = _REFERENCE[name](*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        result = [None] * len(args)
        if pairs and wanted:
            got = torch.autograd.grad([o for o, _ in pairs], [args[i] for i in wanted],
                                      [g for _, g in pairs], allow_unused=True)
            for i, g in zip(wanted, got):
                result[i] = g
        return tuple(result)
    return backward


def register_stream_family(suffix: str = "", *, fake: bool = True,
                           schemas=SCHEMAS) -> dict[str, torch._ops.OpOverload]:
    """Give the stream ops of `schemas` (the four, or ACT_SCHEMAS) named
    `se_kernels::<name><suffix>` their fake kernels (unless they bring their own, as
    triton_op does), FLOP formulas and, for the forward ones, autograd; returns the
    overloads by base name."""
    ops = {}
    for name in schemas:
        qualname = f"se_kernels::{name}{suffix}"
        if fake:
            torch.library.register_fake(qualname, FAKES[name])
        packet = _op_packet(qualname)
        register_flop_formula(packet)(FLOPS[name])
        if name in DIFFERENTIABLE:
            torch.library.register_autograd(qualname, _reference_backward(name),
                                            setup_context=_reference_setup_context)
        ops[name] = packet.default
    return ops


NATIVE = register_stream_family()
stream_reduce = NATIVE["stream_reduce"]
stream_map = NATIVE["stream_map"]
stream_grad_reduce = NATIVE["stream_grad_reduce"]
stream_grad_map = NATIVE["stream_grad_map"]
NATIVE_ACT = register_stream_family(schemas=ACT_SCHEMAS)
stream_act_reduce = NATIVE_ACT["stream_act_reduce"]
stream_act_map = NATIVE_ACT["stream_act_map"]
stream_act_grad_reduce = NATIVE_ACT["stream_act_grad_reduce"]
stream_act_grad_map = NATIVE_ACT["stream_act_grad_map"]


# Beneath autograd, a call skips the forward ops' autograd formula, a Python check that
# costs as much as a small call's kernel (about 10 us a call on CPU) even where nothing
# can be recorded.
_BENEATH_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowAutograd", None)
_UNRECORDED: dict[int, tuple[dict, dict]] = {}


def _beneath_autograd(op):
    def run(*args):
        with _BENEATH_AUTOGRAD():
            return op(*args)
    return run


def as_called_now(ops: dict) -> dict:
    """`ops` (a backend's stream ops by name) as a path should call them at this moment: in
    eager with grad mode off, where autograd records nothing, beneath autograd; else (grad
    mode on, or tracing or compiling, which must see the ops whole) as they are."""
    if (_BENEATH_AUTOGRAD is None or torch.is_grad_enabled() or torch.compiler.is_compiling()
            or torch.jit.is_tracing()):
        return ops
    entry = _UNRECORDED.get(id(ops))
    if entry is None or entry[0] is not ops:
        entry = _UNRECORDED[id(ops)] = (ops, {name: _beneath_autograd(op)
                                              for name, op in ops.items()})
    return entry[1]


def named(name: str, args: tuple, outputs) -> dict:
    """A call of the op `name` as {argument or output name: value} (SCHEMAS, OUTPUTS)."""
    params = [argument.name for argument in {**NATIVE, **NATIVE_ACT}[name]._schema.arguments]
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return {**dict(zip(params, args)), **dict(zip(OUTPUTS[name], outputs))}


def reference(name: str, *args):
    """The stream op `name` in PyTorch operations, at the accumulation dtype: what every
    kernel computes (the tests hold the kernels to it, and the torch backend's staged
    path runs it)."""
    CHECKS[name](*args)
    return _REFERENCE[name](*args)


def _masked_dy(grad_out, out, out_activation, acc):
    dy = grad_out.to(acc)
    return dy * (out > 0) if out_activation == OUT_RELU else dy


def _nc(t):
    return t[:, :, None, None]


def _reduce_reference(x, squares, maxima, minima):
    acc = accumulate_dtype(x.dtype)
    xa = x.to(acc)
    empty = xa.new_empty((0,))
    return (xa.sum(dim=(2, 3)), (xa * xa).sum(dim=(2, 3)) if squares else empty,
            xa.amax(dim=(2, 3)) if maxima else empty, xa.amin(dim=(2, 3)) if minima else empty)


def _map_reference(x, scale, shift, residual, out_activation):
    acc = accumulate_dtype(x.dtype)
    y = _nc(scale) * x.to(acc)
    if shift is not None:
        y = y + _nc(shift)
    if residual is not None:
        y = y + residual.to(acc)
    if out_activation == OUT_RELU:
        y = torch.relu(y)
    return y.to(x.dtype).contiguous(memory_format=kernel_memory_format(x))


def _grad_reduce_reference(grad_out, out, x, peak, out_activation, sum_dy, residual_grad):
    acc = accumulate_dtype(x.dtype)
    dy = _masked_dy(grad_out, out, out_activation, acc)
    xa = x.to(acc)
    empty = xa.new_empty((0,))
    count = (xa == _nc(peak)).sum(dim=(2, 3)).to(acc) if peak is not None else empty
    if residual_grad and out_activation == OUT_RELU:
        dresidual = dy.to(x.dtype).contiguous(memory_format=kernel_memory_format(x))
    else:
        dresidual = x.new_empty((0,))
    return (dy.sum(dim=(2, 3)) if sum_dy else empty, (dy * xa).sum(dim=(2, 3)), count, dresidual)


def _grad_map_reference(grad_out, out, x, dy_scale, x_scale, shift, peak, peak_shift,
                        out_activation):
    acc = accumulate_dtype(x.dtype)
    xa = x.to(acc)
    dx = _nc(dy_scale) * _masked_dy(grad_out, out, out_activation, acc)
    if x_scale is not None:
        dx = dx + _nc(x_scale) * xa
    if shift is not None:
        dx = dx + _nc(shift)
    if peak is not None:
        dx = dx + (xa == _nc(peak)) * _nc(peak_shift)
    return dx.to(x.dtype).contiguous(memory_format=kernel_memory_format(x))


def _prologue(x, in_scale, in_shift, activation):
    """(x, u, act) in the accumulation dtype: u = in_scale·x + in_shift."""
    from .backends.torch_backend import activation_function
    xa = x.to(accumulate_dtype(x.dtype))
    return xa, xa * in_scale[:, None, None] + in_shift[:, None, None], activation_function(
        activation)


def _act_derivative(u, activation):
    from .backends.torch_backend import activation_gradient
    return activation_gradient(activation)(u, torch.ones_like(u))


def _act_reduce_reference(x, in_scale, in_shift, activation):
    _, u, act = _prologue(x, in_scale, in_shift, activation)
    return act(u).sum(dim=(2, 3))


def _act_map_reference(x, in_scale, in_shift, activation, scale):
    _, u, act = _prologue(x, in_scale, in_shift, activation)
    return (_nc(scale) * act(u)).to(x.dtype).contiguous(memory_format=kernel_memory_format(x))


def _act_grad_reduce_reference(grad_out, x, in_scale, in_shift, activation, statistics):
    xa, u, act = _prologue(x, in_scale, in_shift, activation)
    dy = grad_out.to(xa.dtype)
    sdyv = (dy * act(u)).sum(dim=(2, 3))
    if not statistics:
        empty = xa.new_empty((0,))
        return sdyv, empty, empty, empty, empty
    d = _act_derivative(u, activation)
    dyd = dy * d
    return (sdyv, dyd.sum(dim=(2, 3)), (dyd * xa).sum(dim=(2, 3)), d.sum(dim=(2, 3)),
            (d * xa).sum(dim=(2, 3)))


def _act_grad_map_reference(grad_out, x, in_scale, in_shift, activation, dy_scale, act_shift,
                            x_scale, shift):
    xa, u, _ = _prologue(x, in_scale, in_shift, activation)
    dx = _act_derivative(u, activation) * (_nc(dy_scale) * grad_out.to(xa.dtype)
                                           + _nc(act_shift))
    if x_scale is not None:
        dx = dx + _nc(x_scale) * xa
    if shift is not None:
        dx = dx + _nc(shift)
    return dx.to(x.dtype).contiguous(memory_format=kernel_memory_format(x))


_REFERENCE = {"stream_reduce": _reduce_reference, "stream_map": _map_reference,
              "stream_grad_reduce": _grad_reduce_reference, "stream_grad_map": _grad_map_reference,
              "stream_act_reduce": _act_reduce_reference, "stream_act_map": _act_map_reference,
              "stream_act_grad_reduce": _act_grad_reduce_reference,
              "stream_act_grad_map": _act_grad_map_reference}

assert set(OUT_ACTIVATIONS) == {"none", OUT_RELU}  # the kernels' masks know these two
