"""Chooses the backend that runs each SE call, and explains the choice.

Every backend states why it refuses a call (an empty list means it will run it). With
backend="auto" the first willing backend in the device's preference order runs; an
explicit name, or the SE_KERNELS_BACKEND environment variable when backend="auto",
must be willing or the call fails with the backend's reasons.
"""

from __future__ import annotations

import abc
import os

import torch

from .options import SECall

BACKEND_ENV = "SE_KERNELS_BACKEND"


def constant_under_compile(fn):
    """Mark `fn` as torch.compiler.assume_constant_result does: torch.compile calls it once
    while tracing and bakes in the result, instead of tracing into it. For facts fixed for
    the life of the process (what was built, what the GPU is). This sets the marker
    directly because the public decorator imports torch._dynamo, which would add seconds
    to `import se_kernels`; tests/test_ops.py compiles through it."""
    fn._dynamo_marked_constant = True
    return fn


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend refused the call."""


class Backend(abc.ABC):
    name: str

    @abc.abstractmethod
    def refusals(self, call: SECall) -> list[str]:
        """Why this backend cannot run `call`; empty when it can."""

    @abc.abstractmethod
    def run(self, call: SECall) -> torch.Tensor:
        """The SE output for `call`, differentiable with respect to its tensors."""


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def backend_names() -> list[str]:
    return list(_REGISTRY)


def get_backend(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(map(repr, _REGISTRY))}, "
                         f"got {name!r}")
    return _REGISTRY[name]


def preference(call: SECall) -> list[str]:
    """Backends to try for `call`, fastest first."""
    if call.x.device.type == "cuda":
        # Neither GPU backend has been timed on a GPU yet (benchmarks/gpu_check.sh does
        # it), so Triton goes first: its kernels' semantics are the interpreter's, which CI
        # checks against the reference; the CUDA kernels are checked only by an emulator.
        # Replace with the measured per-shape-class order once there are GPU results.
        return ["triton", "cuda", "torch"]
    # Triton on CPU tensors is the interpreter, a testing tool: only when asked for by name.
    return ["cpu", "torch"]


def explain(call: SECall) -> dict[str, list[str]]:
    """Every registered backend's reasons for refusing `call` (empty: it would run it)."""
    return {name: backend.refusals(call) for name, backend in _REGISTRY.items()}


def select(call: SECall, backend: str = "auto") -> Backend:
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV) or "auto"
    if backend != "auto":
        chosen = get_backend(backend)
        reasons = chosen.refusals(call)
        if reasons:
            raise BackendUnavailableError(
                f"se_kernels backend {backend!r} cannot run this call: " + "; ".join(reasons))
        return chosen
    tried = {}
    for name in preference(call):
        candidate = _REGISTRY.get(name)
        if candidate is None:
            continue
        reasons = candidate.refusals(call)
        if not reasons:
            return candidate
        tried[name] = reasons
    raise BackendUnavailableError(
        "no se_kernels backend can run this call: "
        + "; ".join(f"{name}: {', '.join(r)}" for name, r in tried.items()))
