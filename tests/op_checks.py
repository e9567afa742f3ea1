"""The checks every backend's ops get as ops, and what they are called with: the positional
arguments of se_forward / se_backward for a case (the same for the native and the Triton
ops, whose schemas agree), torch.library.opcheck of both, gradcheck through the public op,
and a fullgraph torch.compile against eager."""

from __future__ import annotations

import torch

from se_kernels.options import NONE, OUT_RELU
from helpers import Case, make_inputs, se_call

INPUT_NAMES = ("x", "w1", "b1", "w2", "b2", "residual")


def forward_args(case: Case, device="cpu", seed: int = 0, requires_grad: bool = False) -> tuple:
    """se_forward's arguments: make_inputs(case, device, seed), then the case's options."""
    t = make_inputs(case, device, seed)
    tensors = [t[name] for name in INPUT_NAMES]
    if requires_grad:
        tensors = [None if v is None else v.requires_grad_() for v in tensors]
    return (*tensors, case.activation, case.gate, case.pool, case.out_activation or NONE)


def backward_args(args: tuple, outputs: tuple, grad: torch.Tensor) -> tuple:
    """se_backward's arguments after se_forward(*args) returned `outputs`, as the ops'
    autograd formula passes them: `out` only where the output ReLU needs it."""
    x, w1, _, w2, _, residual, activation, gate, pool, out_activation = args
    out, z, zmax, a, g = outputs
    return (grad, x, out if out_activation == OUT_RELU else None, w1, w2, z, zmax, a, g,
            activation, gate, pool, out_activation, residual is not None)


def random_backward_args(forward_op, case: Case, device) -> tuple:
    """backward_args for forward_op on forward_args(case, device), with a grad_out drawn
    from the global generator (seed it for repeatable runs)."""
    args = forward_args(case, device)
    outputs = forward_op(*args)
    return backward_args(args, outputs, torch.randn_like(outputs[0]))


def opcheck_forward(forward_op, case: Case, device, requires_grad: bool) -> None:
    """opcheck: schema, fake kernel (shapes, strides, layouts) and, with inputs that require
    grad, the autograd registration, against the real kernels."""
    torch.library.opcheck(forward_op, forward_args(case, device, requires_grad=requires_grad))


def opcheck_backward(forward_op, backward_op, case: Case, device) -> None:
    torch.library.opcheck(backward_op, random_backward_args(forward_op, case, device))


def gradcheck_backend(case: Case, inputs: dict, backend: str) -> None:
    """torch.autograd.gradcheck of the public op through `backend` with respect to every
    tensor of `inputs` (float64)."""
    names = [k for k, v in inputs.items() if v is not None]
    leaves = [inputs[k].detach().requires_grad_() for k in names]

    def fn(*tensors):
        return se_call(case, dict(zip(names, tensors)), backend)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def square_sum(out: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient is the output itself, not a constant."""
    return out.square().sum()


def assert_compile_matches_eager(fn, inputs: list, *, backend: str = "inductor",
                                 loss=square_sum, params: tuple = (), **tolerances) -> None:
    """fn compiled with fullgraph=True (a graph break fails) gives eager's output and the
    gradients of `inputs` and `params` (parameters fn uses) under loss(output)."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    results = []
    for f in (fn, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        for p in params:
            p.grad = None
        out = f(*leaves)
        loss(out).backward()
        results.append((out.detach(), *(t.grad for t in leaves), *(p.grad for p in params)))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, **tolerances)
