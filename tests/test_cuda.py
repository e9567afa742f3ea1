"""The "cuda" backend beyond the generic backend tests (tests/test_backends.py already runs
it on every option, dtype, layout and odd shape against the fp64 reference).

Without a GPU: the extension was built with its CUDA kernels when the build says so, and the
backend refuses CPU tensors with a clear reason. With a GPU (`cuda` marker): real network
shapes, the grouped and split schedules, misaligned inputs (scalar path), int64 indexing past
2^31 elements, CUDA-graph capture and replay, bitwise determinism, a non-default stream,
device guards, and compute-sanitizer over a small workload.

Run as a script, this file runs that small workload (what the sanitizer test runs):
    compute-sanitizer --tool memcheck python tests/test_cuda.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import se_kernels
from se_kernels import _ops
from se_kernels.backends import native
from se_kernels.call import make_call

sys.path.insert(0, str(Path(__file__).parent))
from helpers import (Case, check_against_reference, compare_with_oracle,  # noqa: E402
                     cuda_launches, grad_output, make_inputs, needs_gpu, needs_two_gpus, run_se)
from op_checks import (assert_compile_matches_eager, backward_args, forward_args,  # noqa: E402
                       gradcheck_backend, opcheck_backward, opcheck_forward)

GROUP_ENV = "SE_KERNELS_CUDA_GROUP_BYTES"
SCHEDULE_ENV = "SE_KERNELS_CUDA_SCHEDULE"


# ---- no GPU needed ----------------------------------------------------------------------

def test_extension_has_cuda_kernels_when_built_with_them():
    if not native.BUILD["cuda"]:
        pytest.skip(f"se_kernels._C was built without CUDA kernels (build info: {native.BUILD})")
    assert native.EXTENSION_ERROR is None, native.EXTENSION_ERROR
    assert native.has_kernel("cuda"), "built with CUDA but no CUDA kernel is registered"
    archs = native.BUILD["cuda_archs"]
    assert archs and all(a.split("_")[0] in ("sm", "compute") for a in archs), archs


def test_cuda_backend_refuses_cpu_tensors():
    x = torch.randn(2, 8, 3, 3)
    call = make_call(x, torch.randn(2, 8), None, torch.randn(8, 2), None)
    reasons = se_kernels.explain(call)["cuda"]
    assert "x is on cpu; this backend runs cuda tensors" in reasons
    with pytest.raises(se_kernels.BackendUnavailableError, match="x is on cpu"):
        se_kernels.squeeze_excitation(x, call.w1, None, call.w2, None, backend="cuda")


# ---- GPU --------------------------------------------------------------------------------

# (name, C, S, H, W, activation, gate, residual + ReLU epilogue)
NETWORK_SHAPES = [
    # SE-ResNet-50: squeeze C // 16, SE before the residual add and ReLU (fused epilogue)
    ("resnet50-stage1", 256, 16, 56, 56, "relu", "sigmoid", True),
    ("resnet50-stage2", 512, 32, 28, 28, "relu", "sigmoid", True),
    ("resnet50-stage3", 1024, 64, 14, 14, "relu", "sigmoid", True),
    ("resnet50-stage4", 2048, 128, 7, 7, "relu", "sigmoid", True),
    # MobileNetV3-Large: hardsigmoid gate, squeeze to make_divisible(C / 4, 8)
    ("mobilenetv3-72", 72, 24, 28, 28, "relu", "hardsigmoid", False),
    ("mobilenetv3-480", 480, 120, 14, 14, "relu", "hardsigmoid", False),
    ("mobilenetv3-960", 960, 240, 7, 7, "relu", "hardsigmoid", False),
    # EfficientNet-B0: SiLU, squeeze to in_channels // 4 of the block (odd sizes)
    ("efficientnet-b0-32", 32, 8, 112, 112, "silu", "sigmoid", False),
    ("efficientnet-b0-144", 144, 6, 56, 56, "silu", "sigmoid", False),
    ("efficientnet-b0-240", 240, 10, 28, 28, "silu", "sigmoid", False),
    ("efficientnet-b0-672", 672, 28, 14, 14, "silu", "sigmoid", False),
    ("efficientnet-b0-1152", 1152, 48, 7, 7, "silu", "sigmoid", False),
]


def network_case(shape, n: int, dtype: torch.dtype, layout: str) -> Case:
    _, c, s, h, w, activation, gate, fused = shape
    return Case(n=n, c=c, h=h, w=w, s=s, dtype=dtype, layout=layout, activation=activation,
                gate=gate, residual=fused, out_activation="relu" if fused else None)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 32])
@pytest.mark.parametrize("shape", NETWORK_SHAPES, ids=lambda s: s[0])
def test_network_shapes(shape, n, dtype, layout):
    check_against_reference(network_case(shape, n, dtype, layout), "cuda", "cuda")


def compare_to_reference(case: Case, inputs: dict, grad: torch.Tensor) -> None:
    """Like helpers.check_against_reference, for inputs made by the caller."""
    compare_with_oracle(case, inputs, grad, run_se(case, inputs, grad, "cuda"))


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_misaligned_inputs_take_the_scalar_path(layout, dtype):
    """Dense tensors that start 1 element past a 16-byte boundary: no vector accesses."""
    case = Case(n=3, c=16, h=8, w=8, s=4, dtype=dtype, layout=layout, residual=True,
                out_activation="relu", pool="avgmax")
    inputs = make_inputs(case, "cuda")
    for name in ("x", "residual"):
        t = inputs[name]
        flat = torch.empty(t.numel() + 1, dtype=dtype, device="cuda")
        if layout == "nchw":
            view = flat[1:].view(t.shape)
        else:
            n, c, h, w = t.shape
            view = flat[1:].view(n, h, w, c).permute(0, 3, 1, 2)
        view.copy_(t)
        assert view.data_ptr() % 16 != 0 and view.is_contiguous(
            memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
        inputs[name] = view
    compare_to_reference(case, inputs, grad_output(case, "cuda"))


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("schedule", ["pipelined", "grouped"])
@pytest.mark.parametrize("group_bytes", ["1", "20000", "60000"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_sample_groups(monkeypatch, group_bytes, layout, schedule):
    """Small L2 budgets split the batch of 7 into groups (one sample each, or a few with a
    short last one), exercising every kernel's per-group offsets on both schedules; the
    pipelined one runs with each lag (0, 1, 2: csrc/cuda/se_plan.h), its CTAs waiting on
    each other's counters."""
    monkeypatch.setenv(GROUP_ENV, group_bytes)
    monkeypatch.setenv(SCHEDULE_ENV, schedule)
    for pool in ("avg", "max"):
        case = Case(n=7, c=24, h=5, w=5, s=6, layout=layout, pool=pool, residual=True,
                    out_activation="relu")
        check_against_reference(case, "cuda", "cuda")


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_split_rows_for_small_batches(layout):
    """N=1 with long rows splits each row into pieces combined by a second kernel."""
    for dtype in (torch.float32, torch.bfloat16):
        for pool in ("avg", "avgmax"):
            case = Case(n=1, c=8, h=96, w=97, s=2, dtype=dtype, layout=layout, pool=pool)
            check_against_reference(case, "cuda", "cuda")


