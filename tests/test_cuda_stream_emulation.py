"""The stream ops' CUDA kernels (csrc/cuda/se_stream.cu) on the CPU emulator
(tools/cuda_emulator/), as se_kernels_emu's ops of the same schemas: each op against
_stream_ops.reference on float64 copies of its inputs, in every dtype and layout, on odd
shapes (N = 0, C = 1, H*W = 1, odd H*W, rows split into pieces, rows off 16-byte
boundaries), with and without each optional argument; NaN propagation, ties, argument
checks, and results bitwise the same for every order of CTAs. Every buffer sits between
NaN guards and the emulator checks alignment, races and bounds (see test_cuda_emulation.py).

Needs the CUDA toolkit's headers (not a GPU, not nvcc)."""

from __future__ import annotations

import zlib

import pytest
import torch

from cuda_emulator.build import (DEFAULT_MODE, EMULATED_DEVICE, STRICT, Mode, load_or_skip,
                                 load_se_kernels, set_mode)
from se_kernels._ops import accumulate_dtype, kernel_memory_format
from se_kernels._stream_ops import named, reference
from helpers import apply_layout

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# (rtol, atol) against the float64 reference: x-sized outputs are rounded once to x's dtype;
# sums are accumulated in fp32 (fp64 for fp64) over at most a few thousand elements.
X_TOL = {torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3), torch.float32: (1e-5, 1e-5),
         torch.float64: (1e-12, 1e-12)}
SUM_TOL = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-12, 1e-11)}
# N, C, H, W: C = 3 and 1, H*W = 1, odd H*W (49 bf16 elements: rows start off 16-byte
# boundaries), channels-last vectors (C = 8, 16), N = 0, and rows or pixels split into pieces
# on the emulated H100 (NCHW 41x41 in fp32 and 47x47 in 16 bits; channels-last 47x47 with
# C = 8 in 16 bits, vectors, and 30x30 with C = 3, scalars).
SHAPES = ((1, 3, 7, 7), (2, 3, 13, 17), (2, 1, 7, 7), (3, 5, 1, 1), (2, 8, 7, 7), (1, 16, 5, 3),
          (0, 3, 5, 5), (1, 3, 41, 41), (1, 8, 47, 47), (1, 3, 30, 30))
LAYOUTS = ("nchw", "channels_last", "strided")
ORDERS = (Mode("forward", "forward", False), Mode("reverse", "reverse", False), STRICT)


@pytest.fixture(scope="module")
def emu():
    ops = load_or_skip(load_se_kernels)
    yield ops
    set_mode(ops, DEFAULT_MODE, 0)


def seed_of(*key) -> int:
    return zlib.crc32("/".join(map(str, key)).encode())


class Inputs:
    """Fresh random inputs of one shape, dtype and layout, from `seed`."""

    def __init__(self, shape, dtype, layout, seed, integers=False):
        self.gen = torch.Generator().manual_seed(seed)
        self.shape, self.dtype, self.layout, self.integers = shape, dtype, layout, integers
        self.acc = accumulate_dtype(dtype)

    def _values(self, shape):
        if self.integers:  # small integers: exact in every dtype, with ties everywhere
            return torch.randint(-3, 4, shape, generator=self.gen).double()
        return torch.randn(shape, generator=self.gen, dtype=torch.float64)

    def x_sized(self):
        return apply_layout(self._values(self.shape).to(self.dtype), self.layout)

    def vector(self):
        return self._values(self.shape[:2]).to(self.acc)


def fp64(t):
    return t.double() if isinstance(t, torch.Tensor) else t


