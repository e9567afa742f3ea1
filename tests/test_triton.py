"""The Triton backend beyond the generic backend tests: its ops under opcheck and
torch.compile, its refusals, its launch heuristics, its kernels with small tiles (splits,
loops, several blocks) and int64 indexing under the interpreter, their compilation for
sm_80/sm_90 without a GPU, and, on a GPU, realistic shapes, CUDA graphs and determinism."""

from __future__ import annotations

import ast
import dataclasses
import math
import os

import pytest
import torch

import se_kernels
from se_kernels.backends import triton_ops
from se_kernels.options import make_call

from helpers import (Case, backend_device, check_against_reference, make_inputs, require_backend,
                     run_python)

DEVICE = backend_device("triton")
cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def kernels():
    require_backend("triton", DEVICE)
    return triton_ops.kernels()


def forward_args(case: Case, device) -> tuple:
    t = make_inputs(case, device)
    return (t["x"], t["w1"], t["b1"], t["w2"], t["b2"], t["residual"], case.activation,
            case.gate, case.pool, case.out_activation or "none")


def backward_args(case: Case, device) -> tuple:
    args = forward_args(case, device)
    out, z, zmax, a, g = triton_ops.se_forward(*args)
    x, w1, _, w2 = args[:4]
    grad = torch.randn_like(out)
    return (grad, x, out, w1, w2, z, zmax, a, g, case.activation, case.gate, case.pool,
            case.out_activation or "none", case.residual)


# ---------------------------------------------------------------------------------------
# The ops: opcheck, torch.compile
# ---------------------------------------------------------------------------------------

OPCHECK_CASES = [
    Case(n=2, c=6, h=3, w=4, s=2, residual=True, out_activation="relu", pool="avgmax"),
    Case(n=2, c=6, h=3, w=4, s=2, layout="channels_last", activation="silu",
         gate="hardsigmoid", pool="max", bias=False),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck_forward(kernels, case):
    torch.library.opcheck(triton_ops.se_forward, forward_args(case, DEVICE))


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck_backward(kernels, case):
    torch.library.opcheck(triton_ops.se_backward, backward_args(case, DEVICE))


def _compile_matches_eager(device, compile_backend):
    case = Case(n=2, c=8, h=3, w=5, s=3, residual=True, out_activation="relu", pool="avgmax",
                layout="channels_last")
    t = make_inputs(case, device)

    def fn(x, w1, b1, w2, b2, r):
        y = se_kernels.squeeze_excitation(x, w1, b1, w2, b2, pool="avgmax", residual=r,
                                          out_activation="relu", backend="triton")
        return (y * 2).sum()  # ops around the SE op stay in the same graph

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=compile_backend, fullgraph=True)  # no graph breaks
    results = []
    for f in (fn, compiled):
        leaves = [v.detach().clone().requires_grad_() for v in t.values()]
        loss = f(*leaves)
        loss.backward()
        results.append((loss.detach(), *(v.grad for v in leaves)))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager)


def test_compile_fullgraph_interpreter(kernels):
    """On CPU tensors (the interpreter) inductor cannot generate Triton code and the kernels
    cannot be traced, so the op stays one opaque node; aot_eager still traces the whole
    function, autograd included, without a graph break."""
    if DEVICE != "cpu":
        pytest.skip("the interpreter path is for machines without a GPU")
    assert kernels.INTERPRETED
    _compile_matches_eager("cpu", "aot_eager")


@cuda
@needs_gpu
def test_compile_fullgraph_inductor(kernels):
    _compile_matches_eager("cuda", "inductor")


@cuda
@needs_gpu
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck_cuda(kernels, case):
    torch.library.opcheck(triton_ops.se_forward, forward_args(case, "cuda"))
    torch.library.opcheck(triton_ops.se_backward, backward_args(case, "cuda"))


def test_flop_counter_sees_both_ops(kernels):
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


def test_op_rejects_bad_arguments(kernels):
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


