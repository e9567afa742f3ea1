"""The implementations an SE block is timed with, all holding the same weights:

  eager        torchvision.ops.SqueezeExcitation, as networks use it
  compile      torch.compile of it (mode "default")
  compile-max  torch.compile of it (mode "max-autotune-no-cudagraphs": max-autotune's kernel
               search without CUDA graphs, which in an isolated block would add a copy of
               every fresh input into the graph's static buffer; our kernels run without
               graphs too)
  <backend>    se_kernels.SqueezeExcitation(backend=<backend>) for each se_kernels backend
               ("cuda", "triton", "cpu", "torch", ...) willing to run the block here
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

import se_kernels
from se_kernels import dispatch
from se_kernels.options import make_call
from se_kernels.vocabulary import TORCH_ACTIVATIONS, TORCH_GATES

from .shapes import SEShape

EAGER = "eager"
COMPILE_MODES = {"compile": "default", "compile-max": "max-autotune-no-cudagraphs"}
BASELINES = (EAGER, *COMPILE_MODES)


def eager_module(shape: SEShape, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from torchvision.ops import SqueezeExcitation

    module = SqueezeExcitation(shape.channels, shape.squeeze, shape.activation_module(),
                               shape.gate_module())
    return module.to(device=device, dtype=dtype)


def backend_refusals(name: str, x: torch.Tensor, eager: nn.Module) -> list[str]:
    """Why se_kernels backend `name` would not run this block (empty: it would)."""
    call = make_call(x, eager.fc1.weight, eager.fc1.bias, eager.fc2.weight, eager.fc2.bias,
                     activation=TORCH_ACTIVATIONS[type(eager.activation)],
                     gate=TORCH_GATES[type(eager.scale_activation)])
    return dispatch.explain(call).get(name, [f"no se_kernels backend is named {name!r}"])


def default_backends(x: torch.Tensor, eager: nn.Module) -> list[str]:
    """Our backends that dispatch would consider for x's device and that would run it, in
    dispatch's order (Triton on CPU tensors is its interpreter, a testing tool: only when
    named)."""
    call = make_call(x, eager.fc1.weight, eager.fc1.bias, eager.fc2.weight, eager.fc2.bias)
    return [name for name in dispatch.preference(call)
            if name in dispatch.backend_names() and not backend_refusals(name, x, eager)]


def build_peer(name: str, eager: nn.Module, shape: SEShape) -> nn.Module:
    if name == EAGER:
        return eager
    if name in COMPILE_MODES:
        return torch.compile(eager, mode=COMPILE_MODES[name], dynamic=False)
    ours = se_kernels.SqueezeExcitation(shape.channels, shape.squeeze, shape.activation_module(),
                                        shape.gate_module(), backend=name)
    ours = ours.to(device=eager.fc1.weight.device, dtype=eager.fc1.weight.dtype)
    ours.load_state_dict(eager.state_dict())
    return ours


def replayable_backward(name: str):
    """A context under which a compiled peer's backward may be run again on the same graph
    (bwd mode): AOTAutograd's donated buffers forbid retain_graph. They save memory, not
    time."""
    config = torch._functorch.config
    if name in COMPILE_MODES and hasattr(config, "donated_buffer"):
        return config.patch(donated_buffer=False)
    return contextlib.nullcontext()
