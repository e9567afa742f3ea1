"""Shared by the tests: SE cases, their inputs, which backends run where, running a backend
with autograd, and the comparison against the float64 oracle of tests/oracle.py. The checks
of the ops as ops (opcheck, gradcheck, torch.compile) and their argument tuples are in
tests/op_checks.py."""

from __future__ import annotations

import copy
import itertools
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

import se_kernels
from se_kernels import _fc_ops, _tail_ops
from se_kernels.call import make_call
from se_kernels.options import ACTIVATIONS, GATES, NONE, OUT_ACTIVATIONS, POOLS
from oracle import GRAD_NAMES, OracleResult, decision_variants, se_oracle


def run_python(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """This Python on `args`, from a neutral directory: from the repository root, `python -c`
    or `-m` would import the source tree, which lacks the extension a non-editable install
    built, instead of the installed package."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=tempfile.gettempdir(), timeout=timeout)


LAYOUTS = ("nchw", "channels_last", "strided")
# What Case.out_activation takes for each of the op's out_activations (None for "none").
CASE_OUT_ACTIVATIONS = tuple(None if name == NONE else name for name in OUT_ACTIVATIONS)


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


def covering_cases(*factors: tuple) -> list[tuple]:
    """Combinations of the factors' values in which every pair of values of any two factors
    occurs (a pairwise covering array), picked greedily and deterministically: each option's
    math is its own switch, so pairs find the interactions that a full product would, in a
    grid that grows with the largest two factors rather than with their product."""
    def pairs(combo):
        return {(i, combo[i], j, combo[j]) for i, j in itertools.combinations(range(len(combo)), 2)}

    candidates = list(itertools.product(*factors))
    uncovered = set().union(*map(pairs, candidates))
    chosen = []
    while uncovered:
        best = max(candidates, key=lambda combo: len(pairs(combo) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return chosen


# Every pair of option values (activation, gate, pool, epilogue) in some case.
EPILOGUES = ((False, None), (True, None), (True, "relu"), (False, "relu"))
OPTION_CASES = [
    Case(activation=a, gate=g, pool=p, residual=r, out_activation=o)
    for a, g, p, (r, o) in covering_cases(ACTIVATIONS, GATES, POOLS, EPILOGUES)
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


def cuda_launches(case: Case, sm_count: int, l2_bytes: int, backward: bool) -> list:
    """The launches the cuda backend's plan (`se-kernels plan`, from the kernels' own
    planning code) lists for `case` on a device with these SMs and L2."""
    from se_kernels import plan

    device = plan.GpuProfile("device", sm_count, l2_bytes, bandwidth=1.0, launch_us=0.0)
    call = plan.PlanCall(case.n, case.c, case.h, case.w, case.s, case.dtype,
                         case.layout == "channels_last", case.residual,
                         case.out_activation == "relu", case.pool)
    return plan.trace("cuda", call, device, backward)


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


def se_call(case: Case, t: dict, backend: str) -> torch.Tensor:
    """The public op on tensors named as make_inputs names them (an absent bias or residual
    may be None or left out), with `case`'s options, through `backend`."""
    return se_kernels.squeeze_excitation(
        t["x"], t["w1"], t.get("b1"), t["w2"], t.get("b2"), activation=case.activation,
        gate=case.gate, pool=case.pool, residual=t.get("residual"),
        out_activation=case.out_activation, backend=backend)


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
    out = se_call(case, leaves, backend)
    out.backward(grad.to(out.dtype))
    result = {"out": out.detach()}
    for name in GRAD_NAMES:
        result[name] = None if leaves[name] is None else leaves[name].grad
    return result


def check_against_reference(case: Case, device, backend: str, seed: int = 0) -> dict:
    """Output and every gradient of `backend`, run with autograd on fresh random inputs, vs
    the oracle (tests/oracle.py). Returns what the backend computed."""
    return check_inputs(case, make_inputs(case, device, seed), grad_output(case, device, seed + 1),
                        backend, device)


def check_inputs(case: Case, inputs: dict, grad: torch.Tensor, backend: str, device) -> dict:
    """check_against_reference on inputs made by the caller (on `device`)."""
    got = run_se(case, inputs, grad, backend)
    x = inputs["x"]
    assert got["out"].dtype == case.dtype and got["out"].shape == x.shape
    if case.layout == "channels_last" and case.c > 1 and case.h * case.w > 1 and case.n > 0:
        assert got["out"].is_contiguous(memory_format=torch.channels_last), "layout not kept"
    compare_with_oracle(case, inputs, grad, got, truncates=interpreter_truncates(backend, device))
    return got


