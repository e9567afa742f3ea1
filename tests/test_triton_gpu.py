"""The Triton backend on a GPU: realistic and odd shapes against the fp64 reference, CUDA
graph capture and replay, bit-identical reruns, and offsets past 2**31."""

from __future__ import annotations

import pytest
import torch

import se_kernels

from helpers import Case, check_against_reference, make_inputs, needs_gpu
from triton_support import RESNET50_STAGES, cuda


def _make_divisible(v: float, divisor: int = 8) -> int:
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


GPU_CASES = (
    # ResNet-50 stages at N=32, reduction 16, with SE-ResNet's fused add + ReLU.
    [Case(n=32, c=c, h=hw, w=hw, s=c // 16, residual=True, out_activation="relu")
     for c, hw in RESNET50_STAGES]
    # MobileNetV3-Large: ReLU, hard-sigmoid gate, squeeze = make_divisible(C / 4).
    + [Case(n=32, c=c, h=hw, w=hw, s=_make_divisible(c / 4), gate="hardsigmoid")
       for c, hw in ((72, 28), (120, 28), (480, 14), (672, 7), (960, 7))]
    # EfficientNet-B0: SiLU, sigmoid gate, squeeze = block input channels / 4.
    + [Case(n=32, c=c, h=hw, w=hw, s=s, activation="silu")
       for c, hw, s in ((32, 112, 8), (144, 56, 6), (240, 28, 10), (672, 14, 28), (1152, 7, 48))]
)


@cuda
@needs_gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_realistic_shapes(driver, case, dtype, layout):
    check_against_reference(case.with_(dtype=dtype, layout=layout), "cuda", "triton")


@cuda
@needs_gpu
@pytest.mark.parametrize("case", [
    Case(n=1, c=3, h=224, w=224, s=1, pool="avgmax"),
    Case(n=5, c=37, h=1, w=1, s=9, pool="max"),
    Case(n=1, c=2048, h=7, w=7, s=128, dtype=torch.bfloat16, layout="channels_last"),
    Case(n=2, c=130, h=17, w=19, s=7, dtype=torch.float16, residual=True, out_activation="relu"),
    Case(n=0, c=64, h=7, w=7, s=4),
], ids=str)
def test_gpu_odd_shapes(driver, case):
    for layout in ("nchw", "channels_last", "strided"):
        check_against_reference(case.with_(layout=layout), "cuda", "triton")


def _train_step(t: dict, grad: torch.Tensor):
    for v in t.values():
        if v is not None:
            v.grad = None
    out = se_kernels.squeeze_excitation(t["x"], t["w1"], t["b1"], t["w2"], t["b2"],
                                        residual=t["residual"], out_activation="relu",
                                        backend="triton")
    out.backward(grad)
    return out


@cuda
@needs_gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gpu_cuda_graph_capture_and_replay(driver, layout):
    case = Case(n=4, c=256, h=14, w=14, s=16, dtype=torch.bfloat16, layout=layout,
                residual=True, out_activation="relu")
    t = {k: None if v is None else v.requires_grad_() for k, v in make_inputs(case, "cuda").items()}
    grad = torch.randn_like(t["x"])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up: compile kernels outside the capture
        for _ in range(2):
            _train_step(t, grad)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _train_step(t, grad)
    # New data in the captured buffers, then replay: it must match an eager run.
    fresh = make_inputs(case, "cuda", seed=7)
    with torch.no_grad():
        for k, v in fresh.items():
            if v is not None:
                t[k].copy_(v)
        grad.copy_(torch.randn_like(grad))
    graph.replay()
    torch.cuda.synchronize()
    names = ("x", "w1", "b1", "w2", "b2", "residual")
    replayed = [static_out.clone()] + [t[k].grad.clone() for k in names]
    eager_t = {k: v.detach().clone().requires_grad_() for k, v in t.items()}
    eager = [_train_step(eager_t, grad).detach()] + [eager_t[k].grad for k in names]
    for got, want in zip(replayed, eager):
        assert torch.equal(got, want)


@cuda
@needs_gpu
@pytest.mark.parametrize("case", [
    Case(n=1, c=256, h=56, w=56, s=16, dtype=torch.bfloat16, layout="channels_last",
         pool="avgmax"),  # H*W split into pieces
    Case(n=32, c=1024, h=14, w=14, s=64, dtype=torch.float32, residual=True,
         out_activation="relu"),
], ids=str)
def test_gpu_runs_are_bit_identical(driver, case):
    runs = []
    for _ in range(2):
        t = {k: None if v is None else v.requires_grad_()
             for k, v in make_inputs(case, "cuda").items()}
        out = se_kernels.squeeze_excitation(
            t["x"], t["w1"], t["b1"], t["w2"], t["b2"], pool=case.pool, residual=t["residual"],
            out_activation=case.out_activation, backend="triton")
        out.backward(torch.ones_like(out))
        runs.append([out] + [v.grad for v in t.values() if v is not None])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@cuda
@needs_gpu
@pytest.mark.slow
def test_gpu_int64_offsets(driver):
    """A tensor of more than 2**31 elements: offsets past 2**31 must not wrap. Each channel
    is a constant, so the exact output is known without an fp64 reference of 8+ GB."""
    n, c, h, w = 1, 3, 27000, 27000  # 2.19e9 elements, 4.4 GB in bf16
    values = torch.tensor([0.5, -1.0, 2.0], device="cuda")
    x = values.to(torch.bfloat16).view(1, c, 1, 1).expand(n, c, h, w).contiguous()
    x.requires_grad_()
    w1 = torch.randn(2, c, device="cuda", dtype=torch.bfloat16)
    w2 = torch.randn(c, 2, device="cuda", dtype=torch.bfloat16)
    out = se_kernels.squeeze_excitation(x, w1, None, w2, None, backend="triton")
    z = values.view(1, c)
    s = torch.sigmoid(torch.relu(z @ w1.float().t()) @ w2.float().t())  # [1, C]
    expected = (values * s[0]).to(torch.bfloat16)
    for ch in range(c):  # within a bf16 rounding: the fp32 sums of 7e8 values may round
        plane = out[0, ch].float()
        for row in (plane[-1, -8:], plane[h // 2, :8], plane[0, :8]):
            torch.testing.assert_close(row, expected[ch].float().expand(8), rtol=2**-7, atol=0)
    out.backward(torch.ones_like(out))
    assert torch.isfinite(x.grad[0, -1, -1, -8:].float()).all()