def test_schemas_match_the_native_ops(kernels):
    """torch 2.11's triton_op infers the schema from the bodies' annotations (it ignores
    schema=): they must spell the same argument and return types as the native ops'."""
    def types(schema):
        return ([(a.name, str(a.type)) for a in schema.arguments],
                [str(r.type) for r in schema.returns])

    for triton_op, native in ((triton_ops.se_forward, torch.ops.se_kernels.se_forward.default),
                              (triton_ops.se_backward, torch.ops.se_kernels.se_backward.default)):
        assert types(triton_op._schema) == types(native._schema)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_launches_on_the_inputs_device(kernels, monkeypatch, direction):
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
    monkeypatch.setattr(kernels, "device_profile", lambda device: kernels.INTERPRETER_PROFILE)
    monkeypatch.setattr(kernels, "_launch",
                        lambda kernel, programs, *args, **meta: launched_on.append(current[0]))
    case = Case(n=2, c=6, h=3, w=4, s=2, residual=True, out_activation="relu", pool="avgmax")
    with fake_tensor.FakeTensorMode():
        args = forward_args(case, "cuda:1")
        outs = triton_ops.se_forward_triton(*args)
        if direction == "backward":
            launched_on.clear()
            x, w1, _, w2 = args[:4]
            triton_ops.se_backward_triton(torch.empty_like(outs[0]), x, outs[0], w1, w2, *outs[1:],
                                          case.activation, case.gate, case.pool, "relu", True)
    assert launched_on and set(launched_on) == {1}, launched_on
    assert current[0] == 0


@cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_runs_on_the_inputs_device(kernels):
    case = Case(n=3, c=24, h=7, w=7, s=6, residual=True, out_activation="relu", pool="avgmax")
    with torch.cuda.device(0):
        check_against_reference(case, "cuda:1", "triton")
        assert torch.cuda.current_device() == 0


# ---------------------------------------------------------------------------------------
# Refusals and lazy import
# ---------------------------------------------------------------------------------------

def _plain_call(device="cpu", dtype=torch.float32):
    x = torch.randn(1, 4, 2, 2, device=device, dtype=dtype)
    w1 = torch.randn(2, 4, device=device, dtype=dtype)
    w2 = torch.randn(4, 2, device=device, dtype=dtype)
    return make_call(x, w1, None, w2, None)


def test_refuses_without_triton(monkeypatch):
    monkeypatch.setattr(triton_ops, "triton_import_error",
                        lambda: "ModuleNotFoundError: No module named 'triton'")
    reasons = triton_ops.TritonBackend().refusals(_plain_call())
    assert len(reasons) == 1 and "triton" in reasons[0] and "install" in reasons[0]
    with pytest.raises(se_kernels.BackendUnavailableError, match="pip install triton"):
        se_kernels.select(_plain_call(), "triton")


def test_refuses_cpu_without_interpreter(monkeypatch):
    if triton_ops.triton_import_error():
        pytest.skip(f"triton is not importable: {triton_ops.triton_import_error()}")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = triton_ops.TritonBackend().refusals(_plain_call())
    assert any("TRITON_INTERPRET=1" in r for r in reasons), reasons


def test_refuses_other_devices():
    if triton_ops.triton_import_error():
        pytest.skip(f"triton is not importable: {triton_ops.triton_import_error()}")
    reasons = triton_ops.TritonBackend().refusals(_plain_call("meta"))
    assert any("meta" in r and "cuda" in r for r in reasons), reasons


def test_accepts_the_interpreter(kernels):
    if DEVICE != "cpu":
        pytest.skip("the interpreter path is for machines without a GPU")
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert triton_ops.TritonBackend().refusals(_plain_call("cpu", dtype)) == []


def test_auto_never_picks_the_interpreter(kernels):
    """CPU calls with backend="auto" go to the C++ or torch backends, never the slow
    interpreter (the lead owns the GPU preference order)."""
    assert "triton" not in se_kernels.dispatch.preference(_plain_call())


def _run_python(code: str, env_changes: dict[str, str | None]) -> str:
    env = dict(os.environ)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    done = run_python("-c", code, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_import_is_lazy_and_survives_missing_triton():
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # as if triton were not installed\n"
        "import torch, se_kernels\n"
        "from se_kernels.options import make_call\n"
        "x = torch.randn(1, 4, 2, 2)\n"
        "call = make_call(x, torch.randn(2, 4), None, torch.randn(4, 2), None)\n"
        "print(se_kernels.explain(call)['triton'])\n"
        "print('se_kernels.backends.triton_kernels' in sys.modules)\n"
        "y = se_kernels.squeeze_excitation(x, torch.randn(2, 4), None, torch.randn(4, 2), None)\n"
        "print(tuple(y.shape))\n"
    )
    lines = _run_python(code, {"TRITON_INTERPRET": "1"}).strip().splitlines()
    assert "triton" in lines[-3] and "install" in lines[-3]
    assert lines[-2] == "False"  # the kernels were never imported
    assert lines[-1] == "(1, 4, 2, 2)"  # and the other backends still run


# ---------------------------------------------------------------------------------------
# Launch heuristics (pure Python: what the GPU profile chooses)
# ---------------------------------------------------------------------------------------

def _gpu(kernels):
    return kernels.GPU_PROFILE


