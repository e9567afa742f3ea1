"""Bad input gets a clear exception naming the argument; edge values behave as the reference."""

import math

import pytest
import torch

import se_kernels
from se_kernels import _ops
from se_kernels.options import POOLS


def args(n=2, c=8, h=3, w=3, s=2, dtype=torch.float32):
    return dict(x=torch.randn(n, c, h, w, dtype=dtype), w1=torch.randn(s, c, dtype=dtype),
                b1=torch.randn(s, dtype=dtype), w2=torch.randn(c, s, dtype=dtype),
                b2=torch.randn(c, dtype=dtype))


def call(backend="cpu", **overrides):
    a = args()
    kwargs = {k: overrides.pop(k) for k in list(overrides) if k not in a}
    a.update(overrides)
    return se_kernels.squeeze_excitation(a["x"], a["w1"], a["b1"], a["w2"], a["b2"],
                                         backend=backend, **kwargs)


@pytest.mark.parametrize("overrides, error, message", [
    (dict(x=torch.randn(2, 8, 3)), ValueError, r"x must be 4-D \[N, C, H, W\], got 3-D"),
    (dict(x=torch.randn(2, 8, 0, 3)), ValueError, "x must have C, H and W >= 1"),
    (dict(x=torch.ones(2, 8, 3, 3, dtype=torch.int32)), TypeError, "x must be float16, bfloat16, float32 or float64"),
    (dict(x=[1.0]), TypeError, "x must be a torch.Tensor, got list"),
    (dict(w1=torch.randn(2, 7)), ValueError, r"w1 must have shape \[2, 8\]"),
    (dict(w1=torch.randn(0, 8)), ValueError, "w1 must be 2-D \\[squeeze_channels >= 1, C\\]"),
    (dict(w2=torch.randn(8, 3)), ValueError, r"w2 must have shape \[8, 2\]"),
    (dict(b1=torch.randn(3)), ValueError, r"b1 must have shape \[2\]"),
    (dict(b2=torch.randn(2)), ValueError, r"b2 must have shape \[8\]"),
    (dict(residual=torch.randn(2, 8, 3, 4)), ValueError, r"residual must have shape \[2, 8, 3, 3\]"),
    (dict(w2=torch.randn(8, 2, dtype=torch.float64)), TypeError, "w2 must have dtype torch.float32, got torch.float64"),
    (dict(b1=torch.randn(2, device="meta")), TypeError, "b1 must be on device cpu like x, got meta"),
    (dict(activation="mish"), ValueError, "activation must be one of 'relu', 'silu', .*, got 'mish'"),
    (dict(gate="softmax"), ValueError, "gate must be one of 'sigmoid', 'hardsigmoid', .*, got 'softmax'"),
    (dict(pool="median"), ValueError, "pool must be one of 'avg', 'max', 'avgmax', got 'median'"),
    (dict(out_activation="silu"), ValueError, "out_activation must be None or 'relu', got 'silu'"),
])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_bad_input_names_the_argument(overrides, error, message, backend):
    with pytest.raises(error, match=message):
        call(backend, **overrides)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of .*'cpu'.*got 'tpu'"):
        call(backend="tpu")


def test_refusing_backend_lists_reasons():
    with pytest.raises(se_kernels.BackendUnavailableError,
                       match="backend 'cuda' cannot run this call: x is on cpu"):
        call(backend="cuda")


@pytest.mark.parametrize("overrides, message", [
    (dict(w2=torch.randn(8, 3)), r"w2 must have shape \[8, 2\]"),
    (dict(x=torch.randn(2, 8, 3)), "x must be 4-D"),
    (dict(b1=torch.randn(2, dtype=torch.float64)), "b1 must have dtype Float like x"),
])
def test_direct_op_calls_are_checked_in_cpp(overrides, message):
    a = args()
    a.update(overrides)
    with pytest.raises(RuntimeError, match=message):
        _ops.se_forward(a["x"], a["w1"], a["b1"], a["w2"], a["b2"], None, "relu", "sigmoid", "avg", "none")


def test_direct_op_rejects_unknown_option():
    a = args()
    with pytest.raises(RuntimeError, match="pool must be one of 'avg', 'max', 'avgmax', got 'min'"):
        _ops.se_forward(a["x"], a["w1"], a["b1"], a["w2"], a["b2"], None, "relu", "sigmoid", "min", "none")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_empty_batch_returns_empty(backend):
    a = args(n=0)
    x = a["x"].requires_grad_()
    y = se_kernels.squeeze_excitation(x, a["w1"], a["b1"], a["w2"], a["b2"], backend=backend)
    assert y.shape == (0, 8, 3, 3)
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_propagate_like_the_reference(pool, bad):
    a = args(n=3)
    a["x"][1, 2, 1, 1] = bad
    results = [se_kernels.squeeze_excitation(a["x"], a["w1"], a["b1"], a["w2"], a["b2"], pool=pool,
                                             backend=b) for b in ("cpu", "torch")]
    torch.testing.assert_close(results[0], results[1], equal_nan=True)
    # The other samples are untouched by sample 1's bad value.
    assert torch.isfinite(results[0][[0, 2]]).all()
