"""The "cpu" and "cuda" backends: the C++/CUDA kernels of the se_kernels._C extension,
reached through the se_kernels::se_forward / se_backward ops."""

from __future__ import annotations

import torch

from .. import _compat, _form_ops, _ops, _stream_ops, dispatch
from ..call import SECall
from ..options import (AVG, AVGMAX, GELU, GELU_TANH, HARDSIGMOID, HARDSWISH, LEAKY_RELU,
                       MAX, NONE, OUT_RELU, RELU, SIGMOID, SILU, TANH)

try:
    from .. import _C  # noqa: F401 - importing registers the kernels with the ops
    EXTENSION_ERROR: str | None = None
except ImportError as error:  # not built, or built against another torch
    EXTENSION_ERROR = f"{type(error).__name__}: {error}"

try:
    from .._build_info import BUILD
except ImportError:
    BUILD = {"torch": None, "cpu_avx2": False, "cuda": False, "nvcc": None, "cuda_archs": []}


_KERNELS_FOUND: set[tuple[str, str]] = set()  # (op, device type)


def _kernel_registered(op: str, device_type: str) -> bool:
    """Whether a kernel for `device_type` is registered on `op`. A kernel, once registered,
    stays: that answer is remembered (asking the dispatcher costs more than a batch-1 call's
    Python entry should); a missing one is asked again each time, since a library loaded
    later (torch.ops.load_library) may register it."""
    if (op, device_type) in _KERNELS_FOUND:
        return True
    found = _compat.has_dispatch_kernel(op, {"cpu": "CPU", "cuda": "CUDA"}[device_type])
    if found:
        _KERNELS_FOUND.add((op, device_type))
    return found


def has_kernel(device_type: str) -> bool:
    """Whether a kernel for `device_type` is registered on se_kernels::se_forward."""
    return _kernel_registered("se_kernels::se_forward", device_type)


def cuda_arch_covered(capability: tuple[int, int], archs: list[str]) -> bool:
    """Whether code built for `archs` (sm_XY cubins, compute_XY PTX) runs on a GPU of
    `capability`: a cubin runs on its major version at an equal or higher minor (an
    arch-specific sm_XYa only on exactly XY); PTX is JIT-compiled for any newer GPU."""
    major, minor = capability
    for arch in archs:
        kind, _, num = arch.partition("_")
        specific = num.endswith("a")
        num = num.rstrip("a")
        a_major, a_minor = int(num[:-1]), int(num[-1])
        if kind == "sm" and a_major == major and (a_minor == minor if specific else a_minor <= minor):
            return True
        if kind == "compute" and not specific and (a_major, a_minor) <= (major, minor):
            return True
    return False


@dispatch.constant_under_compile
def has_stream_kernel(device_type: str) -> bool:
    """Whether the extension registered the stream ops for `device_type` (a library built
    from an older source has only the fused ones)."""
    return _kernel_registered("se_kernels::stream_map", device_type)


@dispatch.constant_under_compile
def has_act_stream_kernel(device_type: str) -> bool:
    """Whether the extension registered the act tail's stream ops for `device_type`."""
    return _kernel_registered("se_kernels::stream_act_map", device_type)


_WITH_ACT = {**_stream_ops.NATIVE, **_stream_ops.NATIVE_ACT}
# The linear forms' ops (se_kernels._form_ops), each of which a backend declaring them has.
_LINEAR_FORM_NAMES = ("se_kernels::linear_form_forward", "se_kernels::linear_form_forward_saved",
                      "se_kernels::linear_form_backward")


@dispatch.constant_under_compile
def build_refusals(device_type: str, device_index: int) -> tuple[str, ...]:
    """Why no compiled kernel can run on this device. The kernels come from se_kernels._C or
    from a library built with CMakeLists.txt and loaded with torch.ops.load_library; the
    answer is fixed once they are loaded, so torch.compile evaluates it instead of tracing."""
    if not has_kernel(device_type):
        if EXTENSION_ERROR is not None:
            return (f"the compiled extension se_kernels._C is not available ({EXTENSION_ERROR})",)
        return (f"se_kernels._C was built without {device_type} kernels",)
    if device_type == "cuda" and EXTENSION_ERROR is None:  # a CMake build records no archs
        major, minor = torch.cuda.get_device_capability(device_index)
        if not cuda_arch_covered((major, minor), BUILD["cuda_archs"]):
            return (f"se_kernels._C has no code for sm_{major}{minor} (built for "
                    f"{', '.join(BUILD['cuda_archs'])}; rebuild with "
                    f"TORCH_CUDA_ARCH_LIST={major}.{minor})",)
    return ()


def _planning_op(name: str):
    """The op se_kernels::`name` from the compiled extension (PlanUnavailable if missing)."""
    from ..schedule import PlanUnavailable

    if EXTENSION_ERROR is not None:
        raise PlanUnavailable(f"the cuda plan needs the compiled extension: {EXTENSION_ERROR}")
    try:
        return getattr(torch.ops.se_kernels, name)
    except (AttributeError, RuntimeError):
        raise PlanUnavailable(f"the loaded extension se_kernels._C has no {name} op: "
                              "rebuild it from this source") from None


def cuda_schedule_op():
    """se_kernels::cuda_schedule: the plan of an SE call."""
    return _planning_op("cuda_schedule")


def cuda_stream_schedule_op():
    """se_kernels::cuda_stream_schedule: the plan of a stream op's call."""
    return _planning_op("cuda_stream_schedule")