def _is_pow2(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


RESNET50_STAGES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]


@pytest.mark.parametrize("n", [1, 32, 256])
@pytest.mark.parametrize("c,hw", RESNET50_STAGES + [(3, 224), (16, 112), (960, 7), (37, 5)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("elem_size", [2, 4, 8])
def test_pass_config_invariants(kernels, n, c, hw, channels_last, elem_size):
    profile = _gpu(kernels)
    p = hw * hw
    cfg = kernels.pass_config(n, c, p, channels_last, elem_size, profile)
    assert _is_pow2(cfg.block_c) and _is_pow2(cfg.block_p) and cfg.num_warps in (1, 2, 4, 8)
    tile = cfg.block_c * cfg.block_p
    assert tile * elem_size <= profile.tile_bytes
    # 16 elements per thread (fewer only when the tensor is smaller than a tile)
    assert tile <= cfg.num_warps * 32 * profile.elems_per_thread
    # The pieces cover H*W exactly once, each a whole number of tiles.
    assert cfg.p_per_split % cfg.block_p == 0
    assert (cfg.splits - 1) * cfg.p_per_split < p <= cfg.splits * cfg.p_per_split
    groups, channels = (n, c) if channels_last else (1, n * c)
    programs = groups * math.ceil(channels / cfg.block_c) * cfg.splits
    target = profile.programs_per_sm * profile.sm_count
    if cfg.splits > 1:  # split only as far as needed to fill the GPU
        assert groups * math.ceil(channels / cfg.block_c) * (cfg.splits - 1) < target
    else:  # or because a piece would get too little work
        assert programs >= target or p <= cfg.block_p * profile.min_tiles_per_piece * 2


def test_pass_config_choices(kernels):
    gpu = _gpu(kernels)
    # NCHW 56x56: 256-pixel blocks pad 3136 by 6%; 1024 would pad it by 31%.
    cfg = kernels.pass_config(32, 256, 3136, False, 2, gpu)
    assert (cfg.block_p, cfg.block_c, cfg.num_warps) == (256, 16, 8)
    # NCHW 7x7: the whole row, rounded up to 64 pixels, and no split at N=32.
    cfg = kernels.pass_config(32, 2048, 49, False, 2, gpu)
    assert (cfg.block_p, cfg.block_c, cfg.splits) == (64, 64, 1)
    # channels-last: C is the contiguous axis, whole up to 1024 channels.
    cfg = kernels.pass_config(32, 2048, 49, True, 2, gpu)
    assert (cfg.block_c, cfg.block_p) == (1024, 4)
    cfg = kernels.pass_config(32, 672, 196, True, 4, gpu)
    assert (cfg.block_c, cfg.block_p, cfg.num_warps) == (1024, 2, 4)
    # N=1 inference: H*W is split so the grid still fills the GPU.
    cfg = kernels.pass_config(1, 256, 3136, True, 2, gpu)
    assert cfg.splits > 1
    # Big batches need no split.
    assert kernels.pass_config(256, 256, 3136, False, 2, gpu).splits == 1


def test_configs_are_cached(kernels):
    """A shape seen before costs a dictionary lookup: no search, no benchmark."""
    gpu = _gpu(kernels)
    kernels.pass_config.cache_clear()
    first = kernels.pass_config(8, 64, 100, True, 2, gpu)
    assert kernels.pass_config(8, 64, 100, True, 2, gpu) is first
    assert kernels.pass_config.cache_info().hits == 1


@pytest.mark.parametrize("n,c,s", [(1, 2048, 128), (32, 256, 16), (32, 2048, 128),
                                   (256, 2048, 128), (32, 960, 240), (3, 37, 9), (0, 8, 2)])
@pytest.mark.parametrize("acc_size", [4, 8])
def test_mlp_configs(kernels, n, c, s, acc_size):
    gpu = _gpu(kernels)
    budget = gpu.mlp_tile * 4 // acc_size
    target = gpu.programs_per_sm * gpu.sm_count
    for rows, m, k in ((n, s, c), (n, c, s)):  # squeeze FC, excite FC (and their backward)
        cfg = kernels.mlp_config(rows, m, k, acc_size, gpu)
        assert all(map(_is_pow2, (cfg.block_n, cfg.block_m, cfg.block_k)))
        assert cfg.block_n * cfg.block_m * cfg.block_k <= budget
        assert cfg.block_n <= max(1, 2 * rows) and cfg.block_m < 2 * m
        programs = math.ceil(rows / cfg.block_n) * math.ceil(m / cfg.block_m)
        assert programs >= target or cfg.block_n == cfg.block_m == 1  # fills the GPU
    wg = kernels.weight_grad_config(n, c, s, acc_size, gpu)
    assert wg.block_n * wg.block_m * wg.block_k <= budget
    assert wg.block_n <= 16


def test_mlp_tiles_stay_square(kernels):
    """Big batches: samples and features are blocked alike (L2 traffic ~ 1/bn + 1/bm)."""
    cfg = kernels.mlp_config(256, 128, 2048, 4, _gpu(kernels))
    assert cfg.block_n >= 4 and cfg.block_m >= 4 and cfg.block_k == 128


# ---------------------------------------------------------------------------------------
# The kernels with GPU-like small tiles under the interpreter (or the GPU)
# ---------------------------------------------------------------------------------------

TINY = dict(sm_count=4, tile_bytes=256, elems_per_thread=4, contiguous_max=16,
            programs_per_sm=2, min_tiles_per_piece=2, mlp_tile=256, mlp_block_max=4,
            mlp_inner_max=8, max_warps=4)

SMALL_TILE_CASES = [
    Case(n=3, c=37, h=6, w=7, s=9, pool="avgmax", residual=True, out_activation="relu"),
    Case(n=1, c=5, h=9, w=11, s=2, pool="max", layout="channels_last", dtype=torch.bfloat16),
    Case(n=2, c=40, h=5, w=9, s=5, activation="silu", gate="hardsigmoid", pool="avgmax",
         layout="channels_last"),
    Case(n=1, c=3, h=20, w=21, s=1, pool="max", dtype=torch.float16, bias=False),
]


@pytest.fixture
def tiny_tiles(kernels, monkeypatch):
    """Every launch uses tiny tiles: several channel blocks, loops over H*W, H*W split into
    pieces, several sample and feature blocks in the MLP kernels."""
    tiny = kernels.DeviceProfile(**TINY)
    monkeypatch.setattr(kernels, "device_profile", lambda device: tiny)
    return tiny


@pytest.mark.parametrize("case", SMALL_TILE_CASES, ids=str)
def test_small_tiles(kernels, tiny_tiles, case):
    cfg = kernels.pass_config(case.n, case.c, case.h * case.w, case.layout == "channels_last",
                              case.dtype.itemsize, tiny_tiles)
    assert cfg.splits > 1 and cfg.p_per_split > cfg.block_p  # the paths this test is for
    check_against_reference(case, DEVICE, "triton")


def test_int64_indexing_path(kernels, monkeypatch):
    """The WIDE (int64 offsets) variant of the passes, forced on a small tensor: the
    arithmetic must be the same. (Real >2**31-element tensors are tested on the GPU.)"""
    real_view = kernels._view
    monkeypatch.setattr(kernels, "_view",
                        lambda x, cl: dataclasses.replace(real_view(x, cl), wide=True))
    for layout in ("nchw", "channels_last"):
        check_against_reference(Case(n=2, c=6, h=3, w=5, s=2, pool="avgmax", residual=True,
                                     out_activation="relu", layout=layout), DEVICE, "triton")


def test_runs_are_bit_identical(kernels, tiny_tiles):
    """Partial results are combined in a fixed order: two runs agree bit for bit."""
    case = Case(n=1, c=5, h=9, w=11, s=2, pool="avgmax", layout="channels_last")
    outs = []
    for _ in range(2):
        torch.manual_seed(0)  # the same grad_out
        args = backward_args(case, DEVICE)
        outs.append(triton_ops.se_backward(*args))
    for first, second in zip(*outs):
        assert torch.equal(first, second)


# ---------------------------------------------------------------------------------------
# Every kernel compiles for sm_80 and sm_90 (no GPU needed): the interpreter accepts code
# that the compiler rejects (non-constexpr globals, loop-carried type changes, ...).
# ---------------------------------------------------------------------------------------

_PTX_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
              torch.float64: "fp64", torch.int32: "i32"}


def _record_launches(module, case: Case) -> list:
    launches = []
    module._launch = lambda kernel, programs, *args, **meta: launches.append((kernel, args, meta))
    module.device_profile = lambda device: module.GPU_PROFILE
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    args = forward_args(case, "cpu")
    out, z, zmax, a, g = module.forward(*args, fmt)
    module.backward(torch.randn_like(out), args[0], out, args[1], args[3], z, zmax, a, g,
                    *args[6:10], case.residual, fmt)
    return launches


def _compile(kernel, args, meta, capability):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constants = {}, {}
    for name, value in zip(kernel.arg_names, args):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _PTX_TYPES[value.dtype]
        elif value == 1:  # Triton specializes integer arguments equal to 1 as constants
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
    meta = dict(meta)
    num_warps = meta.pop("num_warps")
    for name, value in meta.items():
        signature[name], constants[name] = "constexpr", value
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps})


