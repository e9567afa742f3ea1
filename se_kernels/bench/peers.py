"""The implementations an SE block is timed with, all holding the same weights:

  eager        torchvision.ops.SqueezeExcitation, as networks use it
  compile      torch.compile of it (mode "default")
  compile-max  torch.compile of it (mode "max-autotune-no-cudagraphs": max-autotune's kernel
               search without CUDA graphs, which in an isolated block would add a copy of
               every fresh input into the graph's static buffer; our kernels run without
               graphs too)
  auto         se_kernels.SqueezeExcitation(backend="auto"): what a converted model runs,
               whichever backend dispatch picks for the block (for a staged form, the
               network's own module converted by convert_se_modules)
  <backend>    se_kernels.SqueezeExcitation(backend=<backend>) for each se_kernels backend
               ("cuda", "triton", "cpu", "torch", ...) willing to run the block here
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

import se_kernels
from se_kernels import _compat, dispatch
from se_kernels.call import make_call
from se_kernels.convert import convert_se_modules
from se_kernels.options import ACTIVATION_CLASSES, GATE_CLASSES, module_option

from .shapes import SEShape

EAGER = "eager"
AUTO = "auto"
COMPILE_MODES = {"compile": "default", "compile-max": "max-autotune-no-cudagraphs"}
BASELINES = (EAGER, *COMPILE_MODES)


def eager_module(shape: SEShape, device: torch.device, dtype: torch.dtype) -> nn.Module:
    if shape.module is not None:  # a staged form: the network's own module
        return shape.module(device).to(dtype=dtype)
    from torchvision.ops import SqueezeExcitation

    module = SqueezeExcitation(shape.channels, shape.squeeze, shape.activation_module(),
                               shape.gate_module())
    return module.to(device=device, dtype=dtype)


def _call(x: torch.Tensor, eager: nn.Module):
    if not hasattr(eager, "scale_activation"):  # a network's own module: as converted
        return convert_se_modules(copy.deepcopy(eager)).se_call(x)
    return make_call(x, eager.fc1.weight, eager.fc1.bias, eager.fc2.weight, eager.fc2.bias,
                     activation=module_option(eager.activation, ACTIVATION_CLASSES),
                     gate=module_option(eager.scale_activation, GATE_CLASSES))


def backend_refusals(name: str, x: torch.Tensor, eager: nn.Module) -> list[str]:
    """Why se_kernels backend `name` would not run this block (empty: it would); auto runs
    every block."""
    if name == AUTO:
        return []
    return dispatch.explain(_call(x, eager)).get(name, [f"no se_kernels backend is named {name!r}"])


def auto_choice(x: torch.Tensor, eager: nn.Module) -> str:
    """The backend backend="auto" runs this block on."""
    return dispatch.select(_call(x, eager)).name


def default_backends(x: torch.Tensor, eager: nn.Module) -> list[str]:
    """auto, then our backends that dispatch would consider for x's device and that would
    run it, in dispatch's order (Triton on CPU tensors is its interpreter, a testing tool:
    only when named)."""
    call = _call(x, eager)
    return [AUTO] + [name for name in dispatch.preference(call)
                     if name in dispatch.backend_names() and not backend_refusals(name, x, eager)]


def build_peer(name: str, eager: nn.Module, shape: SEShape) -> nn.Module:
    if name == EAGER:
        return eager
    if name in COMPILE_MODES:
        return torch.compile(eager, mode=COMPILE_MODES[name], dynamic=False)
    if shape.module is not None:
        return convert_se_modules(copy.deepcopy(eager), backend=name)
    ours = se_kernels.SqueezeExcitation(shape.channels, shape.squeeze, shape.activation_module(),
                                        shape.gate_module(), backend=name)
    ours = ours.to(device=eager.fc1.weight.device, dtype=eager.fc1.weight.dtype)
    ours.load_state_dict(eager.state_dict())
    return ours


def replayable_backward(name: str):
    """A context under which a compiled peer's backward may be run again on the same graph
    (bwd mode): AOTAutograd's donated buffers forbid retain_graph. They save memory, not
    time."""
    if name in COMPILE_MODES:
        return _compat.compiled_backward_replayable()
    return contextlib.nullcontext()