def _recording_stream_ops(calls: list) -> dict:
    """The stream ops on fake tensors, each appending its call, as {argument or output name:
    value} (_stream_ops.named), to `calls`."""
    def recording(name: str):
        def record(*args):
            outputs = _stream_ops.FAKES[name](*args)
            calls.append((name, _stream_ops.named(name, args, outputs)))
            return outputs
        return record
    return {name: recording(name) for name in (*_stream_ops.SCHEMAS, *_stream_ops.ACT_SCHEMAS)}


def plan_stream_call(name: str, call: dict, sm_count: int) -> list:
    """The launches that se_kernels::cuda_stream_schedule plans for one call of the stream
    op `name`, given as {argument or output name: value} (_stream_ops.named), on a device
    of `sm_count` SMs, in the layout the kernels take; its x-sized tensors are named by the
    op's arguments (x, out, ...)."""
    from ..schedule import decode_cuda_trace

    given = [key for key, value in call.items()
             if isinstance(value, torch.Tensor) and value.numel()]
    if call.get("out_activation") == OUT_RELU:
        given.append("relu")
    x = call["x"]
    channels_last = _ops.kernel_memory_format(x) == torch.channels_last
    return decode_cuda_trace(cuda_stream_schedule_op()(
        name, x.shape[0], x.shape[1], x.shape[2] * x.shape[3], x.element_size(), channels_last,
        given, sm_count))


def _stream_path_trace(call, gpu, backward: bool) -> list:
    """The launches of a staged or tail call (se_kernels.stream_schedule), each stream op's
    call planned as the kernels plan it, its tensors under their plan names; each call's
    scratch lies after the previous one's."""
    from ..schedule import STREAMS
    from ..stream_schedule import run_passes, storage

    forward_calls, backward_calls = [], []
    names = run_passes(call, _recording_stream_ops(forward_calls),
                       _recording_stream_ops(backward_calls))
    launches, scratch_at = [], 0
    for name, bound in backward_calls if backward else forward_calls:
        trace = plan_stream_call(name, bound, gpu.sm_count)
        for launch in trace:
            launch.accesses = [
                a._replace(tensor=names[storage(bound[a.tensor])]) if a.tensor in STREAMS
                else a._replace(offset=scratch_at + a.offset) if a.tensor == "scratch" else a
                for a in launch.accesses]
        launches += trace
        scratch_at = max([scratch_at] + [a.offset + a.nbytes for launch in trace
                                         for a in launch.accesses if a.tensor == "scratch"])
    return launches


class NativeBackend(dispatch.Backend):
    """Every dtype and layout on its device; the CUDA kernels' archs are checked against the
    GPU (build_refusals) rather than declared."""

    # What the C++ kernels' exhaustive switches over csrc/se_options.h compute.
    SUPPORTED_OPTIONS = {"activation": (RELU, SILU, GELU, GELU_TANH, HARDSWISH, LEAKY_RELU),
                         "gate": (SIGMOID, HARDSIGMOID, TANH, RELU),
                         "pool": (AVG, MAX, AVGMAX), "out_activation": (NONE, OUT_RELU)}

    def __init__(self, device_type: str):
        self.name = device_type
        self.SUPPORTED_DEVICES = (device_type,)
        self.PLANS_SCHEDULE = device_type == "cuda"

    def call_refusals(self, call: SECall) -> list[str]:
        device = call.x.device
        return list(build_refusals(device.type, device.index or 0))

    def run(self, call: SECall) -> torch.Tensor:
        return _ops.run_forward(_ops.se_forward, call)

    def stream_ops(self, device_type: str) -> dict | None:
        if device_type != self.name or not has_stream_kernel(device_type):
            return None
        # The act tail's ops (DESIGN.md §1.5), where the extension registered them.
        return _stream_ops.as_called_now(
            _WITH_ACT if has_act_stream_kernel(device_type) else _stream_ops.NATIVE)

    def linear_form_ops(self, device_type: str) -> dict | None:
        # The extension has these ops' kernels on CPU only; on a GPU the stream ops serve.
        if device_type != self.name or device_type != "cpu" or not (
                _kernel_registered(_LINEAR_FORM_NAMES[0], "cpu")
                and _kernel_registered(_LINEAR_FORM_NAMES[1], "cpu")
                and _kernel_registered(_LINEAR_FORM_NAMES[2], "cpu")):
            return None
        return _form_ops.LINEAR_FORM_OPS

    def schedule_trace(self, call, gpu, backward: bool) -> list:
        """The cuda kernels' plan (csrc/cuda/se_plan.h; for the stream ops of a staged or
        tail call, se_stream_plan.h), through the extension's cuda_schedule and
        cuda_stream_schedule ops, which run the same planning code as a call."""
        if not self.PLANS_SCHEDULE:
            return super().schedule_trace(call, gpu, backward)
        from ..schedule import FUSED, decode_cuda_trace

        if call.path != FUSED:
            return _stream_path_trace(call, gpu, backward)
        codes = cuda_schedule_op()(call.n, call.c, call.p, call.squeeze, call.element_size,
                                   call.channels_last, call.residual, call.pool, call.out_relu,
                                   backward, gpu.sm_count, gpu.l2_bytes)
        return decode_cuda_trace(codes)


dispatch.register(NativeBackend("cuda"))
dispatch.register(NativeBackend("cpu"))
