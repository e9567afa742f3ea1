"""The stream ops' CPU kernels (se_kernels._C; DESIGN.md §1.4) against
_stream_ops.reference evaluated in float64 on the same (rounded) inputs: every dtype, both
kernel layouts and strided inputs, each optional argument, NaN and ties, determinism
across thread counts, opcheck, and the errors of direct calls."""

from __future__ import annotations

import itertools

import pytest
import torch

from se_kernels import _stream_ops
from se_kernels._ops import accumulate_dtype, kernel_memory_format
from helpers import covering_cases

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# N = 0 and 1, C = 1 and 3, H*W = 1, odd H*W (vector tails), C past a channels-last block
# of 128, and a large H*W whose rows are reduced in several pieces.
SHAPES = ((2, 5, 7, 7), (1, 3, 13, 17), (0, 3, 4, 5), (3, 4, 1, 1), (2, 1, 6, 5),
          (2, 130, 3, 5), (1, 8, 64, 64))
LAYOUTS = ("nchw", "channels_last", "strided", "channel_slice", "transposed")
OPS = {name: getattr(torch.ops.se_kernels, name).default for name in _stream_ops.SCHEMAS}


def apply_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t with the same values in `layout`: dense NCHW or channels-last, or a view that is
    dense in neither (every other column or channel of a wider tensor, or H and W swapped
    in memory)."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = t.new_ones(*t.shape[:3], 2 * t.shape[3])
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "channel_slice":
        wide = t.new_ones(t.shape[0], 2 * t.shape[1], *t.shape[2:])
        wide[:, ::2] = t
        return wide[:, ::2]
    if layout == "transposed":
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    return t.contiguous()


class Inputs:
    """Fresh random inputs from one seed: x-sized tensors in x's dtype and any layout,
    [N, C] vectors in the accumulation dtype (contiguous or a transposed view)."""

    def __init__(self, shape, dtype, seed):
        self.shape, self.dtype, self.acc = shape, dtype, accumulate_dtype(dtype)
        self.gen = torch.Generator().manual_seed(seed)

    def x_sized(self, layout="nchw", integers=False):
        if integers:  # few distinct values, none zero: peaks repeat
            t = torch.randint(1, 5, self.shape, generator=self.gen).double()
        else:
            t = torch.randn(self.shape, generator=self.gen, dtype=torch.float64)
        return apply_layout(t.to(self.dtype), layout)

    def vector(self, transposed=False):
        n, c = self.shape[:2]
        t = torch.randn(c, n, generator=self.gen, dtype=torch.float64).to(self.acc)
        return t.t() if transposed else t.t().contiguous()


def as64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)


def unit(dtype):
    return torch.finfo(dtype).eps / 2


def check(name, got, expected, bound, dtype, like=None):
    """got within `bound` (elementwise, from the rounding analysis of each op) of the
    float64 `expected`, NaN where it is NaN, with the dtype and, for x-sized outputs, the
    kernels' layout of `like`."""
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == expected.shape, f"{name}: shape {list(got.shape)}, expected {list(expected.shape)}"
    if like is not None:
        assert got.is_contiguous(memory_format=kernel_memory_format(like)), f"{name}: layout"
    got = got.double()
    assert torch.equal(got.isnan(), expected.isnan()), f"{name}: NaN positions differ"
    finite = ~expected.isnan()
    err = (got - expected).abs()[finite]
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(expected)[finite]
    bad = err > bound
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {err.numel()} outside the bound, worst "
                           f"error {err.max().item():.3g} (bound there "
                           f"{bound[(err - bound).argmax()].item():.3g})")


def x_sized_bound(expected, terms_abs, k, dtype):
    """k roundings in the accumulation dtype on the terms' magnitudes, one to `dtype`."""
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    return k * unit(accumulate_dtype(dtype)) * terms_abs + unit(dtype) * expected.abs() * 1.01 + tiny


def sum_bound(terms_abs, P, dtype):
    """A sum over P terms (each at most one rounding) in the accumulation dtype."""
    return (P + 1) * unit(accumulate_dtype(dtype)) * terms_abs.sum(dim=(2, 3))


def check_empty(name, got, dtype):
    assert got.shape == (0,) and got.dtype == dtype, f"{name}: {got.dtype}{list(got.shape)}, expected empty {dtype}"


def nc(t):
    return t.double()[:, :, None, None]


def cases(options):
    """Pairwise coverage of shape, layout, dtype and the op's option variants; each case
    with its own seed."""
    combos = covering_cases(SHAPES, LAYOUTS, DTYPES, tuple(range(len(options))))
    return [pytest.param(shape, layout, dtype, options[o], seed, id=f"{shape}-{layout}-{str(dtype)[6:]}-{o}")
            for seed, (shape, layout, dtype, o) in enumerate(combos)]