def run_ops(args: tuple, grad: torch.Tensor) -> tuple:
    """Every tensor se_forward(*args) returns, then every one se_backward returns for them."""
    outputs = _ops.se_forward(*args)
    return (*outputs, *_ops.se_backward(*backward_args(args, outputs, grad)))


def planned_kernels(case: Case, backward: bool) -> int:
    """Launches the plan lists for `case` on the current GPU."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return len(cuda_launches(case, props.multi_processor_count, props.L2_cache_size, backward))


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("schedule", ["pipelined", "grouped"])
@pytest.mark.parametrize("case", [
    Case(n=32, c=256, h=56, w=56, s=16, dtype=torch.bfloat16, layout="channels_last",
         residual=True, out_activation="relu"),
    Case(n=8, c=960, h=7, w=7, s=240, dtype=torch.float16, layout="nchw", pool="avgmax"),
], ids=str)
def test_kernels_launched_match_the_plan(monkeypatch, case, schedule):
    """The profiler counts as many kernels per op as the plan (`se-kernels plan`) lists."""
    monkeypatch.setenv(SCHEDULE_ENV, schedule)
    args = forward_args(case, "cuda")
    grad = grad_output(case, "cuda")
    saved = run_ops(args, grad)[:5]  # a warm-up, and the forward's saved tensors
    forward = kernels_in(lambda: _ops.se_forward(*args))
    backward = kernels_in(lambda: _ops.se_backward(*backward_args(args, saved, grad)))
    assert (forward, backward) == (planned_kernels(case, False), planned_kernels(case, True))
    if schedule == "pipelined":
        assert forward == 2 and backward <= 4


def kernels_in(fn) -> int:
    """GPU kernels fn launches, per the profiler."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memset" not in e.name.lower() and "memcpy" not in e.name.lower())