def compile_kernels_ahead_of_time(capability: int) -> list[str]:
    """Compiles every kernel launch of two SE calls (forward and backward, together every
    kernel and most constexpr branches) for an NVIDIA GPU of `capability`. Needs a process
    where the kernels are not interpreted."""
    module = triton_ops.kernels()
    assert not module.INTERPRETED, "run without TRITON_INTERPRET"
    launches = []
    for case in (
        Case(n=2, c=37, h=6, w=7, s=9, dtype=torch.bfloat16, layout="channels_last",
             activation="silu", gate="hardsigmoid", pool="avgmax", residual=True,
             out_activation="relu"),
        Case(n=3, c=24, h=5, w=5, s=4, dtype=torch.float64, pool="max"),
    ):
        launches += _record_launches(module, case)
    for kernel, args, meta in launches:
        _compile(kernel, args, meta, capability)
    return sorted({kernel.fn.__name__ for kernel, _, _ in launches})


@pytest.mark.parametrize("capability", [80, 90])
def test_kernels_compile_for_gpus(kernels, capability):
    """In a fresh process without the interpreter (triton's own helpers are interpreted
    functions in a process that set TRITON_INTERPRET=1)."""
    try:
        from triton.backends import backends
    except ImportError as error:
        pytest.skip(f"this triton cannot compile ahead of time: {error}")
    if "nvidia" not in backends:
        pytest.skip("this triton build has no NVIDIA backend")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
    out = _run_python(f"import test_triton\n"
                      f"print(test_triton.compile_kernels_ahead_of_time({capability}))",
                      {"TRITON_INTERPRET": None, "PYTHONPATH": path})
    names = ast.literal_eval(out.strip().splitlines()[-1])
    assert len(names) == 9, names  # every kernel of forward and backward


