"""SE-ResNet (Hu et al. 2018) on torchvision's ResNet, with the block's residual add and
final ReLU fused into the SE op: out = relu(se_scale(branch) * branch + identity), forward
and backward, in one pass over the activations (the paper authors' "Axpy" fusion).

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

__all__ = ["SEBottleneck", "se_resnet50", "se_resnet101", "se_resnet152"]


def squeeze_channels(channels: int, reduction: int) -> int:
    """The SE hidden width C // r of SE-ResNet."""
    if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
        raise ValueError(f"reduction must be a positive int, got {reduction!r}")
    if channels // reduction < 1:
        raise ValueError(f"reduction={reduction} leaves no squeeze channels for {channels} "
                         f"channels (C // reduction must be >= 1)")
    return channels // reduction


class SEBottleneck(nn.Module):
    """torchvision's ResNet Bottleneck (v1.5: stride on the 3x3 conv) with an SE after bn3.

    Same constructor and child names as torchvision.models.resnet.Bottleneck, plus `se`
    (fc1, fc2) with C = planes * 4 and C // reduction hidden channels, which also
    computes the residual add and the block's last ReLU.
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
        backend: str = "auto",
    ) -> None:
        super().__init__()
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
        self.se = SqueezeExcitation(channels, squeeze_channels(channels, reduction),
                                    out_activation=OUT_RELU, backend=backend)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.se(out, residual=identity)


def _se_resnet(layers: list[int], reduction: int, backend: str, kwargs: dict[str, Any]) -> nn.Module:
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
    squeeze_channels(64 * SEBottleneck.expansion, reduction)  # fail before building anything
    # ResNet reads block.expansion and calls block(inplanes, planes, ...): a partial that
    # carries the SE options and the expansion serves as the block class.
    block = functools.partial(SEBottleneck, reduction=reduction, backend=backend)
    block.expansion = SEBottleneck.expansion
    model = ResNet(block, layers, **kwargs)
    if zero_init_residual:  # ResNet's own loop only knows its Bottleneck class
        for m in model.modules():
            if isinstance(m, SEBottleneck) and m.bn3.weight is not None:
                nn.init.zeros_(m.bn3.weight)
    return model


def se_resnet50(reduction: int = 16, *, backend: str = "auto", **kwargs: Any) -> nn.Module:
    """SE-ResNet-50: torchvision's resnet50 with SE (C // reduction hidden channels) after
    the last BN of every bottleneck, the residual add and ReLU fused into it. kwargs go to
    torchvision.models.resnet.ResNet (num_classes, zero_init_residual, groups,
    width_per_group, replace_stride_with_dilation, norm_layer). The state_dict keys are
    those of timm's seresnet50."""
    return _se_resnet([3, 4, 6, 3], reduction, backend, kwargs)


def se_resnet101(reduction: int = 16, *, backend: str = "auto", **kwargs: Any) -> nn.Module:
    """SE-ResNet-101; see se_resnet50."""
    return _se_resnet([3, 4, 23, 3], reduction, backend, kwargs)


def se_resnet152(reduction: int = 16, *, backend: str = "auto", **kwargs: Any) -> nn.Module:
    """SE-ResNet-152; see se_resnet50."""
    return _se_resnet([3, 8, 36, 3], reduction, backend, kwargs)