def check_outputs(name, got, args, x):
    """got (one tensor or a tuple) against reference(name) on float64 copies of args: x-sized
    outputs in x's dtype and the kernels' layout, [N, C] ones in the accumulation dtype, [0]
    where not asked for; max, min and count exactly, NaN where the reference has NaN."""
    expected = reference(name, *map(fp64, args))
    got = got if isinstance(got, tuple) else (got,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    exact = {"stream_reduce": (2, 3), "stream_grad_reduce": (2,)}.get(name, ())
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.shape == e.shape, f"{name}[{i}]: shape {list(g.shape)}, expected {list(e.shape)}"
        x_sized = g.dim() == 4 or (name, i) == ("stream_grad_reduce", 3)  # dresidual
        assert g.dtype == (x.dtype if x_sized else accumulate_dtype(x.dtype)), f"{name}[{i}]"
        if g.dim() == 4:
            assert g.is_contiguous(memory_format=kernel_memory_format(x)), f"{name}[{i}] layout"
            rtol, atol = X_TOL[x.dtype]
        else:
            rtol, atol = (0.0, 0.0) if i in exact else SUM_TOL[accumulate_dtype(x.dtype)]
        torch.testing.assert_close(g.double(), e, rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"{name}[{i}]: {m}")


def run_reduce(emu, inp, variant):
    x = inp.x_sized()
    args = (x, variant % 2 == 0, variant % 3 != 1, variant % 4 < 2)
    return args, emu.stream_reduce(*args)


def run_map(emu, inp, variant):
    x = inp.x_sized()
    args = (x, inp.vector(), inp.vector() if variant % 2 else None,
            inp.x_sized() if variant % 3 != 2 else None, "relu" if variant % 4 < 2 else "none")
    return args, emu.stream_map(*args)


def run_grad_reduce(emu, inp, variant):
    x, relu = inp.x_sized(), variant % 2 == 0
    peak = x.to(inp.acc).amax(dim=(2, 3)) if variant % 3 == 0 else inp.vector()
    args = (inp.x_sized(), inp.x_sized() if relu or variant % 3 == 1 else None, x,
            peak if variant % 4 != 1 else None, "relu" if relu else "none", variant % 5 < 3,
            variant % 3 != 2)
    return args, emu.stream_grad_reduce(*args)


def run_grad_map(emu, inp, variant):
    x, relu = inp.x_sized(), variant % 2 == 1
    peak = x.to(inp.acc).amin(dim=(2, 3)) if variant % 3 == 0 else inp.vector()
    with_peak = variant % 4 != 2
    args = (inp.x_sized(), inp.x_sized() if relu else None, x, inp.vector(),
            inp.vector() if variant % 3 != 1 else None, inp.vector() if variant % 5 < 3 else None,
            peak if with_peak else None, inp.vector() if with_peak else None,
            "relu" if relu else "none")
    return args, emu.stream_grad_map(*args)


OPS = {"stream_reduce": run_reduce, "stream_map": run_map,
       "stream_grad_reduce": run_grad_reduce, "stream_grad_map": run_grad_map}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", OPS)
def test_against_reference(emu, name, dtype, layout):
    """Every shape, its optional arguments and flags cycling with the shape (each value of
    each appears in every dtype and layout), in the strictest emulator mode."""
    for variant, shape in enumerate(SHAPES):
        seed = seed_of(name, dtype, layout, shape)
        set_mode(emu, STRICT, seed)
        args, got = OPS[name](emu, Inputs(shape, dtype, layout, seed), variant)
        check_outputs(name, got, args, args[2] if name.startswith("stream_grad") else args[0])


@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("name", OPS)
def test_ties(emu, name, dtype, layout):
    """Integer-valued inputs: maxima, minima and peaks tie within every channel, counts and
    the peak terms must see every tie."""
    for variant, shape in enumerate(((2, 8, 7, 7), (1, 3, 41, 41), (2, 3, 5, 1))):
        seed = seed_of("ties", name, dtype, layout, shape)
        set_mode(emu, STRICT, seed)
        for v in (variant * 2, variant * 2 + 3):  # with and without each optional argument
            args, got = OPS[name](emu, Inputs(shape, dtype, layout, seed, integers=True), v)
            check_outputs(name, got, args, args[2] if name.startswith("stream_grad") else args[0])


@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.float32), ids=str)
def test_nan_propagates(emu, dtype, layout):
    """A NaN in x makes its channel's sum, max and min NaN (as torch.amax and amin), and
    reaches the map outputs of its element only; an infinite coefficient under a false mask
    gives NaN as the reference's product does."""
    shape = (2, 8, 7, 7)
    inp = Inputs(shape, dtype, layout, seed_of("nan", dtype, layout))
    x = inp.x_sized()
    x[0, 1, 3, 4] = float("nan")
    x[1, 5, 0, 0] = float("nan")
    args = (x, True, True, True)
    check_outputs("stream_reduce", emu.stream_reduce(*args), args, x)
    args = (x, inp.vector(), inp.vector(), inp.x_sized(), "relu")
    check_outputs("stream_map", emu.stream_map(*args), args, x)
    peak, peak_shift = inp.vector(), inp.vector()
    peak_shift[0, 2] = float("inf")
    args = (inp.x_sized(), inp.x_sized(), x, peak, "relu", True, True)
    check_outputs("stream_grad_reduce", emu.stream_grad_reduce(*args), args, x)
    args = (inp.x_sized(), inp.x_sized(), x, inp.vector(), inp.vector(), None, peak, peak_shift,
            "relu")
    check_outputs("stream_grad_map", emu.stream_grad_map(*args), args, x)


