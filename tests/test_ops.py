"""The custom ops as ops: opcheck, gradcheck, torch.compile and the FLOP formulas."""

import os
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import se_kernels
from se_kernels import _ops
from helpers import Case, grad_output, make_inputs
from op_checks import assert_compile_matches_eager, gradcheck_backend, opcheck_backward, opcheck_forward
from oracle import kink_distance, se_oracle

OPCHECK_CASES = [
    Case(n=2, c=6, h=3, w=4, s=2),
    Case(n=2, c=6, h=3, w=4, s=2, layout="channels_last", activation="silu", gate="hardsigmoid",
         pool="avgmax", residual=True, out_activation="relu"),
    Case(n=1, c=5, h=2, w=2, s=3, pool="max", residual=True, bias=False),
    Case(n=0, c=4, h=2, w=2, s=1),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck_forward(case):
    opcheck_forward(_ops.se_forward, case, "cpu", requires_grad=True)


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck_backward(case):
    opcheck_backward(_ops.se_forward, _ops.se_backward, case, "cpu")


def inputs_away_from_kinks(case: Case, margin: float = 1e-3) -> dict:
    """Inputs of the first seed whose hidden pre-activations, gate logits and output-ReLU
    inputs are all at least `margin` from their functions' kinks, and whose channel maxima
    lead the runner-up by `margin`: finite differences there would straddle a jump in the
    derivative."""
    for seed in range(1000):
        t = make_inputs(case, "cpu", seed)
        r = se_oracle(case, t, grad_output(case, "cpu"), out_dtype=case.dtype)
        distances = [kink_distance(r.a, case.activation), kink_distance(r.g, case.gate),
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
    gradcheck_backend(case, inputs_away_from_kinks(case), backend)


def test_compile_fullgraph_matches_eager():
    module = se_kernels.SqueezeExcitation(16, 4, out_activation="relu", backend="cpu").double()
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    assert_compile_matches_eager(module, [x, torch.randn_like(x)], params=(module.fc1.weight,))


@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
def test_compile_has_no_graph_breaks(grad_mode):
    torch._dynamo.reset()
    module = se_kernels.SqueezeExcitation(8, 2, backend="auto")
    with torch.set_grad_enabled(grad_mode):
        explanation = torch._dynamo.explain(module)(torch.randn(2, 8, 3, 3))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def python_autograd_frames(fn) -> int:
    """How many Python frames of torch.library's autograd wrapper (the kernel that
    register_autograd puts on the op's Autograd key) run during fn()."""
    frames = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.endswith(
                os.path.join("_library", "autograd.py")):
            frames.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return len(frames)


def test_calls_autograd_will_not_record_skip_the_python_autograd_wrapper():
    """The wrapper's own no-grad path only redispatches below autograd, which the backend
    does directly: under no_grad (whatever the weights say) and with grad mode on but no
    tensor requiring grad. A call autograd records goes through it."""
    module = se_kernels.SqueezeExcitation(8, 2, backend="cpu")
    x = torch.randn(2, 8, 3, 3)
    expected = se_kernels.SqueezeExcitation(8, 2, backend="torch")
    expected.load_state_dict(module.state_dict())
    with torch.no_grad():
        assert python_autograd_frames(lambda: module(x)) == 0
        out = module(x)
        assert out.grad_fn is None and not out.requires_grad
        torch.testing.assert_close(out, expected(x))
    with torch.inference_mode():
        assert python_autograd_frames(lambda: module(x)) == 0
        torch.testing.assert_close(module(x), out)
    module.requires_grad_(False)
    assert python_autograd_frames(lambda: module(x)) == 0
    module.requires_grad_(True)
    assert python_autograd_frames(lambda: module(x)) > 0
    assert module(x).grad_fn is not None


@pytest.mark.parametrize("grad_of", ["x", "w1", "b2", "residual"])
def test_gradient_of_any_one_input_goes_through_autograd(grad_of):
    """Whether autograd records the call is decided over every tensor, so a gradient
    wanted for one input alone (a frozen backbone's SE weights, a residual branch) is
    computed, and matches the torch backend's."""
    t = make_inputs(Case(n=2, c=6, h=3, w=4, s=2, dtype=torch.float64, residual=True), "cpu")
    grads = []
    for backend in ("cpu", "torch"):
        inputs = {k: v.detach().clone().requires_grad_(k == grad_of) for k, v in t.items()}
        out = se_kernels.squeeze_excitation(
            inputs["x"], inputs["w1"], inputs["b1"], inputs["w2"], inputs["b2"],
            residual=inputs["residual"], out_activation="relu", backend=backend)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append(inputs[grad_of].grad)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_calls_below_autograd_still_reach_dispatch_modes():
    """Running below the autograd key keeps every key below it: FLOP counting and fake
    tensors see the op under no_grad as they do with gradients."""
    module = se_kernels.SqueezeExcitation(16, 4, backend="cpu")
    n, c, h, w, s = 2, 16, 5, 6, 4
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(torch.randn(n, c, h, w))
    elems = n * c * h * w
    assert counter.get_flop_counts()["Global"][torch.ops.se_kernels.se_forward] == \
        elems + 2 * 2 * n * c * s + elems
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
        out = module(torch.empty(n, c, h, w).to(memory_format=torch.channels_last))
    assert isinstance(out, FakeTensor) and out.shape == (n, c, h, w)
    assert out.is_contiguous(memory_format=torch.channels_last)


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
