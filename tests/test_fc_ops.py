"""The fully connected layer's ops (se_kernels._fc_ops): the CPU kernels against a float64
product in float32 and float64, over shapes that fill the register tiles and shapes that
leave every edge partial (a batch of 1, 2, 3, 5; K and R below, at and past the vector
width); results that do not depend on the thread count; the PyTorch versions against
autograd of F.linear; opcheck; argument errors naming each argument, alike from the
kernels and the PyTorch versions; and the staged path running its MLP on them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from se_kernels import _compat, _fc_ops

OPS = _fc_ops.OPS
needs_kernels = pytest.mark.skipif(
    not _compat.has_dispatch_kernel("se_kernels::fc_layer_backward", "CPU"),
    reason="se_kernels._C was built without the fc_layer ops")

# (N, K, R): the excitations' own (batch x C x S and back), and the tiles' edges: batch
# 1 and 2 (their own tiles), 3 and 5 (a partial row tile), K and R of 1, 7, 9, 28, 37.
SHAPES = [(8, 2048, 128), (8, 128, 2048), (32, 672, 28), (32, 28, 672), (1, 256, 16),
          (2, 16, 256), (3, 37, 9), (5, 9, 37), (7, 1, 7), (4, 7, 1), (6, 24, 24), (1, 1, 1)]


def operands(n, k, r, dtype, seed):
    gen = torch.Generator().manual_seed(seed)

    def rand(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64).to(dtype)

    return rand(n, k), rand(r, k), rand(r), rand(n, r)


def tolerance(dtype, k):
    """A sum of k products, each within an fp32 (fp64) rounding, in another order."""
    return {torch.float32: 1e-6, torch.float64: 1e-14}[dtype] * max(k, 1) ** 0.5 * 4


@needs_kernels
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}x{r}" for n, k, r in SHAPES])
@pytest.mark.parametrize("bias", (True, False))
def test_cpu_kernels_match_float64_products(dtype, shape, bias):
    n, k, r = shape
    x, weight, b, grad = operands(n, k, r, dtype, seed=n * 1000 + k + r)
    y = OPS["fc_layer"](x, weight, b if bias else None)
    dx, dweight, dbias = OPS["fc_layer_backward"](grad, x, weight, bias)
    x64, w64, b64, g64 = (t.double() for t in (x, weight, b, grad))
    want = {"y": F.linear(x64, w64, b64 if bias else None), "dx": g64 @ w64,
            "dweight": g64.t() @ x64}
    got = {"y": y, "dx": dx, "dweight": dweight}
    terms = {"y": k, "dx": r, "dweight": n}
    for name, value in got.items():
        assert value.dtype == dtype and value.shape == want[name].shape, name
        tol = tolerance(dtype, terms[name])
        torch.testing.assert_close(value.double(), want[name], rtol=tol, atol=tol, msg=name)
    if bias:
        torch.testing.assert_close(dbias.double(), g64.sum(0), rtol=tolerance(dtype, n),
                                   atol=tolerance(dtype, n))
    else:
        assert dbias.shape == (0,)


@needs_kernels
@pytest.mark.parametrize("shape", [(8, 2048, 128), (32, 672, 28), (3, 37, 9)])
def test_cpu_kernels_do_not_depend_on_thread_count(shape):
    x, weight, b, grad = operands(*shape, torch.float32, seed=1)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append((OPS["fc_layer"](x, weight, b),
                            *OPS["fc_layer_backward"](grad, x, weight, True)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert torch.equal(a, c)


@needs_kernels
def test_cpu_kernels_read_strided_operands():
    """A transposed weight, a sliced x and grad: the op reads them as their values."""
    x, weight, b, grad = operands(6, 40, 24, torch.float32, seed=2)
    xs, ws, gs = x[:, ::2], weight.t().contiguous().t(), grad[:, :12]
    y = OPS["fc_layer"](xs, ws[:, ::2], b[:24])
    torch.testing.assert_close(y, F.linear(xs, ws[:, ::2], b))
    dx, dweight, _ = OPS["fc_layer_backward"](gs, xs, weight[:12, ::2], False)
    torch.testing.assert_close(dx, gs @ weight[:12, ::2])
    torch.testing.assert_close(dweight, gs.t() @ xs)


def test_pytorch_versions_match_autograd_of_linear():
    x, weight, b, grad = operands(5, 9, 7, torch.float64, seed=3)
    leaves = [t.clone().requires_grad_() for t in (x, weight, b)]
    F.linear(*leaves).backward(grad)
    torch.testing.assert_close(_fc_ops.forward_reference(x, weight, b), F.linear(x, weight, b))
    for got, leaf in zip(_fc_ops.backward_reference(grad, x, weight, True), leaves):
        torch.testing.assert_close(got, leaf.grad)


@needs_kernels
@pytest.mark.parametrize("bias", (True, False))
def test_cpu_opcheck(bias):
    x, weight, b, grad = operands(3, 37, 9, torch.float32, seed=4)
    torch.library.opcheck(OPS["fc_layer"], (x, weight, b if bias else None))
    torch.library.opcheck(OPS["fc_layer_backward"], (grad, x, weight, bias))


def _bad():
    x, weight, b, grad = operands(3, 8, 5, torch.float32, seed=5)
    return [
        (TypeError, r"x must be float32 or float64", "fc_layer", (x.half(), weight.half(), None)),
        (ValueError, r"x must be a 2-D tensor \[N, K\]", "fc_layer", (x[None], weight, None)),
        (ValueError, r"weight must be a 2-D tensor \[R, K\]", "fc_layer", (x, weight[0], None)),
        (ValueError, r"weight must have shape \[5, 8\]", "fc_layer", (x, weight[:, :7], None)),
        (TypeError, r"weight must have dtype (torch\.float32|Float), got", "fc_layer",
         (x, weight.double(), None)),
        (ValueError, r"bias must have shape \[5\]", "fc_layer", (x, weight, b[:4])),
        (TypeError, r"bias must have dtype (torch\.float32|Float), got", "fc_layer",
         (x, weight, b.double())),
        (ValueError, r"grad must have shape \[3, 5\]", "fc_layer_backward",
         (grad.t(), x, weight, True)),
        (TypeError, r"grad must have dtype (torch\.float32|Float), got", "fc_layer_backward",
         (grad.double(), x, weight, True)),
    ]


@pytest.mark.parametrize("kind", ("kernel", "pytorch"))
@pytest.mark.parametrize("index", range(len(_bad())))
def test_argument_errors_name_each_argument(kind, index):
    error, message, name, args = _bad()[index]
    if kind == "kernel" and not _compat.has_dispatch_kernel(f"se_kernels::{name}", "CPU"):
        pytest.skip("se_kernels._C was built without the fc_layer ops")
    fn = OPS[name] if kind == "kernel" else _fc_ops.REFERENCES[name]
    with pytest.raises(error, match=message):
        fn(*args)


def test_staged_path_runs_its_layers_on_the_ops_on_cpu_only():
    """for_device gives the ops in eager on CPU and the PyTorch versions elsewhere."""
    assert _fc_ops.for_device(torch.device("cpu")) is _fc_ops.KERNELS
    assert _fc_ops.for_device(torch.device("meta")) is _fc_ops.TORCH


class _LayerCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "se_kernels" and func._opname in _fc_ops.SCHEMAS:
            self.names.append(func._opname)
        return func(*args, **(kwargs or {}))


@needs_kernels
@pytest.mark.skipif(not _compat.has_dispatch_kernel("se_kernels::stream_map", "CPU"),
                    reason="se_kernels._C was built without the stream ops")
def test_block_tail_runs_its_mlp_on_the_ops_and_matches_the_composition():
    """A training step of the fused tail on the cpu backend: its two FCs are two fc_layer
    calls forward and two fc_layer_backward calls backward, and its output and gradients
    are the torch backend's."""
    from se_kernels.excitation import Mlp
    from se_kernels.tail import block_tail

    gen = torch.Generator().manual_seed(6)
    n, c, s = 4, 24, 6
    x = torch.randn(n, c, 3, 3, generator=gen)
    residual = torch.randn(n, c, 3, 3, generator=gen)
    grad = torch.randn(n, c, 3, 3, generator=gen)
    params = [torch.randn(s, c, 1, 1, generator=gen) * 0.3, torch.randn(s, generator=gen),
              torch.randn(c, s, 1, 1, generator=gen) * 0.3, torch.randn(c, generator=gen)]
    norm = [torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)]
    results = {}
    for backend in ("cpu", "torch"):
        leaves = [t.clone().requires_grad_() for t in (x, residual, *norm, *params)]
        with _LayerCalls() as calls:
            out, _ = block_tail(leaves[0], (*leaves[2:4], torch.zeros(c), torch.ones(c)),
                                Mlp("relu", 0.01), (*leaves[4:], None, None, None, None),
                                gate="sigmoid", batch_stats=True, residual=leaves[1],
                                backend=backend)
            out.backward(grad)
        results[backend] = (out.detach(), *(leaf.grad for leaf in leaves))
        if backend == "cpu":
            assert calls.names == ["fc_layer", "fc_layer", "fc_layer_backward",
                                   "fc_layer_backward"]
        else:
            assert calls.names == []
    for got, want in zip(results["cpu"], results["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
