"""Chooses the backend that runs each SE call, and explains the choice.

Every backend declares what it supports (SUPPORTED_DEVICES, SUPPORTED_DTYPES, the least CUDA
compute capability, overall and per dtype); not_supported_reasons checks those declarations
for every backend in one place and adds what only the backend can know (whether its kernels
were built or can be imported). An empty list of reasons means the backend will run the
call. With backend="auto" the first willing backend in the call's preference order runs;
the order comes from a fixed rule on the call's device (see `ranking`),
never from timing the call. An explicit name, or the SE_KERNELS_BACKEND environment
variable when backend="auto", must be willing or the call fails with the backend's
reasons. While torch.onnx.export traces a model, every call runs the "torch" backend,
whose operators ONNX has. The call itself was validated once already, when it was made
(se_kernels.call.make_call). DESIGN.md §4 has the rules.
"""

from __future__ import annotations

import abc
import os
import sys

import torch

from . import _compat
from ._ops import DTYPES
from .call import SECall

BACKEND_ENV = "SE_KERNELS_BACKEND"


def constant_under_compile(fn):
    """Marks `fn`, a fact fixed for the life of the process (what was built, what the GPU
    is), as a constant to torch.compile: it calls `fn` once while tracing and bakes in the
    result (tests/test_ops.py compiles through it)."""
    return _compat.mark_constant_under_compile(fn)

class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend refused the call."""


@constant_under_compile
def cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


class Backend(abc.ABC):
    """A way to run SE calls. Subclasses declare what they support in the SUPPORTED_*
    attributes and say in unavailable() and call_refusals() what the declarations cannot."""

    name: str
    SUPPORTED_DEVICES: tuple[str, ...] | None = None  # device types; None: any device
    SUPPORTED_DTYPES: tuple[torch.dtype, ...] = DTYPES
    # Option argument -> the names of it this backend computes. Declared by each backend,
    # never inherited, so that a name new to se_kernels.options is refused, with the reason,
    # by every backend that has not implemented it yet.
    SUPPORTED_OPTIONS: dict[str, tuple[str, ...]]
    # Whether schedule_trace can plan this backend's GPU schedule (se-kernels plan).
    PLANS_SCHEDULE = False
    CUDA_MINIMUM_COMPUTE_CAPABILITY: tuple[int, int] | None = None
    CUDA_DTYPE_MINIMUM_CAPABILITY: dict[torch.dtype, tuple[int, int]] = {}

    def devices_text(self) -> str:
        """What "this backend runs ..." ends with in a device refusal."""
        return f"{' or '.join(self.SUPPORTED_DEVICES)} tensors"

    def unavailable(self) -> list[str]:
        """Why this backend cannot run anything in this process (e.g. a missing package)."""
        return []

    def checks_cuda_capability(self, call: SECall) -> bool:
        """Whether the CUDA capability declarations apply to `call`."""
        return True

    def call_refusals(self, call: SECall) -> list[str]:
        """Reasons to refuse `call` beyond the declarations."""
        return []

    def refusals(self, call: SECall) -> list[str]:
        """Why this backend cannot run `call`; empty when it can."""
        return not_supported_reasons(self, call)

    @abc.abstractmethod
    def run(self, call: SECall) -> torch.Tensor:
        """The SE output for `call`, differentiable with respect to its tensors."""

    def stream_ops(self, device_type: str) -> dict | None:
        """This backend's stream ops (se_kernels._stream_ops: the four, and the act tail's
        where it has them) by name, for tensors of `device_type`, or None when it has none
        there."""
        return None

    def linear_form_ops(self, device_type: str) -> dict | None:
        """This backend's se_kernels::linear_form_forward and linear_form_forward_saved
        (se_kernels._form_ops: whose autograd formula is linear_form_backward) as
        {"forward": op, "saved": op} for tensors of `device_type`, or None: the staged path
        of a linear form in one op each way."""
        return None

    def staged_refusals(self, call) -> list[str]:
        """Reasons to refuse a staged call (se_kernels.staged, se_kernels.tail)."""
        device = call.x.device.type
        ops = self.stream_ops(device)
        if ops is None:
            return [f"no stream kernels for {device} tensors, which the staged "
                    f"excitation forms run on"]
        missing = [name for name in getattr(call, "STREAM_OPS", ()) if name not in ops]
        if missing:
            return [f"no {', '.join(missing)} kernels for {device} tensors, which "
                    f"{call.STREAM_OPS_USER} runs on"]
        return []

    def run_staged(self, call):
        """(out, normalization statistics or None) of a staged call (se_kernels.staged,
        se_kernels.tail), differentiable."""
        return call.stream_forward(self)

    def schedule_trace(self, call, gpu, backward: bool) -> list:
        """The launches, with the bytes each touches in order, of the forward (or backward)
        of `call` (a se_kernels.schedule.PlanCall) on `gpu` (a GpuProfile), from the
        backend's own planning code, without a GPU: se_kernels.schedule.Launch records."""
        from .schedule import PlanUnavailable
        raise PlanUnavailable(f"the {self.name} backend has no GPU schedule to plan")