def assert_all_differ(results: list[dict]) -> None:
    """Every output and gradient differs between any two of `results` (runs on different
    inputs): a backend that ignored its inputs, or a comparison against a constant, fails."""
    for i, first in enumerate(results):
        for other in results[i + 1:]:
            for name, value in first.items():
                if value is not None:
                    assert not torch.equal(value, other[name]), f"{name}: same result for different inputs"


def interpreter_truncates(backend: str, device) -> bool:
    """Triton's interpreter converts fp32 to bf16 by truncation (a GPU rounds to nearest):
    its bf16 results may be one unit in the last place off instead of half."""
    return backend == "triton" and torch.device(device).type == "cpu"


def compare_with_oracle(case: Case, inputs: dict, grad: torch.Tensor, got: dict,
                        truncates: bool = False) -> OracleResult:
    """`got` (out and the gradients of x, w1, b1, w2, b2, residual) vs the float64 oracle
    from the same rounded inputs, element by element, within the oracle's error bound: the
    accumulation dtype's rounding propagated through the block plus one rounding to the
    case's dtype (for bf16 about 0.4% of each value; see tests/oracle.py for the analysis).

    Where the reference's y is within rounding of 0, either output-ReLU decision is correct
    (the oracle's bounds cover both); the kernel's flips must lie there, and, as a sanity
    bound, number at most 2 + 1% of the elements. Hidden-ReLU and hardsigmoid decisions
    within rounding of their kinks are tried both ways."""
    truncates = truncates and case.dtype == torch.bfloat16
    first = se_oracle(case, inputs, grad, out_dtype=case.dtype, truncates=truncates)
    out = got["out"]
    if case.out_activation == "relu" and out is not None and out.shape == first.values["out"].shape:
        # The reference's decision is the sign of its output rounded to the dtype: a y > 0
        # below half the smallest subnormal (3e-8 in fp16, where a gate near 0 puts whole
        # channels) rounds to 0, and out = 0 there is the exact answer, not a flip.
        flips = (out.detach().cpu() > 0) != (first.values["out"].to(case.dtype) > 0)
        outside = flips & ~first.relu_uncertain
        assert not outside.any(), (f"out: {int(outside.sum())} output-ReLU decisions differ from "
                                   f"the reference beyond rounding for {case}")
        limit = 2 + flips.numel() // 100
        assert int(flips.sum()) <= limit, (f"out: {int(flips.sum())} output-ReLU decisions flipped "
                                           f"within rounding (at most {limit} expected) for {case}")
    failures = []
    for decisions in decision_variants(first):
        result = first if decisions is None else se_oracle(
            case, inputs, grad, out_dtype=case.dtype, decisions=decisions, truncates=truncates)
        failure = oracle_mismatch(case, result, got)
        if failure is None:
            return result
        failures.append(failure)
    raise AssertionError(failures[0])


def oracle_mismatch(case: Case, result: OracleResult, got: dict) -> str | None:
    """Why `got` is outside the oracle's bounds (the worst element of the first tensor that
    is), or None."""
    for name in ("out", *GRAD_NAMES):
        expected, bound = result.values[name], result.bounds[name]
        actual = got[name]
        if expected is None:
            if actual is not None:
                return f"{name}: unexpected gradient for {case}"
            continue
        if actual is None:
            return f"{name}: gradient missing for {case}"
        if actual.shape != expected.shape or actual.dtype != case.dtype:
            return f"{name}: got {actual.dtype}{list(actual.shape)}, expected {case.dtype}{list(expected.shape)}"
        if not actual.numel():
            continue
        actual = actual.detach().to("cpu", torch.float64)
        if not torch.isfinite(actual).all():
            return f"{name}: non-finite values for {case}"
        err = (actual - expected).abs()
        bad = err > bound
        if bad.any():
            ratio = torch.where(bad, err / bound.clamp_min(1e-300), 0.0)
            i = int(ratio.flatten().argmax())
            scale = expected.abs().max().item()
            return (f"{name}: {int(bad.sum())} of {err.numel()} elements outside the bound; worst "
                    f"at flat index {i}: got {actual.flatten()[i].item():.6g}, expected "
                    f"{expected.flatten()[i].item():.6g} +- {bound.flatten()[i].item():.3g} "
                    f"(max |error| {err.max().item():.3g}, max |expected| {scale:.3g}) for {case}")
    return None


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


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
BACKENDS = ["cpu", "torch", "triton", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=BACKENDS)
def backend(request) -> tuple[str, str]:
    """Each backend, as (name, the device its tests run on), where it can run here (a
    module uses it by importing it)."""
    device = backend_device(request.param)
    require_backend(request.param, device)
    return request.param, device


