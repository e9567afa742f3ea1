"""The custom ops as ops: opcheck, gradcheck, torch.compile and the FLOP formulas."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import se_kernels
from se_kernels import _ops
from helpers import Case, grad_output, make_inputs
from oracle import se_oracle

OPCHECK_CASES = [
    Case(n=2, c=6, h=3, w=4, s=2),
    Case(n=2, c=6, h=3, w=4, s=2, layout="channels_last", activation="silu", gate="hardsigmoid",
         pool="avgmax", residual=True, out_activation="relu"),
    Case(n=1, c=5, h=2, w=2, s=3, pool="max", residual=True, bias=False),
    Case(n=0, c=4, h=2, w=2, s=1),
]


def forward_args(case: Case, requires_grad: bool = False) -> tuple:
    t = make_inputs(case, "cpu")
    if requires_grad:
        t = {k: None if v is None else v.requires_grad_() for k, v in t.items()}
    return (t["x"], t["w1"], t["b1"], t["w2"], t["b2"], t["residual"], case.activation,
            case.gate, case.pool, case.out_activation or "none")


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck_forward(case):
    torch.library.opcheck(_ops.se_forward, forward_args(case, requires_grad=True))


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck_backward(case):
    args = forward_args(case)
    out, z, zmax, a, g = _ops.se_forward(*args)
    grad = torch.randn_like(out)
    torch.library.opcheck(_ops.se_backward, (
        grad, args[0], out if case.out_activation == "relu" else None, args[1], args[3], z, zmax,
        a, g, case.activation, case.gate, case.pool, case.out_activation or "none", case.residual))


def inputs_away_from_kinks(case: Case, margin: float = 1e-3) -> dict:
    """Inputs of the first seed whose hidden-ReLU inputs, hardsigmoid logits and output-ReLU
    inputs are all at least `margin` from their kinks, and whose channel maxima lead the
    runner-up by `margin`: finite differences there would straddle a jump in the derivative."""
    for seed in range(1000):
        t = make_inputs(case, "cpu", seed)
        r = se_oracle(case, t, grad_output(case, "cpu"), out_dtype=case.dtype)
        distances = [r.a.abs() if case.activation == "relu" else None,
                     torch.minimum((r.g - 3).abs(), (r.g + 3).abs()) if case.gate == "hardsigmoid" else None,
                     r.y.abs() if case.out_activation == "relu" else None]
        if case.pool != "avg" and case.h * case.w > 1:
            top2 = t["x"].flatten(2).topk(2, dim=-1).values
            distances.append(top2[..., 0] - top2[..., 1])
        if all(d is None or bool((d >= margin).all()) for d in distances):
            return t
    raise AssertionError(f"no seed keeps {case} {margin} away from its kinks")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("case", [
    Case(n=2, c=5, h=3, w=2, s=2, dtype=torch.float64, residual=True, out_activation="relu"),
    Case(n=2, c=4, h=2, w=3, s=3, dtype=torch.float64, activation="silu", gate="hardsigmoid",
         pool="avgmax", layout="channels_last"),
    Case(n=1, c=3, h=3, w=3, s=1, dtype=torch.float64, pool="max", bias=False),
], ids=str)
def test_gradcheck(backend, case):
    t = inputs_away_from_kinks(case)
    names = [k for k, v in t.items() if v is not None]
    leaves = [t[k].detach().requires_grad_() for k in names]

    def fn(*tensors):
        d = dict(zip(names, tensors))
        return se_kernels.squeeze_excitation(
            d["x"], d["w1"], d.get("b1"), d["w2"], d.get("b2"), activation=case.activation,
            gate=case.gate, pool=case.pool, residual=d.get("residual"),
            out_activation=case.out_activation, backend=backend)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    module = se_kernels.SqueezeExcitation(16, 4, out_activation="relu", backend="cpu").double()
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    r = torch.randn_like(x)
    for fn in (module, compiled):
        xx, rr = x.clone().requires_grad_(), r.clone().requires_grad_()
        module.zero_grad()
        y = fn(xx, rr)
        y.square().sum().backward()
        if fn is module:
            expected = (y.detach(), xx.grad, rr.grad, module.fc1.weight.grad.clone())
        else:
            got = (y.detach(), xx.grad, rr.grad, module.fc1.weight.grad.clone())
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)


def test_compile_has_no_graph_breaks():
    torch._dynamo.reset()
    module = se_kernels.SqueezeExcitation(8, 2, backend="auto")
    explanation = torch._dynamo.explain(module)(torch.randn(2, 8, 3, 3))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_flop_formula_counts_our_ops():
    n, c, h, w, s = 2, 16, 5, 6, 4
    module = se_kernels.SqueezeExcitation(c, s, backend="cpu")
    x = torch.randn(n, c, h, w, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        module(x).sum().backward()
    counts = counter.get_flop_counts()["Global"]
    elems = n * c * h * w
    assert counts[torch.ops.se_kernels.se_forward] == elems + 2 * 2 * n * c * s + elems
    assert counts[torch.ops.se_kernels.se_backward] == 2 * elems + 8 * n * c * s + 2 * elems