REDUCE_OPTIONS = list(itertools.product((False, True), repeat=3))  # squares, maxima, minima


@pytest.mark.parametrize("shape,layout,dtype,flags,seed", cases(REDUCE_OPTIONS))
def test_reduce_matches_reference(shape, layout, dtype, flags, seed):
    t = Inputs(shape, dtype, seed)
    x = t.x_sized(layout)
    got = OPS["stream_reduce"](x, *flags)
    expected = _stream_ops.reference("stream_reduce", x.double(), *flags)
    acc, P = accumulate_dtype(dtype), shape[2] * shape[3]
    x64 = x.double()
    check("sum", got[0], expected[0], sum_bound(x64.abs(), P, dtype), acc)
    for name, wanted, g, e, terms in (("sumsq", flags[0], got[1], expected[1], x64 * x64),
                                      ("max", flags[1], got[2], expected[2], None),
                                      ("min", flags[2], got[3], expected[3], None)):
        if not wanted:
            check_empty(name, g, acc)
        else:  # max and min are exact
            check(name, g, e, 0.0 if terms is None else sum_bound(terms, P, dtype), acc)


MAP_OPTIONS = list(itertools.product((False, True), (False, True), ("none", "relu")))  # shift, residual


@pytest.mark.parametrize("shape,layout,dtype,options,seed", cases(MAP_OPTIONS))
def test_map_matches_reference(shape, layout, dtype, options, seed):
    with_shift, with_residual, out_activation = options
    t = Inputs(shape, dtype, seed)
    x = t.x_sized(layout)
    scale = t.vector(transposed=seed % 2 == 1)
    shift = t.vector() if with_shift else None
    residual = t.x_sized(LAYOUTS[(seed + 1) % len(LAYOUTS)]) if with_residual else None
    args = (x, scale, shift, residual, out_activation)
    got = OPS["stream_map"](*args)
    expected = _stream_ops.reference("stream_map", *as64(args))
    terms = (nc(scale) * x.double()).abs()
    terms = terms + (nc(shift).abs() if with_shift else 0) + (residual.double().abs() if with_residual else 0)
    check("out", got, expected, x_sized_bound(expected, terms, 3, dtype), dtype, like=x)


GRAD_REDUCE_OPTIONS = list(itertools.product(("none", "relu"), (False, True), (False, True), (False, True)))


def grad_inputs(t, layout, seed, out_activation, integers=False):
    """x, grad_out and out (out also for "none", where the op ignores it), the latter two in
    another layout than x."""
    other = LAYOUTS[(seed + 1) % len(LAYOUTS)]
    x = t.x_sized(layout, integers=integers)
    grad_out = t.x_sized(other)
    out = t.x_sized(LAYOUTS[(seed + 2) % len(LAYOUTS)]) if out_activation == "relu" or seed % 2 else None
    return x, grad_out, out


@pytest.mark.parametrize("shape,layout,dtype,options,seed", cases(GRAD_REDUCE_OPTIONS))
def test_grad_reduce_matches_reference(shape, layout, dtype, options, seed):
    out_activation, with_peak, sum_dy, residual_grad = options
    t = Inputs(shape, dtype, seed)
    x, grad_out, out = grad_inputs(t, layout, seed, out_activation, integers=with_peak)
    # A peak that x reaches, repeatedly (integer x), so the counts are not all 0.
    peak = x.double().amax(dim=(2, 3)).to(t.acc) if with_peak else None
    args = (grad_out, out, x, peak, out_activation, sum_dy, residual_grad)
    got = OPS["stream_grad_reduce"](*args)
    expected = _stream_ops.reference("stream_grad_reduce", *as64(args))
    acc, P = t.acc, shape[2] * shape[3]
    dy = expected[3].double() if expected[3].numel() else grad_out.double() * (
        out.double() > 0 if out_activation == "relu" else 1)
    if sum_dy:
        check("sdy", got[0], expected[0], sum_bound(dy.abs(), P, dtype), acc)
    else:
        check_empty("sdy", got[0], acc)
    check("sdyx", got[1], expected[1], sum_bound((dy * x.double()).abs(), P, dtype), acc)
    if with_peak:
        check("count", got[2], expected[2], 0.0, acc)
        if shape[0] > 0 and P >= 8:
            assert got[2].sum() > shape[0] * shape[1], "the peaks should repeat"
    else:
        check_empty("count", got[2], acc)
    if residual_grad and out_activation == "relu":
        check("dresidual", got[3], expected[3], 0.0, dtype, like=x)
    else:
        check_empty("dresidual", got[3], dtype)


