"""Shared by the tests: SE cases, their inputs, running a backend with autograd, and the
comparison against the fp64 reference (the "torch" backend run in float64)."""

from __future__ import annotations

import itertools
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import se_kernels
from se_kernels.options import make_call

GRAD_NAMES = ("x", "w1", "b1", "w2", "b2", "residual")


def run_python(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """This Python on `args`, from a neutral directory: from the repository root, `python -c`
    or `-m` would import the source tree, which lacks the extension a non-editable install
    built, instead of the installed package."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=tempfile.gettempdir(), timeout=timeout)
LAYOUTS = ("nchw", "channels_last", "strided")


@dataclass(frozen=True)
class Case:
    n: int = 2
    c: int = 16
    h: int = 5
    w: int = 7
    s: int = 4
    dtype: torch.dtype = torch.float32
    layout: str = "nchw"
    activation: str = "relu"
    gate: str = "sigmoid"
    pool: str = "avg"
    residual: bool = False
    out_activation: str | None = None
    bias: bool = True

    def with_(self, **changes) -> "Case":
        return replace(self, **changes)

    def __str__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        res = "+res" if self.residual else ""
        out = f"+{self.out_activation}" if self.out_activation else ""
        bias = "" if self.bias else "-nobias"
        return (f"{self.n}x{self.c}x{self.h}x{self.w}/s{self.s}-{dtype}-{self.layout}-"
                f"{self.activation}-{self.gate}-{self.pool}{res}{out}{bias}")


# Every option combination (activation x gate x pool x epilogue).
EPILOGUES = ((False, None), (True, None), (True, "relu"), (False, "relu"))
OPTION_CASES = [
    Case(activation=a, gate=g, pool=p, residual=r, out_activation=o)
    for a, g, p, (r, o) in itertools.product(("relu", "silu"), ("sigmoid", "hardsigmoid"),
                                             ("avg", "max", "avgmax"), EPILOGUES)
]
# Odd shapes: C=1, C=3, H*W=1, C not divisible by the reduction, N=1, N=0, no biases,
# wide rows and tall channel counts (vector bodies and scalar tails of the kernels).
SHAPE_CASES = [
    Case(n=1, c=1, h=3, w=3, s=1),
    Case(n=2, c=3, h=4, w=5, s=1),
    Case(n=3, c=8, h=1, w=1, s=2),
    Case(n=2, c=37, h=6, w=6, s=9),
    Case(n=1, c=64, h=9, w=11, s=4, residual=True, out_activation="relu"),
    Case(n=0, c=8, h=4, w=4, s=2),
    Case(n=2, c=24, h=3, w=5, s=6, bias=False),
    Case(n=2, c=130, h=2, w=3, s=8, pool="avgmax"),
    Case(n=1, c=5, h=40, w=41, s=2, pool="max"),
]


def tolerance(dtype: torch.dtype) -> float:
    """Max error relative to the reference's largest magnitude, for fp32/fp64.
    fp64 allows 1e-7 because torch's own hardsigmoid backward uses a float 1/6."""
    return {torch.float32: 1e-4, torch.float64: 1e-7}[dtype]


def make_inputs(case: Case, device, seed: int = 0) -> dict[str, torch.Tensor | None]:
    """Fresh random SE inputs for `case` on `device`, x in the case's layout. Scaled so the
    hidden units and the gate logits span both sides of their nonlinearities' kinks."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale)

    x = randn(case.n, case.c, case.h, case.w)
    inputs = {
        "x": x,
        "w1": randn(case.s, case.c, scale=2.0 / case.c ** 0.5),
        "b1": randn(case.s, scale=0.5) if case.bias else None,
        "w2": randn(case.c, case.s, scale=2.0 / case.s ** 0.5),
        "b2": randn(case.c, scale=0.5) if case.bias else None,
        "residual": randn(*x.shape) if case.residual else None,
    }
    out = {}
    for name, t in inputs.items():
        if t is None:
            out[name] = None
            continue
        t = t.to(device=device, dtype=case.dtype)
        if name in ("x", "residual"):
            t = apply_layout(t, case.layout)
        out[name] = t
    return out


def apply_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a non-dense view: every other column of a wider tensor
        wide = torch.zeros(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def grad_output(case: Case, device, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(case.n, case.c, case.h, case.w, generator=gen, dtype=torch.float64)
    return g.to(device=device, dtype=case.dtype)


def run_se(case: Case, inputs: dict, grad: torch.Tensor, backend: str,
           dtype: torch.dtype | None = None) -> dict[str, torch.Tensor | None]:
    """Output and the gradients of every input tensor, through `backend`."""
    leaves = {}
    for name, t in inputs.items():
        if t is None:
            leaves[name] = None
            continue
        t = t.detach()  # a leaf that keeps the layout, strided views included
        leaves[name] = (t if dtype is None else t.to(dtype)).requires_grad_()
    out = se_kernels.squeeze_excitation(
        leaves["x"], leaves["w1"], leaves["b1"], leaves["w2"], leaves["b2"],
        activation=case.activation, gate=case.gate, pool=case.pool,
        residual=leaves["residual"], out_activation=case.out_activation, backend=backend)
    out.backward(grad.to(out.dtype))
    result = {"out": out.detach()}
    for name in GRAD_NAMES:
        result[name] = None if leaves[name] is None else leaves[name].grad
    return result


def eager_se(case: Case, inputs: dict, grad: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """What eager PyTorch computes in x's own dtype (torchvision's composition): the
    yardstick for fp16/bf16 error."""
    leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in inputs.items()}
    x = leaves["x"]
    if case.pool == "avg":
        z = F.adaptive_avg_pool2d(x, 1)
    elif case.pool == "max":
        z = x.amax(dim=(2, 3), keepdim=True)
    else:
        z = 0.5 * F.adaptive_avg_pool2d(x, 1) + 0.5 * x.amax(dim=(2, 3), keepdim=True)
    a = F.conv2d(z, leaves["w1"][:, :, None, None], leaves["b1"])
    h = F.relu(a) if case.activation == "relu" else F.silu(a)
    g = F.conv2d(h, leaves["w2"][:, :, None, None], leaves["b2"])
    s = torch.sigmoid(g) if case.gate == "sigmoid" else F.hardsigmoid(g)
    y = s * x
    if leaves["residual"] is not None:
        y = y + leaves["residual"]
    if case.out_activation == "relu":
        y = F.relu(y)
    y.backward(grad)
    return {"out": y.detach(), **{n: None if leaves[n] is None else leaves[n].grad for n in GRAD_NAMES}}


def check_against_reference(case: Case, device, backend: str, seed: int = 0) -> None:
    """Output and every gradient of `backend` vs the fp64 reference. fp32/fp64 use a
    relative tolerance; fp16/bf16 must be within 2x eager PyTorch's own error in that
    dtype (plus one unit in the last place of the largest value)."""
    inputs = make_inputs(case, device, seed)
    grad = grad_output(case, device, seed + 1)
    got = run_se(case, inputs, grad, backend)
    ref = run_se(case, inputs, grad.double(), "torch", dtype=torch.float64)
    eager = eager_se(case, inputs, grad) if case.dtype in (torch.float16, torch.bfloat16) else None

    x = inputs["x"]
    assert got["out"].dtype == case.dtype and got["out"].shape == x.shape
    if case.layout == "channels_last" and case.c > 1 and case.h * case.w > 1 and case.n > 0:
        assert got["out"].is_contiguous(memory_format=torch.channels_last), "layout not kept"
    for name in ("out", *GRAD_NAMES):
        expected = ref[name]
        if expected is None:
            assert got[name] is None, f"{name}: unexpected gradient"
            continue
        actual = got[name]
        assert actual is not None, f"{name}: gradient missing"
        assert actual.shape == expected.shape and actual.dtype == case.dtype, \
            f"{name}: got {actual.dtype}{list(actual.shape)}"
        err = (actual.double() - expected).abs().max().item() if actual.numel() else 0.0
        scale = expected.abs().max().item() if expected.numel() else 0.0
        if eager is None:
            bound = tolerance(case.dtype) * scale + (1e-6 if case.dtype == torch.float32 else 1e-12)
        else:
            eager_err = (eager[name].double() - expected).abs().max().item() if expected.numel() else 0.0
            bound = 2 * eager_err + torch.finfo(case.dtype).eps * scale
        assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} (scale {scale:.3g}) for {case}"
        assert torch.isfinite(actual).all(), f"{name}: non-finite values"


def backend_device(backend: str) -> str:
    """Where a backend's tests run: the GPU where there is one; the CPU otherwise (Triton
    through its interpreter)."""
    if backend == "cuda":
        return "cuda"
    if backend == "triton":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def require_backend(backend: str, device) -> None:
    """Skip, with the backend's own reasons, where it cannot run on this machine: the cuda
    backend without a GPU, Triton without the triton package. The cpu backend never skips:
    a missing extension fails its tests."""
    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip("cuda backend: no CUDA GPU on this machine")
    probe = make_inputs(Case(n=1, c=4, h=2, w=2, s=1), device)
    call = make_call(probe["x"], probe["w1"], probe["b1"], probe["w2"], probe["b2"])
    reasons = se_kernels.explain(call).get(backend)
    if reasons is None:
        pytest.fail(f"backend {backend!r} is not registered")
    if reasons and backend == "triton" and any("triton" in r and "install" in r for r in reasons):
        pytest.skip(f"triton backend: {'; '.join(reasons)}")
    assert not reasons, f"backend {backend!r} refuses a plain call on {device}: {reasons}"


def randomize_norms(model: torch.nn.Module, seed: int) -> None:
    """Random BN affine parameters and running statistics. timm zero-initialises the last BN
    of each residual branch, which would feed the SE modules zeros and make the comparison
    vacuous; random statistics also make eval mode differ from an identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


class SEOpCalls(TorchDispatchMode):
    """Counts the se_kernels ops run under it."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.namespace == "se_kernels"
        return func(*args, **(kwargs or {}))


def fused_forward(model: torch.nn.Module, args: tuple, expected_calls: int) -> torch.Tensor:
    """model(*args) without autograd, checked to run the fused op `expected_calls` times:
    the kernels' output, for exported or compiled models to be compared with."""
    with torch.no_grad(), SEOpCalls() as counter:
        out = model(*args)
    assert counter.calls == expected_calls
    return out


def image(n: int = 2, size: int = 64, seed: int = 2) -> torch.Tensor:
    """A random batch of RGB images."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