DETERMINISM_CASES = [
    Case(n=1, c=64, h=56, w=56, s=4, dtype=torch.bfloat16, layout="channels_last"),
    Case(n=1, c=64, h=56, w=56, s=4, dtype=torch.float16, layout="nchw", pool="avgmax"),
    Case(n=64, c=256, h=14, w=14, s=16, dtype=torch.float32, layout="nchw", residual=True,
         out_activation="relu", activation="silu"),
    Case(n=48, c=130, h=9, w=9, s=12, dtype=torch.bfloat16, layout="channels_last", pool="max",
         gate="hardsigmoid"),
]


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("group_bytes", ["", "200000"])
@pytest.mark.parametrize("case", DETERMINISM_CASES, ids=str)
def test_bitwise_deterministic(monkeypatch, case, group_bytes):
    """Repeated runs give the same bits; with small groups the pipelined kernel's CTAs take
    the stages of many groups in whatever order the GPU runs them."""
    monkeypatch.setenv(GROUP_ENV, group_bytes)
    args = forward_args(case, "cuda")
    grad = grad_output(case, "cuda")
    first = run_ops(args, grad)
    for _ in range(3):
        again = run_ops(args, grad)
        for i, (a, b) in enumerate(zip(first, again)):
            assert torch.equal(a, b), f"output {i} differs between runs for {case}"


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("case", [DETERMINISM_CASES[0], DETERMINISM_CASES[3],
                                  Case(n=5, c=40, h=6, w=6, s=5, residual=True,
                                       out_activation="relu", pool="avgmax")], ids=str)
def test_cuda_graph_capture_and_replay(case):
    """Both ops captured into one graph, replayed on new inputs copied into the captured
    tensors: the results equal eager runs on those inputs, bit for bit."""
    static = forward_args(case, "cuda", seed=0)
    static_grad = grad_output(case, "cuda", seed=1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture, as torch recommends
        run_ops(static, static_grad)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run_ops(static, static_grad)

    for seed in (10, 20):
        fresh = forward_args(case, "cuda", seed=seed)
        fresh_grad = grad_output(case, "cuda", seed=seed + 1)
        for captured_input, t in zip(static, fresh):
            if isinstance(t, torch.Tensor):
                captured_input.copy_(t)
        static_grad.copy_(fresh_grad)
        graph.replay()
        expected = run_ops(fresh, fresh_grad)
        torch.cuda.synchronize()
        for i, (got, want) in enumerate(zip(captured, expected)):
            assert torch.equal(got, want), f"output {i} of the replay differs (seed {seed})"


@pytest.mark.cuda
@needs_gpu
def test_runs_on_the_current_stream():
    """Work queued on a side stream before the op (a long sleep, then writing x) must
    finish before the op reads x: true only if the op launches on that stream."""
    case = Case(n=4, c=32, h=16, w=16, s=8, residual=True, out_activation="relu")
    args = forward_args(case, "cuda")
    new_x = torch.randn_like(args[0])
    grad = grad_output(case, "cuda")
    expected = run_ops((new_x, *args[1:]), grad)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time
        args[0].copy_(new_x)
        got = run_ops(args, grad)
    side.synchronize()
    for i, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), f"output {i}: the op did not run on the current stream"