def not_supported_reasons(backend: Backend, call: SECall) -> list[str]:
    """Every backend's declarations checked against `call`, then its own reasons."""
    reasons = backend.unavailable()
    if reasons:
        return reasons
    device, dtype = call.x.device, call.x.dtype
    if backend.SUPPORTED_DEVICES is not None and device.type not in backend.SUPPORTED_DEVICES:
        return [f"x is on {device.type}; this backend runs {backend.devices_text()}"]
    if dtype not in backend.SUPPORTED_DTYPES:
        reasons.append(f"dtype {dtype} is not supported")
    for argument in call.KERNEL_OPTIONS:
        value, supported = getattr(call, argument), backend.SUPPORTED_OPTIONS[argument]
        if value not in supported:
            reasons.append(f"{argument} {value!r} is not implemented here (this backend has "
                           f"{', '.join(map(repr, supported))})")
    if device.type == "cuda" and backend.checks_cuda_capability(call):
        capability = cuda_capability(device.index or 0)
        have = f"this GPU is {capability[0]}.{capability[1]}"
        least = backend.CUDA_MINIMUM_COMPUTE_CAPABILITY
        if least is not None and capability < least:
            reasons.append(f"{backend.name} needs an NVIDIA GPU of compute capability "
                           f"{least[0]}.{least[1]} or newer, {have}")
        elif capability < backend.CUDA_DTYPE_MINIMUM_CAPABILITY.get(dtype, (0, 0)):
            least = backend.CUDA_DTYPE_MINIMUM_CAPABILITY[dtype]
            reasons.append(f"{str(dtype).removeprefix('torch.')} needs compute capability "
                           f"{least[0]}.{least[1]} or newer, {have}")
    reasons += backend.call_refusals(call)
    if not isinstance(call, SECall):
        reasons += backend.staged_refusals(call)
    return reasons


_REGISTRY: dict[str, Backend] = {}


_registrations = 0


def register(backend: Backend) -> Backend:
    global _registrations
    _REGISTRY[backend.name] = backend
    _registrations += 1
    return backend


def generation() -> int:
    """How many registrations have been made: a choice of backend made under an earlier
    count may no longer be auto's."""
    return _registrations


def backend_names() -> list[str]:
    return list(_REGISTRY)


def get_backend(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(map(repr, _REGISTRY))}, "
                         f"got {name!r}")
    return _REGISTRY[name]


# auto's rule on CPU tensors, and the table it rests on: the fused kernel measured 0.995x
# eager or better on every SE layer of the four networks at batch 8, forward, on one and two
# threads, and nowhere was the torch backend ahead of it while it was below 0.95x eager
# (tests/test_dispatch.py checks the rule against this table).
CPU_RULE_SOURCE = "benchmarks/results/cpu-amd-epyc-2026-11-30-164639.md"


def preference(call: SECall) -> list[str]:
    """Backends auto tries for `call`, in order (`ranking` says why)."""
    if call.x.device.type == "cuda":
        return ["triton", "cuda", "torch"]
    # Triton on CPU tensors is the interpreter, a testing tool: only when asked for by name.
    return ["cpu", "torch"]


def ranking(call: SECall) -> tuple[list[str], str]:
    """auto's order of backends for `call`, fastest first, and the rule that set it."""
    order = preference(call)
    if call.x.device.type == "cuda":
        # Neither GPU backend has been timed on a GPU yet (benchmarks/gpu_check.sh does
        # it), so Triton goes first: its kernels' semantics are the interpreter's, which CI
        # checks against the reference; the CUDA kernels are checked only by an emulator.
        # Replace with the measured per-shape-class order once there are GPU results.
        return order, "CUDA tensors: triton, then cuda, then torch (no GPU timing has set an order yet)"
    return order, f"CPU: the fused kernel, at 0.95x eager or better on every layer of {CPU_RULE_SOURCE}"


class Explanation(dict):
    """explain()'s answer: a dict of every registered backend's reasons for refusing the
    call (an empty list: it would run it), with what backend="auto" picks (`auto`, None when
    nothing can run it) and why (`why`)."""

    def __init__(self, refusals: dict[str, list[str]], auto: str | None, why: str):
        super().__init__(refusals)
        self.auto = auto
        self.why = why

    def __repr__(self) -> str:
        return f"Explanation(auto={self.auto!r}, why={self.why!r}, refusals={dict.__repr__(self)})"


def explain(call: SECall) -> Explanation:
    """Every registered backend's reasons for refusing `call`, and auto's choice with its
    reason."""
    refusals = {name: backend.refusals(call) for name, backend in _REGISTRY.items()}
    order, why = ranking(call)
    order = [name for name in order if name in refusals]
    auto = next((name for name in order if not refusals[name]), None)
    passed = order[:order.index(auto)] if auto else order
    return Explanation(refusals, auto, "; ".join(
        [why, *(f"{name!r} refuses: {'; '.join(refusals[name])}" for name in passed)]))


def exporting_to_onnx() -> bool:
    """Whether torch.onnx.export is tracing the model, with either exporter (dynamo=True or
    False). Both trace: the TorchScript exporter with torch.jit.trace, the dynamo exporter
    with torch.export; outside a trace nothing is exported, and the ONNX flags (slower to
    read than a whole batch-1 kernel's Python entry should spend) are not read. torch.onnx
    is imported by then, so a process that never imported it is not exporting, and
    `import se_kernels` need not import it."""
    if not (torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or torch.jit.is_tracing()):
        return False
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def select(call: SECall, backend: str = "auto") -> Backend:
    if exporting_to_onnx():
        # ONNX has no fused SE op: the model is exported through the torch backend,
        # which is made of standard ONNX operators, whatever backend the call names.
        return _REGISTRY["torch"]
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
