"""The Triton stream ops (se_kernels/backends/triton/stream.py) against their PyTorch reference
(_stream_ops.reference) on float64 copies of the inputs, within a rounding bound: shapes,
layouts, dtypes, every optional argument, NaN, ties; then opcheck, schemas, FLOPs, small
tiles, int64 offsets, bit-identical reruns and torch.compile."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from se_kernels import _ops, _stream_ops, options
from se_kernels.backends.triton import heuristics, stream

from oracle import unit_roundoff
from test_triton_kernels import TINY
from triton_support import DEVICE

OPS = stream.OPS


@dataclasses.dataclass(frozen=True)
class Shape:
    n: int
    c: int
    h: int
    w: int
    dtype: torch.dtype = torch.float32
    layout: str = "nchw"  # x's; the other x-sized inputs take the next one

    def __str__(self):
        return f"{self.n}x{self.c}x{self.h}x{self.w}-{str(self.dtype)[6:]}-{self.layout}"


SHAPES = [
    Shape(2, 3, 7, 7),
    Shape(1, 5, 13, 17, torch.bfloat16, "channels_last"),
    Shape(3, 4, 5, 6, torch.float16, "strided"),
    Shape(2, 1, 1, 1, torch.float64, "channels_last"),
    Shape(1, 6, 3, 1, torch.float64),
    Shape(0, 3, 4, 4),
]
LAYOUTS = ("nchw", "channels_last", "strided")


def _laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # dense in no layout: every other channel of a wider tensor
        wide = torch.empty(t.shape[0], 2 * t.shape[1], *t.shape[2:], dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    return t.contiguous()


class Inputs:
    """Fresh random inputs of a shape, none of them 0."""

    def __init__(self, shape: Shape, seed: int):
        self.shape, self.gen = shape, torch.Generator().manual_seed(seed)
        self.acc = _ops.accumulate_dtype(shape.dtype)

    def _normal(self, *size, dtype):
        v = torch.randn(*size, generator=self.gen, dtype=torch.float64)
        return torch.where(v == 0, 0.5, v).to(dtype)

    def x_sized(self, which: int = 0) -> torch.Tensor:
        s = self.shape
        layout = LAYOUTS[(LAYOUTS.index(s.layout) + which) % len(LAYOUTS)]
        return _laid_out(self._normal(s.n, s.c, s.h, s.w, dtype=s.dtype), layout).to(DEVICE)

    def integers(self) -> torch.Tensor:
        """Small nonzero integers: many ties."""
        s = self.shape
        v = torch.randint(1, 4, (s.n, s.c, s.h, s.w), generator=self.gen)
        v = v * (torch.randint(0, 2, v.shape, generator=self.gen) * 2 - 1)
        return _laid_out(v.to(s.dtype), s.layout).to(DEVICE)

    def vector(self) -> torch.Tensor:
        """[N, C] in the accumulation dtype, as a non-contiguous view."""
        v = self._normal(self.shape.n, 2 * self.shape.c, dtype=self.acc)
        return v[:, 1::2].to(DEVICE)


def _bound(exact, magnitude, roundings, acc, out_dtype):
    """|error| allowed: `roundings` of the accumulation dtype on `magnitude` (the sum of
    the terms' magnitudes), then one rounding to out_dtype (two units for Triton's
    interpreter, which truncates to bf16), subnormals included."""
    bound = roundings * unit_roundoff(acc) * magnitude
    if out_dtype != acc:
        u = unit_roundoff(out_dtype)
        bound = bound * (1 + 2 * u) + 2 * u * exact.abs() + u * torch.finfo(out_dtype).tiny
    return bound


def assert_matches(got, exact, magnitude=None, roundings=0, *, like=None, name=""):
    """got equals exact (float64) within _bound; NaN where exact is NaN. `like`: the
    x whose dtype and kernel layout an x-sized result must have; else an [N, C] vector in
    the accumulation dtype (or an empty [0] tensor, when exact is)."""
    x = like
    if x is not None:
        assert got.dtype == x.dtype, name
        fmt = _ops.kernel_memory_format(x)
        assert got.shape == x.shape, name
        assert got.stride() == torch.empty_like(x, memory_format=fmt).stride(), name
    assert got.shape == exact.shape, (name, got.shape, exact.shape)
    if not got.numel():
        return
    out_dtype = got.dtype
    got = got.cpu().to(torch.float64)
    exact = exact.cpu()
    nan = exact.isnan()
    assert torch.equal(got.isnan(), nan), f"{name}: NaN where the reference has none, or none"
    if magnitude is None:
        bound = torch.zeros_like(exact)
    else:
        bound = _bound(exact, magnitude.cpu(), roundings, _ops.accumulate_dtype(out_dtype),
                       out_dtype)
    err = torch.where(nan, 0.0, (got - exact).abs())
    bad = err > torch.where(nan, 0.0, bound)
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {err.numel()} off; worst "
                           f"{float(err.max()):.3g}")


def _f64(t):
    return None if t is None else t.to(torch.float64)


def _reference(name, *args):
    return _stream_ops.reference(name, *(_f64(a) if isinstance(a, torch.Tensor) else a
                                         for a in args))


def _magnitude(name, *args):
    """The reference on the inputs' absolute values: the sums of the terms' magnitudes."""
    return _reference(name, *(a.abs() if isinstance(a, torch.Tensor) else a for a in args))


def _empty_or(t, wanted):
    return t if wanted else t.new_empty((0,))


# ---- stream_reduce ---------------------------------------------------------------------

def check_reduce(x, squares, maxima, minima):
    got = OPS["stream_reduce"](x, squares, maxima, minima)
    exact = _reference("stream_reduce", x, squares, maxima, minima)
    mag = _magnitude("stream_reduce", x, squares, False, False)
    p = x.shape[2] * x.shape[3]
    for name, g, e, m in zip(("sum", "sumsq", "max", "min"), got, exact, (*mag[:2], None, None)):
        assert_matches(g, e, m, p + 2, name=name)
        assert g.dtype == _ops.accumulate_dtype(x.dtype)
    return got


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reduce(driver, shape):
    inputs = Inputs(shape, 0)
    for squares, maxima, minima in ((True, True, True), (False, False, False),
                                    (True, False, True)):
        check_reduce(inputs.x_sized(), squares, maxima, minima)


def test_reduce_nan_and_ties(driver):
    shape = Shape(2, 3, 5, 3, torch.float16)
    x = Inputs(shape, 1).integers().clone()
    x[1, 2, 4, 0] = float("nan")
    x[0, 1, 0, 2] = float("nan")
    x[0, 1, 3, 1] = float("inf")  # a NaN still wins over it
    got = check_reduce(x, True, True, True)
    assert got[2][1, 2].isnan() and got[3][0, 1].isnan() and not got[2][0, 0].isnan()


# ---- stream_map ------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_map(driver, shape):
    inputs = Inputs(shape, 2)
    x = inputs.x_sized()
    for has_shift, has_residual, act in ((True, True, "relu"), (False, False, "none"),
                                         (True, False, "none"), (False, True, "relu")):
        args = (x, inputs.vector(), inputs.vector() if has_shift else None,
                inputs.x_sized(1) if has_residual else None, act)
        got = OPS["stream_map"](*args)
        assert_matches(got, _reference("stream_map", *args).to(torch.float64),
                       _magnitude("stream_map", *args[:4], "none"), 3, like=x,
                       name=f"out shift={has_shift} residual={has_residual} {act}")


# ---- stream_grad_reduce ----------------------------------------------------------------

def check_grad_reduce(args):
    grad_out, out, x = args[:3]
    got = OPS["stream_grad_reduce"](*args)
    exact = _reference("stream_grad_reduce", *args)
    mag = _magnitude("stream_grad_reduce", *args)
    p = x.shape[2] * x.shape[3]
    for name, g, e, m in zip(("sdy", "sdyx", "count"), got[:3], exact[:3], (*mag[:2], None)):
        assert_matches(g, e, m, p + 3, name=name)
    if args[6] and args[4] == "relu":
        assert_matches(got[3], exact[3].to(torch.float64), like=x, name="dresidual")
    else:
        assert got[3].shape == (0,) and got[3].dtype == x.dtype
    return got


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_grad_reduce(driver, shape):
    inputs = Inputs(shape, 3)
    x, grad_out, out = inputs.x_sized(), inputs.x_sized(1), inputs.x_sized(2)
    for with_out, with_peak, act, sum_dy, residual_grad in (
            (True, True, "relu", True, True), (False, False, "none", False, False),
            (True, False, "none", True, True), (True, True, "relu", False, False)):
        peak = inputs.vector() if with_peak else None
        check_grad_reduce((grad_out, out if with_out else None, x, peak, act, sum_dy,
                           residual_grad))


def test_grad_reduce_ties_and_nan(driver):
    """count is exact on integer-valued x, for the max and for other values; a NaN peak
    matches nothing; NaN in grad_out reaches the sums."""
    inputs = Inputs(Shape(2, 4, 5, 5, torch.bfloat16, "channels_last"), 4)
    x = inputs.integers()
    peak = x.to(torch.float32).amax(dim=(2, 3))
    peak[0, 1] = float("nan")
    peak[1, 2] = -1.0
    grad_out = inputs.x_sized(1).clone()
    grad_out[1, 3, 2, 2] = float("nan")
    got = check_grad_reduce((grad_out, inputs.x_sized(2), x, peak, "relu", True, True))
    assert got[2][0, 1] == 0 and got[2].sum() > 2 * 4  # ties counted


# ---- stream_grad_map -------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_grad_map(driver, shape):
    inputs = Inputs(shape, 5)
    x, grad_out, out = inputs.x_sized(), inputs.x_sized(1), inputs.x_sized(2)
    for with_out, has_x_scale, has_shift, has_peak, act in (
            (True, True, True, True, "relu"), (False, False, False, False, "none"),
            (True, True, False, True, "none"), (False, False, True, False, "none"),
            (True, False, True, True, "relu"), (False, True, False, True, "none")):
        # the channels' maxima: ties with x where x repeats them
        peak = x.to(inputs.acc).amax(dim=(2, 3)) if has_peak else None
        args = (grad_out, out if with_out else None, x, inputs.vector(),
                inputs.vector() if has_x_scale else None, inputs.vector() if has_shift else None,
                peak, inputs.vector() if has_peak else None, act)
        got = OPS["stream_grad_map"](*args)
        assert_matches(got, _reference("stream_grad_map", *args).to(torch.float64),
                       _magnitude("stream_grad_map", *args), 5, like=x,
                       name=f"dx {args[4] is not None} {has_shift} {has_peak} {act}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_grad_map_non_finite_peak_shift(driver):
    """[x == peak]·peak_shift is a product: an infinite peak_shift where no x equals the
    peak (count 0: a NaN peak) gives NaN everywhere in the channel, as the reference."""
    inputs = Inputs(Shape(2, 3, 4, 5, torch.float32), 6)
    x = inputs.x_sized()
    peak = x.amax(dim=(2, 3))
    peak[0, 2] = float("nan")
    peak_shift = inputs.vector().contiguous()
    peak_shift[0, 2] = float("inf")
    args = (inputs.x_sized(1), None, x, inputs.vector(), None, None, peak, peak_shift, "none")
    got = OPS["stream_grad_map"](*args)
    assert got[0, 2].isnan().all() and not got[1].isnan().any()
    assert_matches(got, _reference("stream_grad_map", *args).to(torch.float64),
                   _magnitude("stream_grad_map", *args), 5, like=x, name="dx")


# ---- the ops as ops --------------------------------------------------------------------

def _op_args(seed: int = 7) -> dict[str, tuple]:
    inputs = Inputs(Shape(2, 3, 3, 5, torch.float32, "channels_last"), seed)
    x, grad_out, out = inputs.x_sized(), inputs.x_sized(), inputs.x_sized()
    v = inputs.vector
    return {"stream_reduce": (x, True, True, True),
            "stream_map": (x, v(), v(), inputs.x_sized(1), "relu"),
            "stream_grad_reduce": (grad_out, out, x, v(), "relu", True, True),
            "stream_grad_map": (grad_out, out, x, v(), v(), v(), x.amax(dim=(2, 3)), v(), "relu")}


@pytest.mark.parametrize("name", _stream_ops.SCHEMAS)
def test_opcheck(driver, name):
    torch.library.opcheck(OPS[name], _op_args()[name])


def test_schemas_match_the_native_ops(driver):
    """torch 2.11's triton_op infers the schemas from the annotations: the same argument
    names and types, and the same return types, as the native ops'."""
    def types(schema):
        return ([(a.name, str(a.type)) for a in schema.arguments],
                [str(r.type) for r in schema.returns])

    for name, op in OPS.items():
        assert types(op._schema) == types(getattr(torch.ops.se_kernels, name).default._schema)