GRAD_MAP_OPTIONS = list(itertools.product(("none", "relu"), (False, True), (False, True), (False, True)))


@pytest.mark.parametrize("shape,layout,dtype,options,seed", cases(GRAD_MAP_OPTIONS))
def test_grad_map_matches_reference(shape, layout, dtype, options, seed):
    out_activation, with_x_scale, with_shift, with_peak = options
    t = Inputs(shape, dtype, seed)
    x, grad_out, out = grad_inputs(t, layout, seed, out_activation, integers=with_peak)
    dy_scale = t.vector(transposed=seed % 2 == 0)
    x_scale = t.vector() if with_x_scale else None
    shift = t.vector() if with_shift else None
    peak = x.double().amax(dim=(2, 3)).to(t.acc) if with_peak else None
    peak_shift = t.vector() if with_peak else None
    args = (grad_out, out, x, dy_scale, x_scale, shift, peak, peak_shift, out_activation)
    got = OPS["stream_grad_map"](*args)
    expected = _stream_ops.reference("stream_grad_map", *as64(args))
    terms = (nc(dy_scale) * grad_out.double()).abs()
    if with_x_scale:
        terms = terms + (nc(x_scale) * x.double()).abs()
    if with_shift:
        terms = terms + nc(shift).abs()
    if with_peak:
        terms = terms + nc(peak_shift).abs()
    check("dx", got, expected, x_sized_bound(expected, terms, 4, dtype), dtype, like=x)
    if with_peak and shape[0] > 0:  # the peak's positions got peak_shift
        without = _stream_ops.reference("stream_grad_map", *as64(args[:6]), None, None, out_activation)
        assert (expected != without).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ("nchw", "channels_last", "strided"))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_small_integers_give_exact_results(shape, layout, dtype):
    """With small integers every sum and map is exact in any dtype: the kernels must equal
    the reference bitwise, so an element missed or counted twice anywhere (vector bodies,
    tails, pieces, channel blocks) shows however large the row."""
    t = Inputs(shape, dtype, 13)
    x, grad_out = t.x_sized(layout, integers=True), t.x_sized(integers=True)
    signs = torch.randint(0, 2, shape, generator=t.gen).double() * 2 - 1
    out = apply_layout((signs * t.x_sized(integers=True).double()).to(dtype), layout)

    def small(low=-3, high=4):  # nonzero integers in [low, high) as an [N, C] vector
        v = torch.randint(low, high - 1, shape[:2], generator=t.gen).double()
        return (v + (v >= 0)).to(t.acc)

    peak = x.double().amax(dim=(2, 3)).to(t.acc)
    for name, args in (
        ("stream_reduce", (x, True, True, True)),
        ("stream_map", (x, small(), small(), out, "relu")),
        ("stream_grad_reduce", (grad_out, out, x, peak, "relu", True, True)),
        ("stream_grad_map", (grad_out, out, x, small(), small(), small(), peak, small(), "relu")),
    ):
        got, expected = OPS[name](*args), _stream_ops.reference(name, *as64(args))
        if not isinstance(got, tuple):
            got, expected = (got,), (expected,)
        for g, e in zip(got, expected):
            assert g.shape == e.shape and torch.equal(g.double(), e), name


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
def test_max_and_min_propagate_nan(dtype, layout):
    """A NaN anywhere in a row (vector body or scalar tail, in either layout) makes its max,
    min and sums NaN, as torch.amax / amin; the other rows are untouched."""
    shape = (2, 37, 13, 17)
    t = Inputs(shape, dtype, 7)
    x = t.x_sized().double()
    for n, c, h, w in ((0, 0, 0, 0), (0, 36, 12, 16), (1, 5, 7, 3), (1, 33, 0, 1)):
        x[n, c, h, w] = float("nan")
    x = apply_layout(x.to(dtype), layout)
    got = OPS["stream_reduce"](x, True, True, True)
    expected = _stream_ops.reference("stream_reduce", x.double(), True, True, True)
    assert int(got[2].isnan().sum()) == 4 and int(got[3].isnan().sum()) == 4
    for name, g, e in zip(("sum", "sumsq", "max", "min"), got, expected):
        assert torch.equal(g.isnan(), e.isnan()), name
    torch.testing.assert_close(got[2], expected[2].to(t.acc), equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(got[3], expected[3].to(t.acc), equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_count_of_tied_peaks(layout, dtype):
    """Integer-valued x: each row's max and min occur many times; count is exact."""
    t = Inputs((3, 19, 9, 11), dtype, 11)
    x = t.x_sized(layout, integers=True)
    _, _, peak_max, peak_min = OPS["stream_reduce"](x, False, True, True)
    for peak in (peak_max, peak_min):
        count = OPS["stream_grad_reduce"](t.x_sized(), None, x, peak, "none", False, False)[2]
        expected = (x.double() == nc(peak)).sum(dim=(2, 3)).to(t.acc)
        assert torch.equal(count, expected)
        assert (count > 1).all()


# Reductions in several pieces (large H*W), in channels-last blocks (C > 128) and over many
# rows; the pieces and blocks depend on the shape only.
@pytest.mark.parametrize("shape,layout", [((1, 8, 96, 96), "nchw"), ((2, 200, 20, 20), "channels_last"),
                                          ((3, 48, 40, 40), "nchw"), ((1, 8, 96, 96), "channels_last")])
def test_results_do_not_depend_on_thread_count(shape, layout):
    t = Inputs(shape, torch.float32, 5)
    x, grad_out, out = t.x_sized(layout), t.x_sized(layout), t.x_sized(layout)
    peak = x.amax(dim=(2, 3))
    calls = [
        ("stream_reduce", (x, True, True, True)),
        ("stream_map", (x, t.vector(), t.vector(), grad_out, "relu")),
        ("stream_grad_reduce", (grad_out, out, x, peak, "relu", True, True)),
        ("stream_grad_map", (grad_out, out, x, t.vector(), t.vector(), t.vector(), peak, t.vector(), "relu")),
    ]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append([OPS[name](*args) for name, args in calls])
    finally:
        torch.set_num_threads(threads)
    def flat(result):
        return result if isinstance(result, tuple) else (result,)

    for other in results[1:]:
        for (name, _), a, b in zip(calls, results[0], other):
            for u, v in zip(flat(a), flat(b)):
                assert torch.equal(u, v), f"{name} differs between thread counts"


@pytest.mark.parametrize("dtype,layout", [(torch.float32, "nchw"), (torch.bfloat16, "channels_last")])
def test_opcheck(dtype, layout):
    t = Inputs((2, 6, 5, 3), dtype, 3)
    x, grad_out, out = t.x_sized(layout), t.x_sized(layout), t.x_sized("nchw")
    peak = x.double().amax(dim=(2, 3)).to(t.acc)
    for name, args in (
        ("stream_reduce", (x, True, False, True)),
        ("stream_map", (x, t.vector(), t.vector(), out, "relu")),
        ("stream_grad_reduce", (grad_out, out, x, peak, "relu", True, True)),
        ("stream_grad_map", (grad_out, None, x, t.vector(), t.vector(), None, peak, t.vector(), "none")),
    ):
        torch.library.opcheck(OPS[name], args)


def test_direct_calls_check_their_arguments():
    t = Inputs((2, 3, 4, 5), torch.float32, 1)
    x, grad_out, out, scale = t.x_sized(), t.x_sized(), t.x_sized(), t.vector()
    bad = [
        (r"x must be a 4-D tensor \[N, C, H, W\]", "stream_reduce", (x[0], False, False, False)),
        (r"x must be float16, bfloat16, float32 or float64, got Int",
         "stream_reduce", (x.int(), False, False, False)),
        (r"scale must have shape \[2, 3\], got \[3, 2\]", "stream_map", (x, scale.t(), None, None, "none")),
        (r"shift must have dtype Float, got Half", "stream_map", (x, scale, scale.half(), None, "none")),
        (r"residual must have dtype Float, got Double", "stream_map", (x, scale, None, x.double(), "none")),
        (r"out_activation must be one of 'none', 'relu', got 'gelu'", "stream_map", (x, scale, None, None, "gelu")),
        (r"out is required when out_activation is 'relu'",
         "stream_grad_reduce", (grad_out, None, x, None, "relu", False, False)),
        (r"grad_out must have shape \[2, 3, 4, 5\]", "stream_grad_reduce", (grad_out[:1], out, x, None, "none", False, False)),
        (r"peak must have dtype Float, got Double",
         "stream_grad_reduce", (grad_out, out, x, scale.double(), "none", False, False)),
        (r"peak and peak_shift must be given together",
         "stream_grad_map", (grad_out, out, x, scale, None, None, scale, None, "none")),
        (r"x_scale must have shape \[2, 3\]",
         "stream_grad_map", (grad_out, out, x, scale, scale[:1], None, None, None, "none")),
        (r"dy_scale must have dtype Float, got Double",
         "stream_grad_map", (grad_out, out, x, scale.double(), None, None, None, None, "none")),
    ]
    for message, name, args in bad:
        with pytest.raises(RuntimeError, match=message):
            OPS[name](*args)