def randomize_norms(model: torch.nn.Module, seed: int) -> None:
    """Random BN affine parameters and running statistics. timm zero-initialises the last BN
    of each residual branch, which would feed the SE modules zeros and make the comparison
    vacuous; random statistics also make eval mode differ from an identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                weight = torch.rand(c, generator=gen) + 0.5
                bias = torch.randn(c, generator=gen) * 0.2
                mean = torch.randn(c, generator=gen) * 0.2
                var = torch.rand(c, generator=gen) + 0.5
                for t, value in ((m.weight, weight), (m.bias, bias), (m.running_mean, mean),
                                 (m.running_var, var)):
                    if t is not None:  # no affine, or no running statistics
                        t.copy_(value)


VECTOR_OPS = (*_tail_ops.SCHEMAS, *_fc_ops.SCHEMAS)


class SEOpCalls(TorchDispatchMode):
    """Counts the se_kernels ops over x run under it: the fused ops and the passes, not the
    vector work between the passes (the block tail's per-channel algebra,
    se_kernels._tail_ops, and the MLPs' layer products, se_kernels._fc_ops)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.namespace == "se_kernels" and func._opname not in VECTOR_OPS
        return func(*args, **(kwargs or {}))


def fused_forward(model: torch.nn.Module, args: tuple, expected_calls: int) -> torch.Tensor:
    """model(*args) without autograd, checked to run the fused op `expected_calls` times:
    the kernels' output, for exported or compiled models to be compared with."""
    with torch.no_grad(), SEOpCalls() as counter:
        out = model(*args)
    assert counter.calls == expected_calls
    return out


def sgd_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
               lr: float) -> list[float]:
    """Train `model` for `steps` SGD steps (momentum 0.9) on the cross-entropy of (x, y); the
    loss before each step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def image(n: int = 2, size: int = 64, seed: int = 2) -> torch.Tensor:
    """A random batch of RGB images."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- 2 CPU processes in one gloo process group ------------------------------------------

GLOO_WORLD_SIZE = 2

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")


def _gloo_process(rank: int, fn, rendezvous: str, results: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=GLOO_WORLD_SIZE)
    try:
        torch.save(fn(rank, *args), f"{results}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_on_gloo(fn, directory, *args) -> list:
    """fn(rank, *args) in each of GLOO_WORLD_SIZE spawned CPU processes of one gloo process
    group, on one thread each; what each returned (tensors, numbers, strings and containers
    of them), by rank. fn must be importable by name: a module-level function."""
    directory = Path(directory)
    # A file rendezvous instead of a TCP port: no port to find free, nothing to race for.
    mp.spawn(_gloo_process, args=(fn, str(directory / "rendezvous"), str(directory), args),
             nprocs=GLOO_WORLD_SIZE, join=True)
    return [torch.load(directory / f"rank{rank}.pt") for rank in range(GLOO_WORLD_SIZE)]


def assert_compiled_matches_eager(module: torch.nn.Module, x: torch.Tensor, observed) -> None:
    """torch.compile(fullgraph=True) of a copy of `module` gives eager's output, x's gradient
    and `observed(module)` (a parameter's gradient, a running statistic) after one forward
    and backward of the sum, to 1e-12 in float64."""
    compiled = torch.compile(copy.deepcopy(module), fullgraph=True)
    results = []
    for m in (module, compiled):
        xs = x.clone().requires_grad_()
        out = m(xs)
        out.sum().backward()
        results.append((out.detach(), xs.grad, observed(m)))
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def forward_backward(model, x, seed):
    """(outputs, state) of a forward and backward of `model` on a copy of x with a fixed
    gradient: out, x's gradient and every parameter's; then the state_dict. `seed` fixes
    the model's own draws (drop path, stochastic depth, dropout)."""
    torch.manual_seed(seed)
    x = x.detach().clone().requires_grad_()
    out = model(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype))
    return ({"out": out.detach(), "x": x.grad} | {n: p.grad for n, p in model.named_parameters()},
            {k: v.clone() for k, v in model.state_dict().items()})