def test_flop_counter_sees_the_ops(driver):
    from torch.utils.flop_counter import FlopCounterMode

    from test_act_tail import op_args

    args = _op_args()
    args.update({name: op_args(name, (2, 3, 3, 5), torch.float32, "nchw", "silu", 1)
                 for name in _stream_ops.ACT_SCHEMAS})
    with FlopCounterMode(display=False) as counter:
        for name, op in OPS.items():
            op(*tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args[name]))
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    elems = 2 * 3 * 3 * 5
    assert counts == {"se_kernels.stream_reduce_triton": 5 * elems,
                      "se_kernels.stream_map_triton": 3 * elems,
                      "se_kernels.stream_grad_reduce_triton": 4 * elems,
                      "se_kernels.stream_grad_map_triton": 6 * elems,
                      # the act ops: the prologue's 2 per element, and their own (_stream_ops)
                      "se_kernels.stream_act_reduce_triton": 3 * elems,
                      "se_kernels.stream_act_map_triton": 3 * elems,
                      "se_kernels.stream_act_grad_reduce_triton": 12 * elems,
                      "se_kernels.stream_act_grad_map_triton": 8 * elems}


def test_rejects_bad_arguments(driver):
    args = _op_args()["stream_grad_map"]
    with pytest.raises(ValueError, match="peak and peak_shift"):
        OPS["stream_grad_map"](*args[:7], None, args[8])
    with pytest.raises(ValueError, match="out is required"):
        OPS["stream_grad_reduce"](args[0], None, *args[2:3], None, "relu", True, True)


