"""What the Triton backend's tests share: the device its tests run on, the op arguments of
a case, and a subprocess runner for the tests that need a process without the interpreter."""

from __future__ import annotations

import os

import pytest
import torch

from se_kernels.backends.triton import ops as triton_ops

from helpers import Case, backend_device, make_inputs, run_python

DEVICE = backend_device("triton")
cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

RESNET50_STAGES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]  # (C, H = W)


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


def run_python_with(code: str, env_changes: dict[str, str | None]) -> str:
    """`python -c code` with environment variables set (None: removed); its stdout."""
    env = dict(os.environ)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    done = run_python("-c", code, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def pythonpath_with_tests() -> str:
    """PYTHONPATH for a subprocess that imports these test modules, and se_kernels from this
    checkout (not another one installed in the environment)."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    return os.pathsep.join(filter(None, [tests_dir, os.path.dirname(tests_dir),
                                         os.environ.get("PYTHONPATH")]))
