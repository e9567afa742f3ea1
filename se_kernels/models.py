"""SE-ResNet (Hu et al. 2018) on torchvision's ResNet, with the block's residual add and
final ReLU fused into the SE op: out = relu(se_scale(branch) * branch + identity), forward
and backward, in one pass over the activations (the paper authors' "Axpy" fusion).

The SE block can sit where the paper's integration ablation (TPAMI version, Tables 14-15)
puts it; INTEGRATIONS names them:
  standard   SE on the residual branch, before the addition: relu(se(branch) + identity),
             the residual add and ReLU fused into the SE op
  pre        SE on the unit's input, before the residual unit: relu(unit(se(x)) + identity)
  post       SE after the addition and ReLU: se(relu(unit(x) + identity))
  identity   SE on the identity branch, parallel to the unit: relu(se(identity) + unit(x)),
             fused as the standard one with the roles of x and the residual swapped
  after_3x3  SE on the 3x3 convolution's output, inside the unit (C = the unit's width)

torchvision supplies the ResNet body and is imported by the builders only: it is an extra
(`pip install torchvision`), not a requirement of se_kernels.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

from .modules import SqueezeExcitation
from .options import OUT_RELU

__all__ = ["INTEGRATIONS", "SEBottleneck", "se_resnet50", "se_resnet101", "se_resnet152"]

INTEGRATIONS = ("standard", "pre", "post", "identity", "after_3x3")


def squeeze_channels(channels: int, reduction: int) -> int:
    """The SE hidden width C // r of SE-ResNet."""
    if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
        raise ValueError(f"reduction must be a positive int, got {reduction!r}")
    if channels // reduction < 1:
        raise ValueError(f"reduction={reduction} leaves no squeeze channels for {channels} "
                         f"channels (C // reduction must be >= 1)")
    return channels // reduction


def check_integration(integration: str) -> None:
    if integration not in INTEGRATIONS:
        raise ValueError(f"integration must be one of {', '.join(map(repr, INTEGRATIONS))}, "
                         f"got {integration!r}")


class SEBottleneck(nn.Module):
    """torchvision's ResNet Bottleneck (v1.5: stride on the 3x3 conv) with an SE block.

    Same constructor and child names as torchvision.models.resnet.Bottleneck, plus `se`
    (fc1, fc2) with C // reduction hidden channels. `integration` (module docstring) says
    where: by default after bn3 (C = planes * 4), where it also computes the residual add
    and the block's last ReLU.
    """

    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
        *,
        reduction: int = 16,
        integration: str = "standard",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_integration(integration)
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        channels = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=dilation, groups=groups,
                               dilation=dilation, bias=False)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, channels, 1, bias=False)
        self.bn3 = norm_layer(channels)
        self.relu = nn.ReLU(inplace=True)
        se_channels = {"pre": inplanes, "after_3x3": width}.get(integration, channels)
        fused_tail = integration in ("standard", "identity")  # the op adds and applies the ReLU
        self.se = SqueezeExcitation(se_channels, squeeze_channels(se_channels, reduction),
                                    out_activation=OUT_RELU if fused_tail else None,
                                    backend=backend)
        self.integration = integration
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.se(x) if self.integration == "pre" else x
        out = self.relu(self.bn1(self.conv1(out)))
        out = self.relu(self.bn2(self.conv2(out)))
        if self.integration == "after_3x3":
            out = self.se(out)
        out = self.bn3(self.conv3(out))
        if self.integration == "standard":
            return self.se(out, residual=identity)
        if self.integration == "identity":
            return self.se(identity, residual=out)
        out = self.relu(out + identity)
        return self.se(out) if self.integration == "post" else out

    def extra_repr(self) -> str:
        return f"integration={self.integration!r}"


def _se_resnet(layers: list[int], reduction: int, integration: str, backend: str,
               kwargs: dict[str, Any]) -> nn.Module:
    try:
        from torchvision.models.resnet import ResNet
    except ImportError as error:
        raise ImportError(
            "se_kernels.models builds on torchvision's ResNet, which is not installed: "
            "pip install torchvision (or se-kernels[test])") from error
    if "weights" in kwargs:
        raise TypeError("se_resnet builders take no weights= (torchvision has no SE-ResNet "
                        "weights); load a state_dict instead, e.g. one of timm's seresnet")
    zero_init_residual = kwargs.pop("zero_init_residual", False)
    check_integration(integration)
    # Fail before building anything: the narrowest SE sees the stem's 64 channels (pre) or
    # the first stage's width (after_3x3), else the first stage's output.
    narrowest = 64 if integration in ("pre", "after_3x3") else 64 * SEBottleneck.expansion
    squeeze_channels(narrowest, reduction)
    # ResNet reads block.expansion and calls block(inplanes, planes, ...): a partial that
    # carries the SE options and the expansion serves as the block class.
    block = functools.partial(SEBottleneck, reduction=reduction, integration=integration,
                              backend=backend)
    block.expansion = SEBottleneck.expansion
    model = ResNet(block, layers, **kwargs)
    if zero_init_residual:  # ResNet's own loop only knows its Bottleneck class
        for m in model.modules():
            if isinstance(m, SEBottleneck) and m.bn3.weight is not None:
                nn.init.zeros_(m.bn3.weight)
    return model


def se_resnet50(reduction: int = 16, *, integration: str = "standard", backend: str = "auto",
                **kwargs: Any) -> nn.Module:
    """SE-ResNet-50: torchvision's resnet50 with SE (C // reduction hidden channels) in every
    bottleneck, by default after the last BN with the residual add and ReLU fused into it
    (`integration`: see INTEGRATIONS). kwargs go to torchvision.models.resnet.ResNet
    (num_classes, zero_init_residual, groups, width_per_group, replace_stride_with_dilation,
    norm_layer). The standard model's state_dict keys are those of timm's seresnet50."""
    return _se_resnet([3, 4, 6, 3], reduction, integration, backend, kwargs)


def se_resnet101(reduction: int = 16, *, integration: str = "standard", backend: str = "auto",
                 **kwargs: Any) -> nn.Module:
    """SE-ResNet-101; see se_resnet50."""
    return _se_resnet([3, 4, 23, 3], reduction, integration, backend, kwargs)


def se_resnet152(reduction: int = 16, *, integration: str = "standard", backend: str = "auto",
                 **kwargs: Any) -> nn.Module:
    """SE-ResNet-152; see se_resnet50."""
    return _se_resnet([3, 8, 36, 3], reduction, integration, backend, kwargs)