@pytest.fixture
def replanned(driver, monkeypatch):
    """Stream plans made afresh under the patches the test makes, and dropped after it."""
    stream.forget_plans()
    yield monkeypatch
    monkeypatch.undo()
    stream.forget_plans()


def _all_ops(seed: int, shape: Shape):
    """Every op on shape's inputs with every optional argument, checked."""
    inputs = Inputs(shape, seed)
    x, grad_out, out = inputs.x_sized(), inputs.x_sized(1), inputs.x_sized(2)
    results = list(check_reduce(x, True, True, True))
    results += check_grad_reduce((grad_out, out, x, x.to(inputs.acc).amax(dim=(2, 3)), "relu",
                                  True, True))
    for name, args in (("stream_map", (x, inputs.vector(), inputs.vector(), out, "relu")),
                       ("stream_grad_map", (grad_out, out, x, inputs.vector(), inputs.vector(),
                                            inputs.vector(), x.to(inputs.acc).amax(dim=(2, 3)),
                                            inputs.vector(), "relu"))):
        got = OPS[name](*args)
        assert_matches(got, _reference(name, *args).to(torch.float64),
                       _magnitude(name, *args[:-1], "none"), 5, like=x, name=name)
        results.append(got)
    return results


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_small_tiles(replanned, layout):
    """GPU-like tiles: H*W cut into pieces added in order, loops over H*W, several channel
    blocks, NCHW rows read as vectors with heads and tails; twice, bit for bit."""
    tiny = heuristics.DeviceProfile(**TINY)
    replanned.setattr(stream, "device_profile", lambda device: tiny)
    shape = Shape(1, 5, 9, 11, torch.float16, layout)
    cfg = heuristics.pass_config(1, 5, 99, layout == "channels_last", 2, tiny)
    assert cfg.splits > 1 and cfg.p_per_split > cfg.block_p
    first, second = _all_ops(8, shape), _all_ops(8, shape)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_int64_indexing_path(driver, replanned):
    """The WIDE (int64 offsets) variant, forced on a small tensor."""
    real_view = driver._view
    replanned.setattr(driver, "_view",
                      lambda shape, cl: dataclasses.replace(real_view(shape, cl), wide=True))
    for layout in ("nchw", "channels_last"):
        _all_ops(9, Shape(2, 3, 5, 3, torch.float32, layout))


