"""The block tail's algebra ops (se_kernels._tail_ops): the CPU kernels against the PyTorch
versions in float32 and float64, with and without the norm's weight and bias, in batch
statistics and eval, with and without an activation's Σd; the PyTorch versions against a
float64 autograd oracle of the norm's backward; opcheck; argument errors naming each
argument, alike from the kernels and the PyTorch versions."""

from __future__ import annotations

import itertools

import pytest
import torch

from se_kernels import _compat, _tail_ops

pytestmark = pytest.mark.usefixtures("one_thread")

OPS = _tail_ops.OPS
needs_kernels = pytest.mark.skipif(
    not _compat.has_dispatch_kernel("se_kernels::tail_du_sums", "CPU"),
    reason="se_kernels._C was built without the tail ops")
N, C, P = 3, 7, 5


def vectors(dtype, seed, n=N, c=C):
    gen = torch.Generator().manual_seed(seed)

    def rand(*size, shift=0.0):
        return (torch.randn(*size, generator=gen, dtype=torch.float64) + shift).to(dtype)

    return {
        "sums": rand(n, c) * P, "moments": torch.cat([rand(c), rand(c).abs() + 1.5]),
        "weight": rand(c), "bias": rand(c), "dz": rand(n, c), "k": rand(n, c).sigmoid(),
        "sdy": rand(n, c), "sd": rand(n, c).abs(), "sdyx": rand(n, c), "sdx": rand(n, c),
        "local": rand(2 * c), "means": rand(2 * c), "stats": torch.stack([rand(c), rand(c).abs()]),
        "rstd": rand(c).abs() + 0.5,
    }


def forward_args(v, affine, batch_stats, with_sums=True):
    return (v["moments"], v["sums"] if with_sums else None, v["weight"] if affine else None,
            v["bias"] if affine else None, 1e-3, P, batch_stats)


def du_args(v, with_sd):
    return (v["dz"], v["k"], v["sdy"], v["sd"] if with_sd else None, v["sdyx"], v["sdx"], P)


def backward_args(v, affine, batch_stats):
    return (v["local"], v["means"], v["stats"], v["rstd"], v["weight"] if affine else None,
            v["bias"] if affine else None, v["k"], v["dz"], P, batch_stats)


def cases():
    for affine, flag in itertools.product((True, False), repeat=2):
        yield "tail_norm_forward", lambda v, a=affine, f=flag: forward_args(v, a, f)
        yield "tail_norm_backward", lambda v, a=affine, f=flag: backward_args(v, a, f)
    yield "tail_norm_forward", lambda v: forward_args(v, True, True, with_sums=False)
    for with_sd in (True, False):
        yield "tail_du_sums", lambda v, s=with_sd: du_args(v, s)


CASES = list(cases())


@needs_kernels
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("index", range(len(CASES)))
def test_cpu_kernel_matches_pytorch_version(dtype, index):
    name, make = CASES[index]
    args = make(vectors(dtype, seed=index))
    got, want = OPS[name](*args), _tail_ops.REFERENCES[name](*args)
    tol = {torch.float32: 2e-6, torch.float64: 1e-14}[dtype]
    for i, (g, w) in enumerate(zip(got if isinstance(got, tuple) else (got,),
                                   want if isinstance(want, tuple) else (want,))):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{name}[{i}]"
        torch.testing.assert_close(g, w, rtol=tol, atol=tol, msg=f"{name}[{i}]")


