"""The Triton backend's ops: opcheck, torch.compile (interpreted and, on a GPU, inductor),
FLOP counts, argument checks, schemas, and launches on the inputs' device."""

from __future__ import annotations

import pytest
import torch

import se_kernels
from se_kernels.backends.triton import heuristics
from se_kernels.backends.triton import ops as triton_ops

from helpers import Case, check_against_reference, make_inputs, needs_gpu, needs_two_gpus
from op_checks import (assert_compile_matches_eager, backward_args, forward_args, opcheck_backward,
                       opcheck_forward)
from triton_support import DEVICE, cuda


OPCHECK_CASES = [
    Case(n=2, c=6, h=3, w=4, s=2, residual=True, out_activation="relu", pool="avgmax"),
    Case(n=2, c=6, h=3, w=4, s=2, layout="channels_last", activation="silu",
         gate="hardsigmoid", pool="max", bias=False),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck_forward(driver, case):
    opcheck_forward(triton_ops.se_forward, case, DEVICE, requires_grad=False)


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck_backward(driver, case):
    opcheck_backward(triton_ops.se_forward, triton_ops.se_backward, case, DEVICE)


def _compile_matches_eager(device, compile_backend):
    case = Case(n=2, c=8, h=3, w=5, s=3, residual=True, out_activation="relu", pool="avgmax",
                layout="channels_last")
    t = make_inputs(case, device)

    def fn(x, w1, b1, w2, b2, r):
        y = se_kernels.squeeze_excitation(x, w1, b1, w2, b2, pool="avgmax", residual=r,
                                          out_activation="relu", backend="triton")
        return (y * 2).sum()  # ops around the SE op stay in the same graph

    assert_compile_matches_eager(fn, list(t.values()), backend=compile_backend, loss=torch.sum)


def test_compile_fullgraph_interpreter(driver):
    """On CPU tensors (the interpreter) inductor cannot generate Triton code and the kernels
    cannot be traced, so the op stays one opaque node; aot_eager still traces the whole
    function, autograd included, without a graph break."""
    if DEVICE != "cpu":
        pytest.skip("the interpreter path is for machines without a GPU")
    assert driver.INTERPRETED
    _compile_matches_eager("cpu", "aot_eager")


@cuda
@needs_gpu
def test_compile_fullgraph_inductor(driver):
    _compile_matches_eager("cuda", "inductor")


@cuda
@needs_gpu
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck_cuda(driver, case):
    opcheck_forward(triton_ops.se_forward, case, "cuda", requires_grad=False)
    opcheck_backward(triton_ops.se_forward, triton_ops.se_backward, case, "cuda")


def test_flop_counter_sees_both_ops(driver):
    from torch.utils.flop_counter import FlopCounterMode

    case = Case(n=2, c=8, h=3, w=3, s=2)
    t = {k: None if v is None else v.requires_grad_() for k, v in make_inputs(case, DEVICE).items()}
    with FlopCounterMode(display=False) as counter:
        se_kernels.squeeze_excitation(t["x"], t["w1"], t["b1"], t["w2"], t["b2"],
                                      backend="triton").sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    elems = 2 * 8 * 3 * 3
    assert counts["se_kernels.se_forward_triton"] == elems + 2 * 2 * 2 * 8 * 2 + elems
    assert counts["se_kernels.se_backward_triton"] == 4 * elems + 8 * 2 * 8 * 2


def test_op_rejects_bad_arguments(driver):
    args = list(forward_args(Case(n=1, c=4, h=2, w=2, s=2), DEVICE))
    with pytest.raises(ValueError, match="pool must be one of"):
        triton_ops.se_forward(*args[:8], "median", args[9])
    bad = list(args)
    bad[3] = bad[3][:, :1]  # w2 [C, 1] while w1 is [2, C]
    with pytest.raises(ValueError, match="w2 must have shape"):
        triton_ops.se_forward(*bad)
    bad = list(args)
    bad[5] = args[0][:, :2]
    with pytest.raises(ValueError, match="residual must have shape"):
        triton_ops.se_forward(*bad)


def test_schemas_match_the_native_ops(driver):
    """torch 2.11's triton_op infers the schema from the bodies' annotations (it ignores
    schema=): they must spell the same argument and return types as the native ops'."""
    def types(schema):
        return ([(a.name, str(a.type)) for a in schema.arguments],
                [str(r.type) for r in schema.returns])

    for triton_op, native in ((triton_ops.se_forward, torch.ops.se_kernels.se_forward.default),
                              (triton_ops.se_backward, torch.ops.se_kernels.se_backward.default)):
        assert types(triton_op._schema) == types(native._schema)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_launches_on_the_inputs_device(driver, monkeypatch, direction):
    """Triton launches on the current CUDA device: every launch must happen with x's device
    current, restored afterwards. Checked without a GPU by tracing cuda:1 tensors with fake
    tensors and recording the device that torch.cuda.device makes current at each launch."""
    from torch._subclasses import fake_tensor

    current = [0]
    launched_on = []

    class RecordingDevice:
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            self.previous, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.previous

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # Fake cuda tensors would then initialize the absent driver (torch 2.11).
    monkeypatch.setattr(fake_tensor, "init_gpu_context", lambda device: None)
    monkeypatch.setattr(torch.cuda, "device", RecordingDevice)
    monkeypatch.setattr(driver, "device_profile", lambda device: heuristics.INTERPRETER_PROFILE)
    monkeypatch.setattr(driver, "_launch",
                        lambda kernel, programs, *args, **meta: launched_on.append(current[0]))
    case = Case(n=2, c=6, h=3, w=4, s=2, residual=True, out_activation="relu", pool="avgmax")
    with fake_tensor.FakeTensorMode():
        args = forward_args(case, "cuda:1")
        outs = triton_ops.se_forward_triton(*args)
        if direction == "backward":
            launched_on.clear()
            triton_ops.se_backward_triton(*backward_args(args, outs, torch.empty_like(outs[0])))
    assert launched_on and set(launched_on) == {1}, launched_on
    assert current[0] == 0


@cuda
@needs_two_gpus
def test_gpu_runs_on_the_inputs_device(driver):
    case = Case(n=3, c=24, h=7, w=7, s=6, residual=True, out_activation="relu", pool="avgmax")
    with torch.cuda.device(0):
        check_against_reference(case, "cuda:1", "triton")
        assert torch.cuda.current_device() == 0