@pytest.mark.cuda
@needs_two_gpus
def test_runs_on_the_inputs_device():
    case = Case(n=2, c=16, h=7, w=7, s=4)
    with torch.cuda.device(0):
        check_against_reference(case, "cuda:1", "cuda")


@pytest.mark.cuda
@needs_gpu
def test_weights_on_another_device_are_rejected():
    x = torch.randn(2, 8, 4, 4, device="cuda")
    with pytest.raises(RuntimeError, match="w1 must be on cuda:0 like x"):
        torch.ops.se_kernels.se_forward(x, torch.randn(2, 8), None, torch.randn(8, 2, device="cuda"),
                                        None, None, "relu", "sigmoid", "avg", "none")


@pytest.mark.cuda
@pytest.mark.slow
@needs_gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_more_than_2_31_elements(layout):
    """A bf16 input of 2^31 + 282688 elements: offsets past 2^31 must not wrap. Checked
    per sample against the fp32 torch backend (the fp64 reference would not fit)."""
    n, c, h, w, s = 2, 32, 5793, 5793, 8
    numel = n * c * h * w
    assert numel > 2 ** 31
    free, _ = torch.cuda.mem_get_info()
    if free < 48 * 2 ** 30:
        pytest.skip(f"needs ~48 GiB of free GPU memory, {free / 2 ** 30:.0f} GiB free")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, c, h, w, device="cuda", dtype=torch.bfloat16, generator=gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w1 = torch.randn(s, c, device="cuda", dtype=torch.bfloat16, generator=gen) / c ** 0.5
    w2 = torch.randn(c, s, device="cuda", dtype=torch.bfloat16, generator=gen) / s ** 0.5
    b1 = torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=gen)
    b2 = torch.randn(c, device="cuda", dtype=torch.bfloat16, generator=gen)
    grad = torch.randn(n, c, h, w, device="cuda", dtype=torch.bfloat16, generator=gen)

    leaves = [t.detach().requires_grad_() for t in (x, w1, b1, w2, b2)]
    out = se_kernels.squeeze_excitation(*leaves, backend="cuda")
    out.backward(grad)
    out = out.detach()
    dx, dw1, db1, dw2, db2 = (t.grad for t in leaves)
    eps = torch.finfo(torch.bfloat16).eps

    ref_wgrads = [torch.zeros_like(t, dtype=torch.float32) for t in (w1, b1, w2, b2)]
    for i in range(n):  # the last sample lies entirely past element 2^31
        ref_leaves = [t[i:i + 1].float().requires_grad_() if j == 0 else t.float().requires_grad_()
                      for j, t in enumerate((x, w1, b1, w2, b2))]
        ref = se_kernels.squeeze_excitation(*ref_leaves, backend="torch")
        ref.backward(grad[i:i + 1].float())
        for name, got, want in (("out", out[i:i + 1], ref.detach()),
                                ("dx", dx[i:i + 1], ref_leaves[0].grad)):
            err = (got.float() - want).abs().max().item()
            assert err <= 2 * eps * want.abs().max().item(), f"{name}[{i}]: max error {err:.3g}"
        for acc, leaf in zip(ref_wgrads, ref_leaves[1:]):
            acc += leaf.grad
        del ref, ref_leaves
    for name, got, want in zip(("dw1", "db1", "dw2", "db2"), (dw1, db1, dw2, db2), ref_wgrads):
        err = (got.float() - want).abs().max().item()
        assert err <= 4 * eps * want.abs().max().item(), f"{name}: max error {err:.3g}"


