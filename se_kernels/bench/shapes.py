"""SE layer shapes of real networks, read from torchvision's model definitions.

Each network is built once (on the CPU: RegNet's width schedule cannot be built on the meta
device), moved to the meta device and run on a 1x3x224x224 meta image with forward hooks, so
the shapes are exactly those of torchvision at 224x224 and cost no arithmetic:

  resnet50         torchvision.models.resnet50: the output of every Bottleneck, where
                   SE-ResNet puts its SE (after the last BN of the residual branch), with
                   squeeze = C // 16 (the paper's r = 16), ReLU and sigmoid.
  mobilenetv3      torchvision.models.mobilenet_v3_large: every ops.SqueezeExcitation (ReLU,
                   hardsigmoid, squeeze = make_divisible(C / 4, 8)).
  efficientnet_b0  torchvision.models.efficientnet_b0: every SE (SiLU, sigmoid, squeeze =
                   max(1, block input channels // 4), applied to the expanded channels).
  regnety_400mf    torchvision.models.regnet_y_400mf: every SE (ReLU, sigmoid, squeeze =
                   round(0.25 * block input width)).

Layers of one network with the same (C, S, H, W) are listed once, with their count.

The tail suite's shapes (tail_shapes) are traced the same way from timm's seresnet50 and
seresnext50_32x4d at a given image size: every Bottleneck's output, where bn3 -> SE ->
+ shortcut -> ReLU runs, with its SE's squeeze (make_divisible(C / 16, 8)).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..excitation import ChannelConv, Fc, Mlp
from ..options import (ACTIVATION_CLASSES, ACTIVATION_MODULES, GATE_CLASSES, GATE_MODULES, RELU,
                       SIGMOID, module_option)

# torchvision's SE networks, then timm networks whose SE modules use the other activations
# (fbnetv3: hardswish and hardsigmoid; gcvit: gelu; sedarknet: leaky_relu) or the staged
# excitation forms (ecaresnet50d: ECA; rexnet: BatchNorm between the FCs; ese_vovnet: one
# FC).
TORCHVISION_NETWORKS = ("resnet50", "mobilenetv3", "efficientnet_b0", "regnety_400mf")
TIMM_NETWORKS = ("fbnetv3_b", "gcvit_xxtiny", "sedarknet21", "ecaresnet50d", "rexnet_100",
                 "ese_vovnet19b_dw")
NETWORKS = TORCHVISION_NETWORKS + TIMM_NETWORKS
# timm's SE-ResNet-50 and SE-ResNeXt-50, whose bottleneck tails the tail suite times.
TAIL_NETWORKS = ("seresnet50", "seresnext50_32x4d")
IMAGE_SIZE = 224
RESNET_REDUCTION = 16



@dataclass(frozen=True)
class SEShape:
    """One SE layer of a network at batch 1: x is [N, channels, height, width]."""

    network: str
    layer: str  # module path of the first layer of the network with this shape
    channels: int
    squeeze: int
    height: int
    width: int
    activation: str  # between the FCs: a name of options.ACTIVATIONS; for a staged form, its label
    gate: str  # on the scale: a name of options.GATES
    count: int = 1  # layers of the network with this shape
    # An act tail's (DESIGN.md §1.5): the activation between the BatchNorm and the SE, a
    # name of options.ACTIVATIONS; None for every other shape.
    norm_activation: str | None = None
    # For a staged form (DESIGN.md §1.4): makes the network's own SE module of this shape on
    # a device, freshly initialised; None for the two-FC modules, which the peers build.
    module: Callable[[torch.device], nn.Module] | None = field(default=None, compare=False,
                                                               repr=False)

    @property
    def label(self) -> str:
        return f"{self.network} C{self.channels} S{self.squeeze} {self.height}x{self.width}"

    def activation_module(self) -> Callable[[], nn.Module]:
        return ACTIVATION_MODULES[self.activation]

    def gate_module(self) -> Callable[[], nn.Module]:
        return GATE_MODULES[self.gate]


def _torchvision():
    try:
        import torchvision
    except ImportError as error:
        raise SystemExit("se-kernels bench needs torchvision for the network shapes: "
                         "pip install 'se-kernels[bench]'") from error
    return torchvision


def _trace(model: nn.Module, wanted: type[nn.Module], *, at_output: bool = False,
           image: int = IMAGE_SIZE) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """(module path, module, shape of its input, or of its output if at_output) of every
    `wanted` module, in execution order, for a 1x3x`image`x`image` input."""
    model = model.to("meta").eval()
    seen: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, wanted):
            def hook(mod, inputs, output, name=name):
                tensor = output if at_output else inputs[0]
                seen.append((name, mod, tuple(tensor.shape)))
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.empty(1, 3, image, image, device="meta"))
    for handle in handles:
        handle.remove()
    return seen


def _dedupe(network: str, layers: list[SEShape]) -> list[SEShape]:
    counts: dict[tuple, int] = {}
    first: dict[tuple, SEShape] = {}
    for shape in layers:
        key = (shape.channels, shape.squeeze, shape.height, shape.width, shape.activation,
               shape.gate, shape.norm_activation)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, shape)
    return [SEShape(**{**first[key].__dict__, "count": counts[key]}) for key in first]


@functools.lru_cache(maxsize=None)
def network_shapes(network: str) -> tuple[SEShape, ...]:
    """The distinct SE shapes of `network` (one of NETWORKS), in network order."""
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {', '.join(NETWORKS)}, got {network!r}")
    if network in TIMM_NETWORKS:
        return tuple(_dedupe(network, _timm_shapes(network)))
    tv = _torchvision()
    layers = []
    if network == "resnet50":
        from torchvision.models.resnet import Bottleneck

        for name, _, (_, c, h, w) in _trace(tv.models.resnet50(), Bottleneck, at_output=True):
            layers.append(SEShape(network, name, c, c // RESNET_REDUCTION, h, w, RELU, SIGMOID))
    else:
        builder = {"mobilenetv3": tv.models.mobilenet_v3_large,
                   "efficientnet_b0": tv.models.efficientnet_b0,
                   "regnety_400mf": tv.models.regnet_y_400mf}[network]
        for name, module, (_, c, h, w) in _trace(builder(), tv.ops.SqueezeExcitation):
            layers.append(SEShape(network, name, c, module.fc1.out_channels, h, w,
                                  module_option(module.activation, ACTIVATION_CLASSES),
                                  module_option(module.scale_activation, GATE_CLASSES)))
    return tuple(_dedupe(network, layers))


def _timm_shapes(network: str) -> list[SEShape]:
    """The SE layers of a timm network, as convert_se_modules would compute them."""
    try:
        import timm
    except ImportError as error:
        raise SystemExit(f"se-kernels bench needs timm for {network}'s shapes: "
                         "pip install 'se-kernels[bench]'") from error
    from ..convert import SERVED, StagedSpec, find_se_modules, qualified_name

    model = timm.create_model(network, pretrained=False)
    specs = {report.name: report.spec for report in find_se_modules(model) if report.servable}
    wanted = tuple({type(m) for m in model.modules() if qualified_name(type(m)) in SERVED})
    shapes = []
    for name, module, (_, c, h, w) in _trace(model, wanted):
        spec = specs.get(name)
        if isinstance(spec, StagedSpec):
            hidden = spec.params[0].split(".")[0]
            squeeze = module.get_submodule(hidden).out_channels if isinstance(spec.form, Mlp) else 0
            shapes.append(SEShape(network, name, c, squeeze, h, w, form_label(spec.form), spec.gate,
                                  module=functools.partial(_materialized, module)))
        elif spec is not None:
            shapes.append(SEShape(network, name, c, module.get_submodule(spec.reduce).out_channels,
                                  h, w, spec.activation, spec.gate))
    return shapes


@functools.lru_cache(maxsize=None)
def tail_shapes(image: int) -> tuple[SEShape, ...]:
    """The distinct block-tail shapes of TAIL_NETWORKS at image x image, in network order:
    the output of every timm Bottleneck (its bn3 -> SE -> + shortcut -> ReLU), with the SE's
    squeeze, activation and gate. A shape several of the networks have is listed once,
    under their names joined by '/' (SE-ResNeXt-50's tails are SE-ResNet-50's), with the
    count of the first."""
    try:
        import timm
        from timm.models.resnet import Bottleneck
    except ImportError as error:
        raise SystemExit("se-kernels bench needs timm for the block-tail shapes: "
                         "pip install 'se-kernels[bench]'") from error
    from ..convert import SESpec, inspect_se_module

    found: dict[tuple, SEShape] = {}
    for network in TAIL_NETWORKS:
        layers = []
        for name, module, (_, c, h, w) in _trace(timm.create_model(network, pretrained=False),
                                                 Bottleneck, at_output=True, image=image):
            report = inspect_se_module(module.se) if module.se is not None else None
            if report is not None and isinstance(report.spec, SESpec):
                squeeze = module.se.get_submodule(report.spec.reduce).out_channels
                layers.append(SEShape(network, name, c, squeeze, h, w, report.spec.activation,
                                      report.spec.gate))
        for shape in _dedupe(network, layers):
            key = (shape.channels, shape.squeeze, shape.height, shape.width, shape.activation,
                   shape.gate)
            first = found.setdefault(key, shape)
            if first is not shape:
                found[key] = SEShape(**{**first.__dict__,
                                        "network": f"{first.network}/{network}"})
    return tuple(found.values())


def form_label(form) -> str:
    """A staged form in a few characters: "bn+relu", "fc", "eca3", "ceca5", "eca-mlp3+gelu"."""
    if isinstance(form, Mlp):
        return f"bn+{form.activation}" if form.norm else f"{form.activation}{form.negative_slope:g}"
    if isinstance(form, Fc):
        return "fc"
    if isinstance(form, ChannelConv):
        return f"{'ceca' if form.circular else 'eca'}{form.kernel}"
    return f"eca-mlp{form.kernel}+{form.activation}"


def _materialized(meta_module: nn.Module, device: torch.device) -> nn.Module:
    """A copy of a module built on the meta device, on `device` with fresh parameters."""
    module = copy.deepcopy(meta_module).to_empty(device=device)
    for sub in module.modules():
        if hasattr(sub, "reset_parameters"):
            sub.reset_parameters()  # convolutions' and batch norms' own initialisation
    return module


# timm's EfficientNet-B0, whose BatchNorm -> SiLU -> SE act tails the tail suite times too.
ACT_TAIL_NETWORKS = ("efficientnet_b0",)


@functools.lru_cache(maxsize=None)
def act_tail_shapes(image: int) -> tuple[SEShape, ...]:
    """The distinct act-tail shapes of ACT_TAIL_NETWORKS at image x image, in network order:
    the input of the SE of every block whose BatchNorm -> activation -> SE convert_se_modules
    fuses, with the SE's squeeze, activation and gate and the norm's activation."""
    try:
        import timm
        from timm.models._efficientnet_blocks import SqueezeExcite
    except ImportError as error:
        raise SystemExit("se-kernels bench needs timm for the act-tail shapes: "
                         "pip install 'se-kernels[bench]'") from error
    from ..blocks import ActBlockSpec, inspect_block
    from ..convert import SESpec, inspect_se_module

    found: list[SEShape] = []
    for network in ACT_TAIL_NETWORKS:
        model = timm.create_model(network, pretrained=False)
        norm_activation = {}  # SE path -> the activation before it
        for name, module in model.named_modules():
            spec, _ = inspect_block(module)
            if isinstance(spec, ActBlockSpec):
                norm_activation[f"{name}.{spec.se}"] = spec.activation
        layers = []
        for name, module, (_, c, h, w) in _trace(model, SqueezeExcite, image=image):
            report = inspect_se_module(module)
            if name in norm_activation and report is not None and isinstance(report.spec, SESpec):
                layers.append(SEShape(network, name, c, module.conv_reduce.out_channels, h, w,
                                      report.spec.activation, report.spec.gate,
                                      norm_activation=norm_activation[name]))
        found += _dedupe(network, layers)
    return tuple(found)


def evenly_spaced(shapes: tuple[SEShape, ...], k: int) -> tuple[SEShape, ...]:
    """k shapes spread over the network, first and last included (all if there are <= k)."""
    if len(shapes) <= k:
        return shapes
    picks = sorted({round(i * (len(shapes) - 1) / (k - 1)) for i in range(k)})
    return tuple(shapes[i] for i in picks)
