"""Every Triton kernel compiles for sm_80 and sm_90, and torch.compile's GPU path traces
the ops into kernel launches, all without a GPU: the interpreter accepts code that the
compiler rejects (non-constexpr globals, loop-carried type changes, ...). Both run in a
fresh process without TRITON_INTERPRET."""

from __future__ import annotations

import ast
import inspect
import itertools

import pytest
import torch

from se_kernels.backends.triton import heuristics
from se_kernels.backends.triton import ops as triton_ops

from helpers import Case, covering_cases
from se_kernels.options import ACTIVATIONS, GATES
from op_checks import backward_args, forward_args
from triton_support import pythonpath_with_tests, run_python_with


_PTX_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
              torch.float64: "fp64", torch.int32: "i32"}


def _record_launches(module, case: Case) -> list:
    launches = []
    module._launch = lambda kernel, programs, *args, **meta: launches.append((kernel, args, meta))
    module.device_profile = lambda device: heuristics.GPU_PROFILE
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    args = forward_args(case, "cpu")
    outputs = module.forward(*args, fmt)
    module.backward(*backward_args(args, outputs, torch.randn_like(outputs[0])), fmt)
    return launches


def _compile(kernel, args, meta, capability):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constants, attrs = {}, {}, {}
    divisible = [["tt.divisibility", 16]]
    for index, (name, value) in enumerate(zip(kernel.arg_names, args)):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _PTX_TYPES[value.dtype]
            if value.storage_offset() == 0:  # torch's allocations are 16-byte aligned
                attrs[(index,)] = divisible
        elif value == 1:  # Triton specializes integer arguments equal to 1 as constants
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0:  # ...and those divisible by 16 as such, as its launcher does
                attrs[(index,)] = divisible
    meta = dict(meta)
    num_warps = meta.pop("num_warps")
    # Constexprs a launch leaves at their defaults (the passes' PRE_ACT and STATS), as the
    # JIT launcher binds them.
    for name, param in inspect.signature(kernel.fn).parameters.items():
        if param.default is not inspect.Parameter.empty and name not in meta:
            meta[name] = getattr(param.default, "value", param.default)
    for name, value in meta.items():
        signature[name], constants[name] = "constexpr", value
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps})


def compile_kernels_ahead_of_time(capability: int) -> list[str]:
    """Compiles every kernel launch of two SE calls (forward and backward, together every
    kernel and most constexpr branches) for an NVIDIA GPU of `capability`. Needs a process
    where the kernels are not interpreted."""
    module = triton_ops.driver()
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


def _stream_launches(module, case: Case) -> list:
    """The launches of the four stream ops and the four act ops on case's shape, every
    optional argument given (full=True: every constexpr branch of the stream ops on) or
    none."""
    from se_kernels.backends.triton import stream

    launches = []
    module._launch = lambda kernel, programs, *args, **meta: launches.append((kernel, args, meta))
    stream.device_profile = lambda device: heuristics.GPU_PROFILE
    stream.forget_plans()
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    x = torch.randn(case.n, case.c, case.h, case.w, dtype=case.dtype).contiguous(memory_format=fmt)
    acc = torch.float64 if case.dtype == torch.float64 else torch.float32
    v = torch.randn(case.n, case.c, dtype=acc)
    full, act = case.residual, case.out_activation or "none"
    given = v if full else None
    stream._reduce(x, full, full, full)
    stream._map(x, v, given, x if full else None, act)
    stream._grad_reduce(x, x, x, given, act, full, full)
    stream._grad_map(x, x, x, v, given, given, given, given, act)
    # The act tail's: the same kernels with the input prologue (PRE_ACT; STATS when full).
    a, b = torch.randn(case.c, dtype=acc), torch.randn(case.c, dtype=acc)
    stream._act_reduce(x, a, b, case.activation)
    stream._act_map(x, a, b, case.activation, v)
    stream._act_grad_reduce(x, x, a, b, case.activation, full)
    stream._act_grad_map(x, x, a, b, case.activation, v, v, given, given)
    return launches