OPCHECK_CASES = [
    Case(n=2, c=16, h=3, w=4, s=4),
    Case(n=2, c=16, h=4, w=4, s=4, layout="channels_last", activation="silu", gate="hardsigmoid",
         pool="avgmax", residual=True, out_activation="relu"),
    Case(n=1, c=5, h=2, w=2, s=3, pool="max", residual=True, bias=False, dtype=torch.bfloat16),
    Case(n=0, c=4, h=2, w=2, s=1),
]


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck(case):
    """Schema, fake kernels (shapes, strides, layouts) and autograd registration agree with
    the CUDA kernels."""
    opcheck_forward(_ops.se_forward, case, "cuda", requires_grad=True)
    opcheck_backward(_ops.se_forward, _ops.se_backward, case, "cuda")


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("case", [
    Case(n=2, c=5, h=3, w=2, s=2, dtype=torch.float64, residual=True, out_activation="relu"),
    Case(n=2, c=8, h=2, w=4, s=3, dtype=torch.float64, activation="silu", gate="hardsigmoid",
         pool="avgmax", layout="channels_last"),
    Case(n=1, c=3, h=3, w=3, s=1, dtype=torch.float64, pool="max", bias=False),
], ids=str)
def test_gradcheck(case):
    gradcheck_backend(case, make_inputs(case, "cuda"), "cuda")


@pytest.mark.cuda
@needs_gpu
def test_compile_fullgraph_matches_eager():
    module = se_kernels.SqueezeExcitation(32, 8, out_activation="relu", backend="cuda").cuda()
    x = torch.randn(4, 32, 9, 9, device="cuda").to(memory_format=torch.channels_last)
    assert_compile_matches_eager(module, [x, torch.randn_like(x)], params=(module.fc1.weight,),
                                 rtol=1e-5, atol=1e-5)


def sanitizer_path() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and Path(root, "bin", "compute-sanitizer").exists():
            return str(Path(root, "bin", "compute-sanitizer"))
    return None


@pytest.mark.cuda
@pytest.mark.slow
@needs_gpu
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck", "initcheck"])
def test_compute_sanitizer(tool):
    sanitizer = sanitizer_path()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    # Without the caching allocator every tensor is its own allocation, so an access past
    # a tensor's end is out of bounds for the sanitizer, not a read of a cached neighbour.
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    result = subprocess.run(
        [sanitizer, "--tool", tool, "--error-exitcode", "99", sys.executable, __file__],
        env=env, capture_output=True, text=True, timeout=1800)
    report = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, f"compute-sanitizer --tool {tool} failed:\n{report}"
    assert "workload done" in result.stdout, report


WORKLOAD_CASES = [
    # vector and scalar paths, both layouts, every pool, epilogues, split rows, N=1, odd C
    Case(n=2, c=16, h=8, w=8, s=4, dtype=torch.bfloat16, layout="nchw"),
    Case(n=2, c=16, h=8, w=8, s=4, dtype=torch.bfloat16, layout="channels_last", pool="max"),
    Case(n=1, c=8, h=64, w=65, s=2, dtype=torch.float32, layout="nchw", pool="avgmax",
         residual=True, out_activation="relu"),
    Case(n=1, c=24, h=40, w=40, s=6, dtype=torch.float16, layout="channels_last",
         residual=True, out_activation="relu", activation="silu", gate="hardsigmoid"),
    Case(n=3, c=3, h=5, w=7, s=1, dtype=torch.float32, layout="channels_last", pool="avgmax"),
    Case(n=2, c=37, h=3, w=3, s=9, dtype=torch.float64, layout="nchw", bias=False),
    Case(n=4, c=520, h=2, w=2, s=8, dtype=torch.bfloat16, layout="channels_last"),
    Case(n=3, c=8, h=1, w=1, s=2, dtype=torch.float32),
    Case(n=0, c=8, h=4, w=4, s=2, dtype=torch.float32),
]


def run_workload() -> None:
    """Each workload case through the cuda backend and the reference, on both schedules,
    with the default groups and with small ones (several groups, every pipeline lag)."""
    for schedule in ("pipelined", "grouped"):
        os.environ[SCHEDULE_ENV] = schedule
        for group_bytes in ("", "1", "60000"):
            os.environ[GROUP_ENV] = group_bytes
            for case in WORKLOAD_CASES:
                check_against_reference(case, "cuda", "cuda")
    torch.cuda.synchronize()
    print("workload done")


if __name__ == "__main__":
    run_workload()
