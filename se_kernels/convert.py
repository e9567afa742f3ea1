"""convert_se_modules: runs the SE modules of torchvision and timm models on the fused op.

Each SE module it can serve exactly is replaced, in place, by a ConvertedSqueezeExcitation
that adopts the original's submodules under their original names. The parameters are
therefore the very same tensors (an optimizer built before the conversion still holds
them) and the state_dict keys do not change, so checkpoints load both ways. Modules are
recognised by their exact class, named as a string, so neither timm nor torchvision is
imported here: a model that holds their modules has imported them already.

An SE module it cannot serve exactly (an activation or gate the op lacks, a norm layer
between the FCs, a subclass that may override forward, hooks on the module) is left as it
is and reported through logging, never changed in meaning.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import dispatch
from .functional import squeeze_excitation
from .modules import SqueezeExcitation
from .options import (ACTIVATION_CLASSES, AVG, AVGMAX, GATE_CLASSES, NAMES, module_option,
                      qualified_name)

logger = logging.getLogger(__name__)

# A leaf for torch.fx symbolic tracing (timm's feature extraction, FX quantization): the
# op validates its tensors, which a tracing Proxy is not.
torch.fx.wrap("squeeze_excitation")

TORCHVISION_SE = "torchvision.ops.misc.SqueezeExcitation"
TIMM_SE = "timm.layers.squeeze_excite.SEModule"
TIMM_EFFICIENTNET_SE = "timm.models._efficientnet_blocks.SqueezeExcite"
TIMM_LEGACY_SE = "timm.models.senet.SEModule"

# SE-like classes the op cannot compute at all, named so that users learn why they stay.
ONE_FC = "one FC C -> C and no hidden layer (effective SE), not the two-FC excitation the op computes"
UNSERVABLE = {
    "timm.layers.squeeze_excite.EffectiveSEModule": ONE_FC,
    "timm.models.hgnet.EseModule": ONE_FC,
    "timm.layers.squeeze_excite.SqueezeExciteCl":
        "works on channels-last [N, H, W, C] tensors with Linear FCs",
    "timm.layers.eca.EcaModule":
        "the excitation is a 1-D convolution across channels (ECA), not two FCs",
    "timm.layers.eca.CecaModule":
        "the excitation is a circularly padded 1-D convolution across channels (CECA), not two FCs",
    "timm.layers.gather_excite.GatherExcite":
        "gather-excite: a spatial gather, or without its MLP no FC pair; its global-extent form "
        "with an MLP is an SE, but no timm model builds it",
}


@dataclass(frozen=True)
class SESpec:
    """How to compute one SE module with the fused op: the names of its two FC children
    and the op's options."""

    reduce: str
    expand: str
    activation: str
    gate: str
    pool: str


@dataclass(frozen=True)
class SEModuleReport:
    """One SE module found in a model: where, of which class, and either how the op
    computes it (spec) or why it cannot (reason)."""

    name: str
    source: str
    spec: SESpec | None
    reason: str | None = None

    @property
    def servable(self) -> bool:
        return self.spec is not None


class ConvertedSqueezeExcitation(nn.Module):
    """An SE module of another library (torchvision, timm) running on the fused op.

    It holds the original's submodules under their original names: the FCs (whose weights
    the op reads), and the pool/activation/gate modules, kept only so that the module tree
    and state_dict match the original's. It also keeps the original module itself, outside
    the module tree (no parameters or state_dict entries of its own), for
    restore_se_modules to put back.
    """

    def __init__(self, original: nn.Module, spec: SESpec, backend: str = "auto") -> None:
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        self.train(original.training)
        # Not a submodule: nn.Module.__setattr__ would register it and list its children twice.
        object.__setattr__(self, "original", original)
        self.source = qualified_name(type(original))
        self.spec = spec
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduce, expand = self._modules[self.spec.reduce], self._modules[self.spec.expand]
        return squeeze_excitation(
            x, reduce.weight, reduce.bias, expand.weight, expand.bias,
            activation=self.spec.activation, gate=self.spec.gate, pool=self.spec.pool,
            backend=self.backend)

    def extra_repr(self) -> str:
        return (f"source={self.source}, activation={self.spec.activation!r}, "
                f"gate={self.spec.gate!r}, pool={self.spec.pool!r}, backend={self.backend!r}")


def _fc_pair_problem(module: nn.Module, reduce: str, expand: str) -> str | None:
    """Why the two FCs are not a pair of 1x1 convolutions the op can read, or None."""
    convs = (getattr(module, reduce), getattr(module, expand))
    for name, conv in zip((reduce, expand), convs):
        if type(conv) is not nn.Conv2d:
            return f"{name} is {type(conv).__name__}, not an nn.Conv2d"
        if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1 or \
                conv.padding not in ((0, 0), "valid"):
            return (f"{name} is not a plain 1x1 convolution (kernel {conv.kernel_size}, "
                    f"stride {conv.stride}, padding {conv.padding}, groups {conv.groups})")
    if convs[0].in_channels != convs[1].out_channels or convs[0].out_channels != convs[1].in_channels:
        return f"{reduce} and {expand} do not form a C -> S -> C pair"
    return None