def test_pytorch_versions_match_the_norms_autograd():
    """The three in float64 give what autograd of u = BN(x) gives for the tail's algebra:
    for du = k·dy + dz/p over a batch, dγ, dβ and dx = dy_scale·dy + x_scale·x + shift."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, P, generator=gen, dtype=torch.float64)
    dy = torch.randn(N, C, P, generator=gen, dtype=torch.float64)
    k, dz = torch.rand(N, C, generator=gen, dtype=torch.float64), torch.randn(N, C, generator=gen,
                                                                          dtype=torch.float64)
    weight = torch.randn(C, generator=gen, dtype=torch.float64).requires_grad_()
    bias = torch.randn(C, generator=gen, dtype=torch.float64).requires_grad_()
    eps = 1e-3
    xg = x.clone().requires_grad_()
    u = torch.nn.functional.batch_norm(xg, None, None, weight, bias, True, 0.0, eps)
    (u * (k[..., None] * dy + dz[..., None] / P)).sum().backward()

    sums = x.sum(2)
    moments = torch.cat([sums, (x * x).sum(2)], 1).sum(0) / (N * P)
    stats, rstd, a, b, z = _tail_ops.norm_forward(moments, sums, weight.detach(), bias.detach(),
                                                  eps, P, True)
    torch.testing.assert_close(z, u.detach().mean(2))
    local = _tail_ops.du_sums(dz, k, dy.sum(2), None, (dy * x).sum(2), sums, P)
    dweight, dbias, dy_scale, e_scale, x_scale, shift = _tail_ops.norm_backward(
        local, local / (N * P), stats, rstd, weight.detach(), bias.detach(), k, dz, P, True)
    torch.testing.assert_close(dweight, weight.grad)
    torch.testing.assert_close(dbias, bias.grad)
    dx = dy_scale[..., None] * dy + x_scale[:, None] * x + (e_scale + shift)[..., None]
    torch.testing.assert_close(dx, xg.grad)


@needs_kernels
@pytest.mark.parametrize("index", range(len(CASES)))
def test_cpu_opcheck(index):
    name, make = CASES[index]
    torch.library.opcheck(OPS[name], make(vectors(torch.float32, seed=index)))


BAD = [
    (TypeError, r"moments must be float32 or float64", "tail_norm_forward",
     lambda v: (v["moments"].half(), None, None, None, 1e-5, P, True)),
    (ValueError, r"moments must have shape \[2C\]", "tail_norm_forward",
     lambda v: (v["moments"][:-1], None, None, None, 1e-5, P, True)),
    (ValueError, r"sums must have shape \[N, 7\]", "tail_norm_forward",
     lambda v: (v["moments"], v["sums"][:, :3], None, None, 1e-5, P, True)),
    (TypeError, r"weight must be (torch\.float32|Float) on cpu", "tail_norm_forward",
     lambda v: (v["moments"], None, v["weight"].double(), None, 1e-5, P, True)),
    (ValueError, r"p \(positions per channel\) must be at least 1, got 0", "tail_norm_forward",
     lambda v: (v["moments"], None, None, None, 1e-5, 0, True)),
    (ValueError, r"sdx must have shape \[3, 7\]", "tail_du_sums",
     lambda v: (v["dz"], v["k"], v["sdy"], None, v["sdyx"], v["sdx"][:2], P)),
    (TypeError, r"sd must be (torch\.float32|Float)", "tail_du_sums",
     lambda v: (v["dz"], v["k"], v["sdy"], v["sd"].double(), v["sdyx"], v["sdx"], P)),
    (ValueError, r"means must have shape \[14\]", "tail_norm_backward",
     lambda v: (v["local"], v["means"][:7], v["stats"], v["rstd"], None, None, v["k"], v["dz"],
                P, True)),
    (ValueError, r"dz must have shape \[3, 7\]", "tail_norm_backward",
     lambda v: (v["local"], v["means"], v["stats"], v["rstd"], None, None, v["k"], v["dz"].t(),
                P, True)),
]


@pytest.mark.parametrize("kind", ("kernel", "pytorch"))
@pytest.mark.parametrize("error,message,name,make", BAD)
def test_argument_errors_name_each_argument(kind, error, message, name, make):
    if kind == "kernel" and not _compat.has_dispatch_kernel(f"se_kernels::{name}", "CPU"):
        pytest.skip("se_kernels._C was built without the tail ops")
    fn = OPS[name] if kind == "kernel" else _tail_ops.REFERENCES[name]
    with pytest.raises(error, match=message):
        fn(*make(vectors(torch.float32, seed=1)))
