"""Every Triton kernel compiles for sm_80 and sm_90, and torch.compile's GPU path traces
the ops into kernel launches, all without a GPU: the interpreter accepts code that the
compiler rejects (non-constexpr globals, loop-carried type changes, ...). Both run in a
fresh process without TRITON_INTERPRET."""

from __future__ import annotations

import ast

import pytest
import torch

from se_kernels.backends.triton import heuristics
from se_kernels.backends.triton import ops as triton_ops

from helpers import Case
from triton_support import forward_args, pythonpath_with_tests, run_python_with


_PTX_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
              torch.float64: "fp64", torch.int32: "i32"}


def _record_launches(module, case: Case) -> list:
    launches = []
    module._launch = lambda kernel, programs, *args, **meta: launches.append((kernel, args, meta))
    module.device_profile = lambda device: heuristics.GPU_PROFILE
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


@pytest.mark.parametrize("capability", [80, 90])
def test_kernels_compile_for_gpus(driver, capability):
    """In a fresh process without the interpreter (triton's own helpers are interpreted
    functions in a process that set TRITON_INTERPRET=1)."""
    try:
        from triton.backends import backends
    except ImportError as error:
        pytest.skip(f"this triton cannot compile ahead of time: {error}")
    if "nvidia" not in backends:
        pytest.skip("this triton build has no NVIDIA backend")
    out = run_python_with(f"import test_triton_compile\n"
                          f"print(test_triton_compile.compile_kernels_ahead_of_time({capability}))",
                          {"TRITON_INTERPRET": None, "PYTHONPATH": pythonpath_with_tests()})
    names = ast.literal_eval(out.strip().splitlines()[-1])
    assert len(names) == 9, names  # every kernel of forward and backward


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
    code = run_python_with(
        "import test_triton_compile\nprint(repr(test_triton_compile.trace_gpu_graph()))",
        {"TRITON_INTERPRET": None, "PYTHONPATH": pythonpath_with_tests()})
    code = ast.literal_eval(code.strip().splitlines()[-1])
    assert code.count("triton_kernel_wrapper_functional(") == 9, code
    assert "se_forward_triton" not in code and "se_backward_triton" not in code