def test_compile_fullgraph_interpreter(driver):
    """torch.compile(fullgraph=True) keeps the ops in its graph with no break (opaque nodes
    under the interpreter), with the ops around them."""
    if DEVICE != "cpu":
        pytest.skip("the interpreter path is for machines without a GPU")
    args = _op_args(10)

    def fn(x, scale, shift, residual):
        total = OPS["stream_reduce"](x, True, False, False)[0]
        return OPS["stream_map"](x, scale * 2, shift + total, residual, "relu").sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    x, scale, shift, residual = args["stream_map"][:4]
    torch.testing.assert_close(compiled(x, scale, shift, residual), fn(x, scale, shift, residual))


# ---- the act tail's ops: the same passes with the input prologue ----------------------------
ACT_CASES = [((2, 3, 5, 7), "nchw", torch.float32), ((1, 5, 6, 6), "channels_last", torch.bfloat16),
             ((3, 4, 1, 1), "strided", torch.float64), ((2, 9, 3, 3), "nchw", torch.float16),
             ((0, 3, 2, 2), "channels_last", torch.float32)]


@pytest.mark.parametrize("activation", options.ACTIVATIONS)
def test_act_ops_match_reference(driver, activation):
    """Each act op against its reference on float64 copies, within the bound the CPU
    kernels are held to (test_act_tail), over shapes, layouts and dtypes."""
    from test_act_tail import as64, check, magnitude, op_args

    for seed, (shape, layout, dtype) in enumerate(ACT_CASES):
        acc = _ops.accumulate_dtype(dtype)
        unit = torch.finfo(acc).eps / 2
        p = shape[2] * shape[3]
        for name, extra in (("stream_act_reduce", {}), ("stream_act_map", {}),
                            ("stream_act_grad_reduce", {"statistics": True}),
                            ("stream_act_grad_reduce", {"statistics": False}),
                            ("stream_act_grad_map", {"optional": seed % 2 == 0})):
            args = op_args(name, shape, dtype, layout, activation, seed, **extra)
            args = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
            got = OPS[name](*args)
            expected = _stream_ops.reference(name, *as64(args))
            mag = magnitude(args, name)
            label = f"{name} {shape} {layout} {dtype}"
            if isinstance(got, torch.Tensor) and got.dim() == 4:
                extra_mag = (args[4].double().abs() if name == "stream_act_map"
                             else sum(v.double().abs() for v in args[5:] if v is not None))
                bound = (32 * unit * mag * (1 + extra_mag[:, :, None, None])
                         + torch.finfo(dtype).eps * expected.abs())
                check(label, got, expected, bound, dtype)
                x = args[0 if name == "stream_act_map" else 1]
                assert got.is_contiguous(memory_format=_ops.kernel_memory_format(x)), label
                continue
            got = got if isinstance(got, tuple) else (got,)
            expected = expected if isinstance(expected, tuple) else (expected,)
            for i, (g, e) in enumerate(zip(got, expected)):
                if e.shape == (0,):
                    assert g.shape == (0,) and g.dtype == acc, f"{label}[{i}] should be empty"
                    continue
                check(f"{label}[{i}]", g, e, 32 * (p + 1) * unit * mag.sum(dim=(2, 3)), acc)


@pytest.mark.parametrize("name", _stream_ops.ACT_SCHEMAS)
def test_act_opcheck(driver, name):
    from test_act_tail import op_args

    args = op_args(name, (2, 3, 4, 5), torch.float32, "channels_last", "silu", 5)
    torch.library.opcheck(OPS[name], tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a
                                           for a in args))
