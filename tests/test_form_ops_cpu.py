"""The linear forms' inference op on CPU (se_kernels._form_ops; DESIGN.md §1.4) against its
reference, the staged path's composition, evaluated in float64 on the same (rounded)
inputs: each form (fc, zero and circular convolutions, a width past C), gate, pool and
epilogue, every dtype and layout, odd shapes; opcheck; the errors of direct calls; and the
staged path running it for calls autograd does not record."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import se_kernels
from se_kernels import _form_ops
from se_kernels._ops import kernel_memory_format
from se_kernels.excitation import ChannelConv, Fc
from se_kernels.options import GATES, POOLS
from se_kernels.staged import staged_squeeze_excitation
from helpers import covering_cases
from test_stream_cpu import DTYPES, LAYOUTS, SHAPES, Inputs

OP = torch.ops.se_kernels.linear_form_forward.default
FORMS = (("fc", 0), ("conv", 3), ("conv", 1), ("circular_conv", 5), ("circular_conv", 7))
EPILOGUES = ((False, "none"), (True, "none"), (True, "relu"), (False, "relu"))
OPTIONS = covering_cases(FORMS, GATES, POOLS, EPILOGUES)
# Bounds on |got - reference| relative to 1 + |reference|: the reference rounds once to the
# dtype; the kernel's sums and gate run in the accumulation dtype, in another order.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5, torch.float64: 1e-12}


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
    got = OP(*args)
    expected = _form_ops.reference(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))
    assert got.dtype == dtype and got.shape == x.shape
    assert got.is_contiguous(memory_format=kernel_memory_format(x))
    err = (got.double() - expected).abs()
    assert torch.all(err <= TOLERANCE[dtype] * (1 + expected.abs())), f"worst error {err.max().item():.3g}"


def test_opcheck():
    t = Inputs((2, 6, 5, 3), torch.bfloat16, 3)
    x = t.x_sized("channels_last")
    for form, kernel in (("fc", 0), ("circular_conv", 3)):
        w, b = weights(t, form, kernel, 6, with_bias=True)
        torch.library.opcheck(OP, (x, form, w, b, "hardsigmoid", "avgmax", t.x_sized(), "relu"))


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
        with pytest.raises(RuntimeError, match=message):
            OP(*args)
        with pytest.raises((ValueError, TypeError), match=message):
            _form_ops.check_args(*args)


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
def test_staged_calls_autograd_does_not_record_run_the_one_op(form, params):
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
    p = tuple(t.requires_grad_() if t is not None else None for t in p)
    with OpCalls() as calls:
        staged_squeeze_excitation(x, form, p, gate="hardsigmoid", pool="avg", backend="cpu")
    assert "se_kernels::linear_form_forward" not in calls.names
    assert "se_kernels::stream_map" in calls.names


def test_the_fused_backend_declares_the_op():
    assert se_kernels.dispatch.get_backend("cpu").linear_form_op("cpu") is OP
    assert se_kernels.dispatch.get_backend("cpu").linear_form_op("cuda") is None
    assert se_kernels.dispatch.get_backend("torch").linear_form_op("cpu") is None
