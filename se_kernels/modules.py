"""SqueezeExcitation: a drop-in for torchvision.ops.SqueezeExcitation on the fused kernels."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .functional import squeeze_excitation
from .options import (ACTIVATION_CLASSES, AVG, GATE_CLASSES, NAMES, check_choice, module_option,
                      normalize_out_activation)

# Symbolic tracing (torch.fx) records the fused op as one call instead of tracing into its
# argument checks, which cannot run on proxies.
torch.fx.wrap("squeeze_excitation")


def op_name(argument: str, option: str, module: nn.Module, classes: dict) -> str:
    """The op's name for an activation module, e.g. nn.ReLU() -> "relu"."""
    name = module_option(module, classes)
    if name is None:
        raise ValueError(f"{argument} must make a module computing one of the {option}s "
                         f"({', '.join(NAMES[option])}); {module!r} computes none of them")
    return name


class SqueezeExcitation(nn.Module):
    """Squeeze-and-Excitation block (Hu et al. 2018), as torchvision.ops.SqueezeExcitation:
    same constructor, submodules (fc1, fc2 as 1x1 Conv2d with bias) and state_dict.

    forward(x, residual=None) returns out_activation(scale * x + residual), where
    scale = scale_activation(fc2(activation(fc1(pool(x))))). With no residual and no
    out_activation it equals torchvision's module.

    Args:
        input_channels: C.
        squeeze_channels: S, the hidden width.
        activation: nn.ReLU, nn.SiLU, nn.GELU (either `approximate`) or nn.Hardswish, or
            timm's module for one of these (class or callable making the module).
        scale_activation: nn.Sigmoid, nn.Hardsigmoid, nn.Tanh or nn.ReLU, or timm's.
        pool: "avg" (torchvision), "max" or "avgmax" (timm's add_maxpool).
        out_activation: None or "relu", applied after the residual add.
        backend: see se_kernels.dispatch.
    """

    def __init__(
        self,
        input_channels: int,
        squeeze_channels: int,
        activation: Callable[..., nn.Module] = nn.ReLU,
        scale_activation: Callable[..., nn.Module] = nn.Sigmoid,
        *,
        pool: str = AVG,
        out_activation: str | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if squeeze_channels < 1:
            raise ValueError(f"squeeze_channels must be >= 1, got {squeeze_channels}")
        if input_channels < 1:
            raise ValueError(f"input_channels must be >= 1, got {input_channels}")
        check_choice("pool", pool)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()
        self._activation_name = op_name("activation", "activation", self.activation,
                                        ACTIVATION_CLASSES)
        self._gate_name = op_name("scale_activation", "gate", self.scale_activation, GATE_CLASSES)
        self.pool = pool
        self.out_activation = normalize_out_activation(out_activation)
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        fc1, fc2 = self.fc1, self.fc2  # each submodule lookup is a Module.__getattr__ call
        return squeeze_excitation(
            x, fc1.weight, fc1.bias, fc2.weight, fc2.bias,
            activation=self._activation_name, gate=self._gate_name, pool=self.pool,
            residual=residual, out_activation=self.out_activation, backend=self.backend)

    def extra_repr(self) -> str:
        return f"pool={self.pool!r}, out_activation={self.out_activation!r}, backend={self.backend!r}"