def trace_gpu_graph() -> str:
    """The graph AOTAutograd traces for se_forward_triton + se_backward_triton on fake CUDA
    tensors with the compiled (not interpreted) kernels: the path torch.compile takes on a
    GPU, which needs no GPU to trace. Needs a process without TRITON_INTERPRET."""
    from torch._functorch.aot_autograd import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode

    module = triton_ops.kernels()
    assert not module.INTERPRETED, "run without TRITON_INTERPRET"
    module.device_profile = lambda device: module.GPU_PROFILE  # no device to ask
    options = ("silu", "sigmoid", "avgmax", "relu")

    def step(x, w1, b1, w2, b2, r, dy):
        out, z, zmax, a, g = triton_ops.se_forward(x, w1, b1, w2, b2, r, *options)
        return (out, *triton_ops.se_backward(dy, x, out, w1, w2, z, zmax, a, g, *options, True))

    graphs = []
    with FakeTensorMode():
        x = torch.empty(2, 8, 4, 4, device="cuda", dtype=torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last)
        args = (x, torch.empty(2, 8, device="cuda", dtype=torch.bfloat16),
                torch.empty(2, device="cuda", dtype=torch.bfloat16),
                torch.empty(8, 2, device="cuda", dtype=torch.bfloat16),
                torch.empty(8, device="cuda", dtype=torch.bfloat16),
                torch.empty_like(x), torch.empty_like(x))
        outs = aot_function(step, fw_compiler=lambda gm, _: graphs.append(gm) or gm)(*args)
    assert outs[0].is_contiguous(memory_format=torch.channels_last)
    return graphs[0].code


def test_gpu_path_traces_without_gpu(kernels):
    """torch.compile's view of the ops on a GPU: the triton_op bodies decompose into one
    functional kernel launch per kernel, nothing opaque left."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
    code = _run_python("import test_triton\nprint(repr(test_triton.trace_gpu_graph()))",
                       {"TRITON_INTERPRET": None, "PYTHONPATH": path})
    code = ast.literal_eval(code.strip().splitlines()[-1])
    assert code.count("triton_kernel_wrapper_functional(") == 9, code
    assert "se_forward_triton" not in code and "se_backward_triton" not in code


# ---------------------------------------------------------------------------------------
# On a GPU: realistic shapes, CUDA graphs, determinism, int64 offsets
# ---------------------------------------------------------------------------------------

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
def test_gpu_realistic_shapes(kernels, case, dtype, layout):
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
def test_gpu_odd_shapes(kernels, case):
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
def test_gpu_cuda_graph_capture_and_replay(kernels, layout):
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
def test_gpu_runs_are_bit_identical(kernels, case):
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
def test_gpu_int64_offsets(kernels):
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