def compile_stream_kernels_ahead_of_time(capability: int) -> list[str]:
    """Compiles the stream ops' launches (the SE passes' kernels with the stream ops'
    constexpr branches, and the act ops' prologue) for an NVIDIA GPU of `capability`, with
    every optional argument and with none. Needs a process where the kernels are not interpreted."""
    module = triton_ops.driver()
    assert not module.INTERPRETED, "run without TRITON_INTERPRET"
    compiled = []
    for case in (Case(n=2, c=37, h=6, w=7, s=1, dtype=torch.bfloat16, layout="channels_last",
                      residual=True, out_activation="relu", activation="gelu_tanh"),
                 Case(n=3, c=24, h=5, w=5, s=1, dtype=torch.float64, activation="hardswish")):
        for kernel, args, meta in _stream_launches(module, case):
            _compile(kernel, args, meta, capability)
            compiled.append(kernel.fn.__name__)
    return compiled


def compile_option_math_ahead_of_time(capability: int) -> list[tuple[str, str, str]]:
    """Compiles, for an NVIDIA GPU of `capability`, the launches that take the activation
    or the gate (the MLP kernels), for every activation and every gate, in fp32 and fp64
    (the option math's constants are materialized in the kernel's dtype). Needs a process
    where the kernels are not interpreted."""
    module = triton_ops.driver()
    assert not module.INTERPRETED, "run without TRITON_INTERPRET"
    compiled = set()
    for (activation, gate), dtype in itertools.product(covering_cases(ACTIVATIONS, GATES),
                                                       (torch.float32, torch.float64)):
        case = Case(n=2, c=12, h=3, w=3, s=4, dtype=dtype, activation=activation, gate=gate)
        for kernel, args, meta in _record_launches(module, case):
            if "ACT" in meta or "GATE" in meta:
                _compile(kernel, args, meta, capability)
                compiled.add((kernel.fn.__name__, activation, gate))
    return sorted(compiled)


def without_interpreter(expression: str):
    """The value of `expression`, a call of this module's functions, in a fresh process
    without the interpreter (triton's own helpers are interpreted functions in a process
    that set TRITON_INTERPRET=1)."""
    out = run_python_with(f"import test_triton_compile\n"
                          f"print(repr(test_triton_compile.{expression}))",
                          {"TRITON_INTERPRET": None, "PYTHONPATH": pythonpath_with_tests()})
    return ast.literal_eval(out.strip().splitlines()[-1])


def require_nvidia_compiler() -> None:
    """Skip where this triton cannot compile for NVIDIA GPUs ahead of time."""
    try:
        from triton.backends import backends
    except ImportError as error:
        pytest.skip(f"this triton cannot compile ahead of time: {error}")
    if "nvidia" not in backends:
        pytest.skip("this triton build has no NVIDIA backend")


@pytest.mark.parametrize("capability", [80, 90])
def test_kernels_compile_for_gpus(driver, capability):
    require_nvidia_compiler()
    names = without_interpreter(f"compile_kernels_ahead_of_time({capability})")
    assert len(names) == 8, names  # every kernel of forward and backward


@pytest.mark.parametrize("capability", [80, 90])
def test_stream_kernels_compile_for_gpus(driver, capability):
    require_nvidia_compiler()
    names = without_interpreter(f"compile_stream_kernels_ahead_of_time({capability})")
    assert names == 4 * ["_pool_kernel", "_scale_kernel", "_grad_reduce_kernel",
                         "_grad_input_kernel"], names  # one launch per op and act op, twice


def test_option_math_compiles_for_every_value(driver):
    require_nvidia_compiler()
    compiled = without_interpreter("compile_option_math_ahead_of_time(90)")
    assert {activation for _, activation, _ in compiled} == set(ACTIVATIONS)
    assert {gate for _, _, gate in compiled} == set(GATES)