def _op_name(module: nn.Module, what: str, child: str, classes: dict) -> str:
    """The op's name for an activation module; raises _Unservable when it has none."""
    name = module_option(module, classes)
    if name is None:
        raise _Unservable(f"{what} {child}={module!r} computes none of the op's "
                          f"{what}s ({', '.join(NAMES[what])})")
    return name


class _Unservable(Exception):
    pass


def _spec(module: nn.Module, reduce: str, expand: str, act: str, gate: str, pool: str) -> SESpec:
    problem = _fc_pair_problem(module, reduce, expand)
    if problem:
        raise _Unservable(problem)
    return SESpec(reduce, expand, _op_name(getattr(module, act), "activation", act, ACTIVATION_CLASSES),
                  _op_name(getattr(module, gate), "gate", gate, GATE_CLASSES), pool)


def _torchvision_se(module: nn.Module) -> SESpec:
    if type(module.avgpool) is not nn.AdaptiveAvgPool2d or module.avgpool.output_size not in (1, (1, 1)):
        raise _Unservable(f"avgpool={module.avgpool!r} is not a global average pool")
    return _spec(module, "fc1", "fc2", "activation", "scale_activation", AVG)


def _timm_se(module: nn.Module) -> SESpec:
    if type(module.bn) is not nn.Identity:
        raise _Unservable(f"norm layer bn={type(module.bn).__name__} between the FCs")
    return _spec(module, "fc1", "fc2", "act", "gate", AVGMAX if module.add_maxpool else AVG)


def _timm_efficientnet_se(module: nn.Module) -> SESpec:
    return _spec(module, "conv_reduce", "conv_expand", "act1", "gate", AVG)


def _timm_legacy_se(module: nn.Module) -> SESpec:
    return _spec(module, "fc1", "fc2", "relu", "sigmoid", AVG)  # its children's names


SERVED = {
    TORCHVISION_SE: _torchvision_se,
    TIMM_SE: _timm_se,
    TIMM_EFFICIENTNET_SE: _timm_efficientnet_se,
    TIMM_LEGACY_SE: _timm_legacy_se,
}


def _hooks(module: nn.Module) -> list[str]:
    kinds = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks",
             "_state_dict_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
             "_load_state_dict_post_hooks")
    return [kind.strip("_") for kind in kinds if getattr(module, kind, None)]


def inspect_se_module(module: nn.Module, name: str = "") -> SEModuleReport | None:
    """The report on `module` if it is an SE module of a known library; None for any
    other module, this package's own modules included."""
    cls = type(module)
    source = qualified_name(cls)

    def unservable(reason: str) -> SEModuleReport:
        return SEModuleReport(name, source, None, reason)

    if source in SERVED:
        hooks = _hooks(module)
        if hooks:
            return unservable(f"has {', '.join(hooks)} registered, which a replacement would lose")
        if "forward" in vars(module):
            return unservable("its forward is patched on the instance")
        try:
            return SEModuleReport(name, source, SERVED[source](module))
        except _Unservable as problem:
            return unservable(str(problem))
    if source in UNSERVABLE:
        return unservable(UNSERVABLE[source])
    if isinstance(module, (SqueezeExcitation, ConvertedSqueezeExcitation)):
        return None
    for base in cls.__mro__[1:]:
        if qualified_name(base) in SERVED:
            return unservable(f"subclass of {qualified_name(base)}, whose forward may differ")
    return None


def find_se_modules(model: nn.Module) -> list[SEModuleReport]:
    """Every SE module of a known library in `model` (by qualified name), with how the op
    would compute it or why it cannot. Changes nothing."""
    reports = (inspect_se_module(module, name) for name, module in model.named_modules())
    return [report for report in reports if report is not None]