def bits(t: torch.Tensor) -> torch.Tensor:
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(ints[t.element_size()]) if t.numel() else t


@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
def test_bitwise_across_cta_orders(emu, layout):
    """CTAs in forward, reverse and random order (4 resident): the same bits, split rows
    and their combined partials included."""
    for name in OPS:
        for shape, dtype in (((1, 3, 41, 41), torch.float32), ((2, 8, 47, 47), torch.bfloat16),
                             ((1, 3, 30, 30), torch.float32)):
            results = []
            for i, mode in enumerate(ORDERS):
                set_mode(emu, mode, seed_of("orders", i))
                seed = seed_of("orders", name, layout, shape)
                _, got = OPS[name](emu, Inputs(shape, dtype, layout, seed), 0)
                results.append([bits(t) for t in (got if isinstance(got, tuple) else (got,))])
            for other in results[1:]:
                assert all(torch.equal(a, b) for a, b in zip(results[0], other)), (name, shape)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_misaligned_tensors(emu, dtype):
    """x-sized tensors one element past a 16-byte boundary (dense views at an offset): the
    passes take their scalar path, or the emulator's alignment check fails the call."""
    shape = (2, 8, 4, 8)
    inp = Inputs(shape, dtype, "nchw", seed_of("misaligned", dtype))

    def misaligned():
        t = inp.x_sized()
        flat = torch.empty(t.numel() + 1, dtype=dtype)
        flat[1:] = t.reshape(-1)
        return flat[1:].view(shape)

    x = misaligned()
    check_outputs("stream_reduce", emu.stream_reduce(x, True, True, True), (x, True, True, True),
                  x)
    args = (x, inp.vector(), None, inp.x_sized(), "none")
    check_outputs("stream_map", emu.stream_map(*args), args, x)
    args = (misaligned(), inp.x_sized(), inp.x_sized(), inp.vector(), "relu", True, True)
    check_outputs("stream_grad_reduce", emu.stream_grad_reduce(*args), args, args[2])
    args = (inp.x_sized(), misaligned(), inp.x_sized(), inp.vector(), inp.vector(), None, None,
            None, "relu")
    check_outputs("stream_grad_map", emu.stream_grad_map(*args), args, args[2])


def test_launches(emu):
    """One reduce kernel, plus the combine kernel when rows are split; one map kernel; none
    for N = 0 (codes of se_trace.h: 3 reduce, 4 combine, 6 map)."""
    x = torch.randn(1, 3, 41, 41)
    emu.stream_reduce(x, True, False, False)
    assert emu.last_launches()[::2] == [3, 4]
    emu.stream_map(x, torch.randn(1, 3), None, None, "none")
    assert emu.last_launches()[::2] == [6]
    emu.stream_reduce(torch.randn(0, 3, 4, 4), True, True, True)
    assert emu.last_launches() == []


@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_launches_are_the_plan(emu, dtype, layout):
    """Every call launches the kernels, with the CTA counts, that se_kernels::
    cuda_stream_schedule (the source of `se-kernels plan` for staged and tail calls) plans
    for the emulated device: rows split into pieces, and their combine kernel, included."""
    from se_kernels.backends.native import plan_stream_call
    from se_kernels.schedule import CUDA_TRACE_KERNELS

    set_mode(emu, DEFAULT_MODE, 0)
    kernels = set()
    for name in OPS:
        for variant, shape in enumerate(SHAPES):
            args, got = OPS[name](emu, Inputs(shape, dtype, layout, seed_of("plan", shape)),
                                  variant)
            made = emu.last_launches()
            planned = plan_stream_call(name, named(name, args, got), EMULATED_DEVICE[0])
            assert list(zip(made[::2], made[1::2])) == [
                (CUDA_TRACE_KERNELS.index(launch.kernel), launch.programs) for launch in planned
            ], (name, shape, variant)
            kernels.update(launch.kernel for launch in planned)
    assert kernels == {"reduce", "combine", "map"}