def trace_gpu_graph() -> str:
    """The graph AOTAutograd traces for se_forward_triton + se_backward_triton on fake CUDA
    tensors with the compiled (not interpreted) kernels: the path torch.compile takes on a
    GPU, which needs no GPU to trace. Needs a process without TRITON_INTERPRET."""
    from torch._functorch.aot_autograd import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode

    module = triton_ops.driver()
    assert not module.INTERPRETED, "run without TRITON_INTERPRET"
    module.device_profile = lambda device: heuristics.GPU_PROFILE  # no device to ask
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


def test_gpu_path_traces_without_gpu(driver):
    """torch.compile's view of the ops on a GPU: the triton_op bodies decompose into one
    functional kernel launch per kernel, nothing opaque left."""
    code = without_interpreter("trace_gpu_graph()")
    assert code.count("triton_kernel_wrapper_functional(") == 8, code
    assert "se_forward_triton" not in code and "se_backward_triton" not in code


def trace_stream_gpu_graph() -> str:
    """The graph AOTAutograd traces for the four stream ops on fake CUDA tensors with the
    compiled kernels (see trace_gpu_graph). Needs a process without TRITON_INTERPRET."""
    from torch._functorch.aot_autograd import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode

    from se_kernels.backends.triton import stream

    assert not triton_ops.driver().INTERPRETED, "run without TRITON_INTERPRET"
    stream.device_profile = lambda device: heuristics.GPU_PROFILE  # no device to ask
    ops = stream.OPS

    def step(x, dy, v):
        total, sumsq, peak, low = ops["stream_reduce"](x, True, True, True)
        out = ops["stream_map"](x, v, total, x, "relu")
        sdy, sdyx, count, dres = ops["stream_grad_reduce"](dy, out, x, peak, "relu", True, True)
        return ops["stream_grad_map"](dres, None, x, v, sdy, sdyx, peak, count, "none"), sumsq, low

    graphs = []
    with FakeTensorMode():
        x = torch.empty(2, 8, 40, 40, device="cuda", dtype=torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last)
        args = (x, torch.empty_like(x), torch.empty(2, 8, device="cuda"))
        aot_function(step, fw_compiler=lambda gm, _: graphs.append(gm) or gm)(*args)
    return graphs[0].code


def test_stream_ops_trace_to_kernel_launches_without_gpu(driver):
    """On a GPU torch.compile sees through the stream ops as through the SE ops: one
    functional kernel launch per op (with the pieces' torch sums around them)."""
    code = without_interpreter("trace_stream_gpu_graph()")
    assert code.count("triton_kernel_wrapper_functional(") == 4, code
    assert "stream_" not in code, code


STREAMING = ("_pool_kernel", "_scale_kernel", "_grad_reduce_kernel", "_grad_input_kernel")


def _cuobjdump(compiled, *flags) -> str:
    """cuobjdump (shipped with Triton's NVIDIA backend) on a compiled kernel's cubin."""
    import os
    import subprocess
    import tempfile

    import triton.backends.nvidia as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        return subprocess.run([tool, *flags, cubin.name], capture_output=True, text=True,
                              check=True).stdout