def convert_se_modules(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace, in place, every SE module of `model` that the fused op computes exactly.

    Served: torchvision.ops.SqueezeExcitation (EfficientNet, MobileNetV3, RegNet), timm's
    SEModule (ResNet/RegNet/ByobNet "se" attention, add_maxpool -> "avgmax", bias=False),
    timm's EfficientNet/MobileNet SqueezeExcite and timm's legacy senet.SEModule, with any
    activation and gate module that se_kernels.options.ACTIVATION_CLASSES / GATE_CLASSES
    map to an option (torch's or timm's).

    The replacement holds the original's submodules under their original names, so the
    parameters stay the same tensors and `state_dict()` keys are unchanged: checkpoints
    load into the converted model and back into the original architecture. Modules it
    cannot serve exactly stay as they are; a WARNING log record says which and why, and
    an INFO record sums up (logger "se_kernels.convert"). `find_se_modules(model)` lists
    the same findings without changing anything.

    Args:
        model: any nn.Module; if it is itself an SE module, its replacement is returned.
        backend: the se_kernels backend the converted modules ask for ("auto" picks per call).

    Returns:
        The model (the same object, unless the model itself is a converted SE module).
    """
    if backend != "auto":
        dispatch.get_backend(backend)  # an unknown name fails now, not at the first forward
    # Decided once per module object, so a module shared by two parents is reported once
    # and both parents get the same replacement.
    replacements: dict[int, nn.Module | None] = {}  # id(module) -> replacement, None: keep
    reports: list[SEModuleReport] = []
    already_fused = sum(isinstance(m, (SqueezeExcitation, ConvertedSqueezeExcitation))
                        for m in model.modules())

    def replacement(name: str, module: nn.Module) -> nn.Module | None:
        if id(module) not in replacements:
            report = inspect_se_module(module, name)
            if report is not None:
                reports.append(report)
            replacements[id(module)] = ConvertedSqueezeExcitation(module, report.spec, backend) \
                if report is not None and report.servable else None
        return replacements[id(module)]

    model = _replace_modules(model, replacement)
    _log_summary(reports, already_fused)
    return model


def _replace_modules(model: nn.Module,
                     replacement: Callable[[str, nn.Module], nn.Module | None]) -> nn.Module:
    """In place, put `replacement(qualified_name, module)` wherever it is not None, and walk
    into the modules it keeps. Each module object is walked once, so one shared by two
    parents is decided once. Returns the model, or its own replacement."""
    visited: set[int] = set()

    def walk(parent: nn.Module, prefix: str) -> None:
        if id(parent) in visited:
            return
        visited.add(id(parent))
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            new = replacement(prefix + name, child)
            if new is not None:
                parent._modules[name] = new
            else:
                walk(child, prefix + name + ".")

    root = replacement("", model)
    if root is not None:
        return root
    walk(model, "")
    return model


def restore_module(module: ConvertedSqueezeExcitation) -> nn.Module:
    """The original SE module of `module`, holding `module`'s current children (so the
    same parameter tensors) and in its training mode. The served classes keep all their
    parameters and buffers in those children, so nothing else can have changed."""
    original = module.__dict__.get("original")
    if original is None:
        raise ValueError(f"cannot restore {module.source}: this ConvertedSqueezeExcitation "
                         f"holds no original module (it was not made by convert_se_modules)")
    original._modules.clear()
    original._modules.update(module._modules)
    original.training = module.training
    return original


def restore_se_modules(model: nn.Module) -> nn.Module:
    """Undo convert_se_modules, in place: put back the original torchvision/timm SE module
    of every ConvertedSqueezeExcitation in `model`.

    The restored modules are of their original classes and hold the converted modules'
    submodules, so the parameters are the very same tensors (trained values included) and
    `state_dict()` is unchanged. The result runs where se_kernels is not installed, e.g.
    after `torch.save(model)`. se_kernels' own modules (SqueezeExcitation, the SE-ResNet
    blocks) have no original to go back to and stay as they are.

    Args:
        model: any nn.Module; if it is itself a converted SE module, the original is returned.

    Returns:
        The model (the same object, unless the model itself is a converted SE module).
    """
    restored: dict[int, nn.Module] = {}  # id(converted) -> original; shared modules stay shared

    def original_of(name: str, module: nn.Module) -> nn.Module | None:
        if not isinstance(module, ConvertedSqueezeExcitation):
            return None
        if id(module) not in restored:
            restored[id(module)] = restore_module(module)
        return restored[id(module)]

    model = _replace_modules(model, original_of)
    if restored:
        logger.info("restore_se_modules: restored %d SE modules", len(restored))
    return model


def _log_summary(reports: list[SEModuleReport], already_fused: int) -> None:
    served = Counter(r.source for r in reports if r.servable)
    left: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in reports:
        if not r.servable:
            left[(r.source, r.reason)].append(r.name or "<root>")
    for (source, reason), names in left.items():
        shown = ", ".join(names[:5]) + (f", ... ({len(names) - 5} more)" if len(names) > 5 else "")
        logger.warning("convert_se_modules: left %d %s as is: %s [%s]",
                       len(names), source, reason, shown)
    fused = f" ({already_fused} already fused)" if already_fused else ""
    if not reports:
        log = logger.info if already_fused else logger.warning
        log("convert_se_modules: found no SE module of a known class to convert%s", fused)
        return
    logger.info("convert_se_modules: converted %d of %d SE modules%s%s", sum(served.values()),
                len(reports), "".join(f"; {n} x {source}" for source, n in served.items()), fused)