@pytest.mark.parametrize("call, message", [
    (lambda ops, x, v: ops.stream_reduce(x[0], True, False, False), "x must be a 4-D tensor"),
    (lambda ops, x, v: ops.stream_reduce(x.int(), True, False, False), "x must be float16"),
    (lambda ops, x, v: ops.stream_map(x, v[:1], None, None, "none"), "scale must have shape"),
    (lambda ops, x, v: ops.stream_map(x, v.double(), None, None, "none"), "scale must have dtype"),
    (lambda ops, x, v: ops.stream_map(x, v, None, x[:1], "none"), "residual must have shape"),
    (lambda ops, x, v: ops.stream_map(x, v, None, None, "gelu"), "out_activation must be one of"),
    (lambda ops, x, v: ops.stream_grad_reduce(x, None, x, None, "relu", True, False),
     "out is required when out_activation is 'relu'"),
    (lambda ops, x, v: ops.stream_grad_reduce(x.double(), None, x, None, "none", True, False),
     "grad_out must have dtype"),
    (lambda ops, x, v: ops.stream_grad_map(x, None, x, v, None, None, v, None, "none"),
     "peak and peak_shift must be given together"),
    (lambda ops, x, v: ops.stream_grad_map(x, None, x, v, v.t(), None, None, None, "none"),
     "x_scale must have shape"),
], ids=lambda p: p if isinstance(p, str) else None)
def test_argument_checks(emu, call, message):
    """The C++ checks name the argument, as _stream_ops.check_* do."""
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3)
    with pytest.raises(RuntimeError, match=message):
        call(emu, x, v)


# ---- the act tail's ops: the passes read x through u = in_scale·x + in_shift --------------
ACT_CASES = (((2, 3, 7, 7), torch.float32, "nchw"), ((1, 8, 47, 47), torch.bfloat16, "channels_last"),
             ((1, 3, 41, 41), torch.float32, "nchw"), ((3, 5, 1, 1), torch.float64, "strided"),
             ((2, 16, 5, 3), torch.float16, "channels_last"), ((0, 3, 5, 5), torch.float32, "nchw"))


@pytest.mark.parametrize("activation", ("relu", "silu", "gelu", "gelu_tanh", "hardswish",
                                        "leaky_relu"))
def test_act_ops_against_reference(emu, activation):
    """Each act op against its reference on float64 copies, within the bound the CPU kernels
    are held to (test_act_tail): rows split into pieces (41x41, 47x47), vectors, N = 0."""
    from test_act_tail import as64, check, magnitude, op_args

    for seed, (shape, dtype, layout) in enumerate(ACT_CASES):
        acc = accumulate_dtype(dtype)
        unit = torch.finfo(acc).eps / 2
        p = shape[2] * shape[3]
        for name, extra in (("stream_act_reduce", {}), ("stream_act_map", {}),
                            ("stream_act_grad_reduce", {"statistics": seed % 2 == 0}),
                            ("stream_act_grad_map", {"optional": seed % 2 == 1})):
            args = op_args(name, shape, dtype, layout, activation, seed, **extra)
            got = getattr(emu, name)(*args)
            expected = reference(name, *as64(args))
            mag = magnitude(args, name)
            label = f"{name} {shape} {dtype} {layout}"
            if isinstance(got, torch.Tensor) and got.dim() == 4:
                extra_mag = (args[4].double().abs() if name == "stream_act_map"
                             else sum(v.double().abs() for v in args[5:] if v is not None))
                check(label, got, expected,
                      32 * unit * mag * (1 + extra_mag[:, :, None, None])
                      + torch.finfo(dtype).eps * expected.abs(), dtype)
                assert got.is_contiguous(memory_format=kernel_memory_format(args[0 if name == "stream_act_map" else 1]))
                continue
            for i, (g, e) in enumerate(zip(got if isinstance(got, tuple) else (got,),
                                           expected if isinstance(expected, tuple) else (expected,))):
                if e.shape == (0,):
                    assert g.shape == (0,) and g.dtype == acc, f"{label}[{i}] should be empty"
                    continue
                check(f"{label}[{i}]", g, e, 32 * (p + 1) * unit * mag.sum(dim=(2, 3)), acc)


def test_act_reduces_bitwise_across_cta_orders(emu):
    """The act reduce passes with rows split into pieces: the same bits for CTAs in forward,
    reverse and random order."""
    from test_act_tail import op_args

    for name in ("stream_act_reduce", "stream_act_grad_reduce"):
        for shape, dtype, layout in (((1, 3, 41, 41), torch.float32, "nchw"),
                                     ((1, 8, 47, 47), torch.bfloat16, "channels_last")):
            args = op_args(name, shape, dtype, layout, "silu", 3)
            results = []
            for i, mode in enumerate(ORDERS):
                set_mode(emu, mode, seed_of("act-orders", i))
                got = getattr(emu, name)(*args)
                results.append([bits(t) for t in (got if isinstance(got, tuple) else (got,))])
            set_mode(emu, DEFAULT_MODE, 0)
            for other in results[1:]:
                assert all(torch.equal(a, b) for a, b in zip(results[0], other)), (name, shape)