def streaming_kernels(capability: int) -> list[dict]:
    """The passes over x of real SE calls (bf16, the GPU profile, every constexpr branch that
    adds loads: max pooling, residual, output ReLU), compiled ahead of time: per launch the
    kernel, layout, warps, registers and local memory (spills) from the cubin, and its
    global loads and stores from the SASS (kinds, and how many instructions of each), and the
    reduction passes' tile rows and vector width. Needs a process where the kernels are not
    interpreted."""
    import collections
    import re

    from se_kernels.backends.triton import trace
    from se_kernels.plan import PlanCall

    assert not triton_ops.driver().INTERPRETED, "run without TRITON_INTERPRET"
    rows = []
    for n, c, h, s, layouts in ((32, 256, 56, 16, (False, True)), (32, 672, 14, 168, (False,)),
                                (32, 2048, 7, 128, (False, True))):
        for channels_last in layouts:
            call = PlanCall(n, c, h, h, s, torch.bfloat16, channels_last, residual=True,
                            out_relu=True, pool="avgmax")
            forward, backward, _ = trace.record(call, heuristics.GPU_PROFILE)
            for kernel, _, args, meta in forward + backward:
                name = trace.kernel_name(kernel)
                if name not in STREAMING:
                    continue
                compiled = _compile(kernel, args, meta, capability)
                usage = _cuobjdump(compiled, "--dump-resource-usage")
                sass = _cuobjdump(compiled, "-sass")
                counts = collections.Counter(re.findall(r"\b(?:LDG|STG)\.E[\w.]*", sass))
                rows.append(dict(
                    kernel=name, shape=f"{n}x{c}x{h}x{h}",
                    layout="channels_last" if channels_last else "nchw",
                    warps=meta["num_warps"], regs=int(re.search(r"REG:(\d+)", usage).group(1)),
                    local=int(re.search(r"LOCAL:(\d+)", usage).group(1)),
                    accesses=sorted(counts), counts=dict(counts),
                    block_c=meta["BLOCK_C"], vec=meta.get("VEC", 1)))
    return rows


@pytest.fixture(scope="module")
def sm90_streaming_kernels():
    require_nvidia_compiler()
    return without_interpreter("streaming_kernels(90)")


def test_streaming_kernels_fit_two_programs_per_sm(sm90_streaming_kernels):
    """Two programs per SM (65536 registers on sm_90) keep enough loads in flight."""
    for row in sm90_streaming_kernels:
        assert row["regs"] * 32 * row["warps"] * 2 <= 65536, row
        assert row["local"] == 0, row  # no spills


def test_nchw_map_passes_use_16_byte_accesses(sm90_streaming_kernels):
    """H*W = 196 and 49 are not multiples of 8: the NCHW map passes still move x-sized
    tensors in 16-byte vectors (LDG/STG.E.128, EF: evict-first), because they walk the
    flat run; the [N*C] vectors they gather (LDG.E, 4 bytes) are the only narrower loads."""
    rows = [row for row in sm90_streaming_kernels if row["layout"] == "nchw" and
            row["kernel"] in ("_scale_kernel", "_grad_input_kernel")]
    assert {row["shape"] for row in rows} == {"32x256x56x56", "32x672x14x14", "32x2048x7x7"}
    for row in rows:
        assert set(row["accesses"]) == {"LDG.E", "LDG.E.EF.128", "STG.E.EF.128"}, row


def test_nchw_reduction_passes_use_16_byte_loads(sm90_streaming_kernels):
    """H*W = 196 and 49: the NCHW reduction passes load each row's aligned body in 16-byte
    vectors (LDG.E.EL.128; EL: evict-last, for the map pass's re-read), and only its head
    and tail, fewer than 8 elements each, in 2-byte loads: one [BLOCK_C, 16] tile per
    x-sized operand (x; grad_out, out and x backward), spread over the program's threads.
    The 4-byte LDG.E are the [N*C] zmax loads of the backward."""
    rows = [row for row in sm90_streaming_kernels if row["layout"] == "nchw" and
            row["kernel"] in ("_pool_kernel", "_grad_reduce_kernel")
            and row["shape"] in ("32x672x14x14", "32x2048x7x7")]
    assert len(rows) == 4, rows
    for row in rows:
        backward = row["kernel"] == "_grad_reduce_kernel"
        assert set(row["accesses"]) == ({"LDG.E"} if backward else set()) | {
            "LDG.E.EL.128", "LDG.E.EL.U16", "STG.E"}, row
        operands = 3 if backward else 1
        edge_loads = 2 * row["vec"] * row["block_c"] // (32 * row["warps"])
        assert row["vec"] == 8 and row["counts"]["LDG.E.EL.U16"] <= operands * edge_loads, row
