"""The linear forms' ops on CPU (se_kernels._form_ops; DESIGN.md §1.4) against their
references, the staged path's composition and its autograd gradients, evaluated in float64
on the same (rounded) inputs: each form (fc, zero and circular convolutions, a width past
C), gate, pool and epilogue, every dtype and layout, odd shapes; opcheck; the errors of
direct calls; and the staged path running one op each way."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import se_kernels
from se_kernels import _form_ops
from se_kernels._ops import kernel_memory_format
from se_kernels.backends.torch_backend import POOLS as POOL_FUNCTIONS
from se_kernels.excitation import ChannelConv, Fc
from se_kernels.options import GATES, POOLS
from se_kernels.staged import staged_squeeze_excitation
from helpers import covering_cases
from test_stream_cpu import DTYPES, LAYOUTS, SHAPES, Inputs

OP = torch.ops.se_kernels.linear_form_forward.default
SAVED = torch.ops.se_kernels.linear_form_forward_saved.default
BACKWARD = torch.ops.se_kernels.linear_form_backward.default
FORMS = (("fc", 0), ("conv", 3), ("conv", 1), ("circular_conv", 5), ("circular_conv", 7))
EPILOGUES = ((False, "none"), (True, "none"), (True, "relu"), (False, "relu"))
OPTIONS = covering_cases(FORMS, GATES, POOLS, EPILOGUES)
# Bounds on |got - reference| relative to 1 + |reference|: the reference rounds once to the
# dtype; the kernel's sums and gate run in the accumulation dtype, in another order.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5, torch.float64: 1e-12}
# The weight gradients are sums over the batch and the positions in the accumulation
# dtype: bounded relative to 1 + their largest magnitude.
SUM_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-11}


def assert_within(name, got, expected, bound):
    err = (got.double() - expected).abs()
    assert torch.all(err <= bound), f"{name}: worst error {err.max().item():.3g}"


def weights(t: Inputs, form: str, kernel: int, c: int, with_bias: bool):
    n = c * c if form == "fc" else kernel
    w = (torch.randn(n, generator=t.gen, dtype=torch.float64) / (c if form == "fc" else 1)).to(t.acc)
    w = w.reshape(c, c) if form == "fc" else w
    b = torch.randn(c if form == "fc" else 1, generator=t.gen, dtype=torch.float64).to(t.acc)
    return w, b if with_bias else None


def cases():
    combos = covering_cases(SHAPES, LAYOUTS, DTYPES, tuple(range(len(OPTIONS))))
    return [pytest.param(shape, layout, dtype, OPTIONS[o], seed, id=f"{shape}-{layout}-{str(dtype)[6:]}-{o}")
            for seed, (shape, layout, dtype, o) in enumerate(combos)]


@pytest.mark.parametrize("shape,layout,dtype,options,seed", cases())
def test_matches_reference(shape, layout, dtype, options, seed):
    (form, kernel), gate, pool, (with_residual, out_activation) = options
    t = Inputs(shape, dtype, seed)
    x = t.x_sized(layout)
    w, b = weights(t, form, kernel, shape[1], with_bias=seed % 2 == 0)
    residual = t.x_sized(LAYOUTS[(seed + 1) % len(LAYOUTS)]) if with_residual else None
    args = (x, form, w, b, gate, pool, residual, out_activation)
    got, z, zmax, g = SAVED(*args)
    assert torch.equal(OP(*args), got)  # the inference op: the same out alone
    expected = _form_ops.reference(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))
    assert got.dtype == dtype and got.shape == x.shape
    assert got.is_contiguous(memory_format=kernel_memory_format(x))
    assert_within("out", got, expected, TOLERANCE[dtype] * (1 + expected.abs()))
    # What the backward takes: z, the max (max pools) and g, in the accumulation dtype.
    x64 = x.double()
    z64 = POOL_FUNCTIONS[pool](x64)
    g64 = _form_ops.excitation(form, kernel).forward(z64, (w.double(), None if b is None else b.double()))[0]
    for name, v, ref in (("z", z, z64), ("g", g, g64)):
        assert v.dtype == t.acc, name
        assert_within(name, v, ref, 10 * SUM_TOLERANCE.get(t.acc, 1e-4) * (1 + ref.abs()))
    if pool == "avg":
        assert zmax.shape == (0,)
    else:
        assert torch.equal(zmax.double(), x64.amax(dim=(2, 3)))


@pytest.mark.parametrize("shape,layout,dtype,options,seed", cases())
def test_backward_matches_reference(shape, layout, dtype, options, seed):
    (form, kernel), gate, pool, (with_residual, out_activation) = options
    t = Inputs(shape, dtype, seed)
    x = t.x_sized(layout)
    w, b = weights(t, form, kernel, shape[1], with_bias=seed % 2 == 1)
    residual = t.x_sized() if with_residual else None
    grad_out = t.x_sized(LAYOUTS[(seed + 2) % len(LAYOUTS)])
    out, z, zmax, g = SAVED(x, form, w, b, gate, pool, residual, out_activation)
    residual_grad = with_residual and seed % 3 != 0
    dx, dresidual, dw, db = BACKWARD(grad_out, out if out_activation == "relu" else None, x, form,
                                     w, b, z, zmax if pool != "avg" else None, g, gate, pool,
                                     out_activation, residual_grad)
    expected = _form_ops.reference_backward(
        *(a.double() if isinstance(a, torch.Tensor) else a
          for a in (grad_out, x, form, w, b, gate, pool, residual, out_activation)))
    assert dx.dtype == dtype and dx.is_contiguous(memory_format=kernel_memory_format(x))
    assert_within("dx", dx, expected[0], TOLERANCE[dtype] * (1 + expected[0].abs()))
    if residual_grad and out_activation == "relu":
        assert_within("dresidual", dresidual, expected[1], TOLERANCE[dtype] * (1 + expected[1].abs()))
    else:
        assert dresidual.shape == (0,)
    for name, got, ref in (("dweight", dw, expected[2]), ("dbias", db, expected[3])):
        if ref is None:
            assert got.shape == (0,), name
            continue
        assert got.dtype == t.acc and got.shape == ref.shape, name
        assert_within(name, got, ref, SUM_TOLERANCE[t.acc] * (1 + ref.abs().max()))


def test_backward_sums_over_sample_groups():
    # 1.5 MB a sample: each sample is a group of its own, and the weight gradients sum the
    # groups' shares.
    t = Inputs((3, 64, 64, 96), torch.float32, 11)
    x, grad_out = t.x_sized(), t.x_sized()
    for form, kernel in (("fc", 0), ("circular_conv", 5)):
        w, b = weights(t, form, kernel, 64, with_bias=True)
        out, z, zmax, g = SAVED(x, form, w, b, "sigmoid", "avg", None, "none")
        dx, _, dw, db = BACKWARD(grad_out, None, x, form, w, b, z, None, g, "sigmoid", "avg", "none",
                                 False)
        expected = _form_ops.reference_backward(grad_out.double(), x.double(), form, w.double(),
                                                b.double(), "sigmoid", "avg", None, "none")
        assert_within("dx", dx, expected[0], TOLERANCE[torch.float32] * (1 + expected[0].abs()))
        for name, got, ref in (("dweight", dw, expected[2]), ("dbias", db, expected[3])):
            assert_within(name, got, ref, SUM_TOLERANCE[torch.float32] * (1 + ref.abs().max()))


def test_opcheck():
    t = Inputs((2, 6, 5, 3), torch.bfloat16, 3)
    x = t.x_sized("channels_last")
    for form, kernel in (("fc", 0), ("circular_conv", 3)):
        w, b = weights(t, form, kernel, 6, with_bias=True)
        for op in (OP, SAVED):
            torch.library.opcheck(op, (x, form, w, b, "hardsigmoid", "avgmax", t.x_sized(), "relu"))
        # With gradients: the autograd formula (the backward op) against itself under
        # AOTAutograd.
        leaves = [v.detach().requires_grad_() for v in (x, w, b, t.x_sized())]
        torch.library.opcheck(SAVED, (leaves[0], form, leaves[1], leaves[2], "hardsigmoid",
                                      "avgmax", leaves[3], "relu"))
        out, z, zmax, g = SAVED(x, form, w, b, "hardsigmoid", "avgmax", t.x_sized(), "relu")
        torch.library.opcheck(BACKWARD, (t.x_sized(), out, x, form, w, b, z, zmax, g, "hardsigmoid",
                                         "avgmax", "relu", True))


def test_direct_calls_check_their_arguments():
    t = Inputs((2, 3, 4, 5), torch.float32, 1)
    x = t.x_sized()
    w, b = weights(t, "fc", 0, 3, with_bias=True)
    k, kb = weights(t, "conv", 3, 3, with_bias=True)
    bad = [
        (r"x must be a 4-D tensor \[N, C, H, W\]", (x[0], "fc", w, b, "sigmoid", "avg", None, "none")),
        (r"form must be one of 'fc', 'conv', 'circular_conv', got 'eca'",
         (x, "eca", w, b, "sigmoid", "avg", None, "none")),
        (r"weight must have shape \[3, 3\], got \[3, 2\]", (x, "fc", w[:, :2], b, "sigmoid", "avg", None, "none")),
        (r"weight must have dtype (Float|torch.float32), got (Double|torch.float64)", (x, "fc", w.double(), b, "sigmoid", "avg", None, "none")),
        (r"bias must have shape \[3\], got \[1\]", (x, "fc", w, kb, "sigmoid", "avg", None, "none")),
        (r"weight of a conv form must be 1-D with an odd width, got shape \[2\]",
         (x, "conv", k[:2], kb, "sigmoid", "avg", None, "none")),
        (r"bias must have shape \[1\], got \[3\]", (x, "circular_conv", k, b, "sigmoid", "avg", None, "none")),
        (r"residual must have shape \[2, 3, 4, 5\]", (x, "conv", k, kb, "sigmoid", "avg", x[:1], "none")),
        (r"gate must be one of", (x, "conv", k, kb, "gelu", "avg", None, "none")),
        (r"pool must be one of", (x, "conv", k, kb, "sigmoid", "sum", None, "none")),
        (r"out_activation must be one of 'none', 'relu', got 'gelu'", (x, "conv", k, kb, "sigmoid", "avg", None, "gelu")),
    ]
    for message, args in bad:
        for op in (OP, SAVED):
            with pytest.raises(RuntimeError, match=message):
                op(*args)
        with pytest.raises((ValueError, TypeError), match=message):
            _form_ops.check_args(*args)


def test_backward_calls_check_their_arguments():
    t = Inputs((2, 3, 4, 5), torch.float32, 1)
    x, dy = t.x_sized(), t.x_sized()
    k, kb = weights(t, "conv", 3, 3, with_bias=True)
    out, z, zmax, g = SAVED(x, "conv", k, kb, "sigmoid", "max", None, "relu")

    def args(**changed):
        named = dict(grad_out=dy, out=out, x=x, form="conv", weight=k, bias=kb, z=z, zmax=zmax,
                     g=g, gate="sigmoid", pool="max", out_activation="relu", residual_grad=False)
        return tuple({**named, **changed}.values())

    bad = [
        (r"grad_out must have shape \[2, 3, 4, 5\]", args(grad_out=dy[:1])),
        (r"out is required when out_activation is 'relu'", args(out=None)),
        (r"weight of a conv form must be 1-D with an odd width", args(weight=k[:2])),
        (r"z must have shape \[2, 3\], got \[2, 2\]", args(z=z[:, :2])),
        (r"g must have dtype (Float|torch.float32), got (Double|torch.float64)", args(g=g.double())),
        (r"zmax is required when pool is 'max'", args(zmax=None)),
        (r"pool must be one of", args(pool="sum")),
    ]
    for message, call in bad:
        with pytest.raises(RuntimeError, match=message):
            BACKWARD(*call)
        with pytest.raises((ValueError, TypeError), match=message):
            _form_ops.check_backward_args(*call)


class OpCalls(TorchDispatchMode):
    """The names of the ops that run under it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("form, params", [
    (Fc(), lambda c: (torch.randn(c, c, 1, 1), torch.randn(c))),
    (ChannelConv(5, circular=True), lambda c: (torch.randn(1, 1, 5), None)),
])
def test_staged_calls_run_one_op_each_way(form, params):
    x = torch.randn(2, 8, 5, 5)
    p = params(8)
    with torch.no_grad(), OpCalls() as calls:
        out, stats = staged_squeeze_excitation(x, form, p, gate="hardsigmoid", pool="avg", backend="cpu")
    # The form's weights may be viewed in the op's shapes; nothing else runs.
    assert [n for n in calls.names if n != "aten::view"] == ["se_kernels::linear_form_forward"]
    assert stats is None
    with torch.no_grad():
        expected, _ = staged_squeeze_excitation(x, form, p, gate="hardsigmoid", pool="avg", backend="torch")
    torch.testing.assert_close(out, expected)
    # Recorded: the same op forward, its backward op backward, the gradients autograd's.
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, *p)]
    residual = torch.randn_like(x, requires_grad=True)
    grad_out = torch.randn_like(x)
    results = {}
    for backend in ("cpu", "torch"):
        with OpCalls() as calls:
            y, _ = staged_squeeze_excitation(leaves[0], form, leaves[1:], gate="hardsigmoid",
                                             pool="avg", residual=residual, out_activation="relu",
                                             backend=backend)
            grads = torch.autograd.grad(y, [t for t in (*leaves, residual) if t is not None], grad_out)
        results[backend] = (y, *grads)
        if backend == "cpu":
            ops = [n for n in calls.names if n.startswith("se_kernels::")]
            assert ops == ["se_kernels::linear_form_forward_saved",
                           "se_kernels::linear_form_backward"]
    for got, expected in zip(results["cpu"], results["torch"]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_the_fused_backend_declares_the_ops():
    assert se_kernels.dispatch.get_backend("cpu").linear_form_ops("cpu") == {"forward": OP,
                                                                             "saved": SAVED}
    assert se_kernels.dispatch.get_backend("cpu").linear_form_ops("cuda") is None
    assert se_kernels.dispatch.get_backend("torch").linear_form_ops("cpu") is None
