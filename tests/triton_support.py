"""What the Triton backend's tests share: the device its tests run on, and a subprocess
runner for the tests that need a process without the interpreter."""

from __future__ import annotations

import os

import pytest

from helpers import backend_device, run_python

DEVICE = backend_device("triton")
cuda = pytest.mark.cuda

RESNET50_STAGES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]  # (C, H = W)


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
