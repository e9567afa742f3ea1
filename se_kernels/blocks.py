"""Residual blocks whose tail (BatchNorm -> SE -> drop path -> + shortcut -> ReLU) runs as
one fused function (se_kernels.tail, DESIGN.md §1.5), for convert_se_modules.

A recognised block is replaced by a FusedBlock that adopts its children under their
names (the same parameter tensors, the same state_dict keys) and runs the block's own
layers up to the tail's BatchNorm as they are, then the tail. Recognition is by exact
class and by the tail's parts: an exact nn.BatchNorm2d or SyncBatchNorm, an SE module that
convert_se_modules serves with average pooling, timm's DropPath (or none), an nn.ReLU,
and no hooks on any of them. Anything else keeps the SE-only conversion, with the reason
reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .excitation import Mlp
from .options import AVG, LEAKY_RELU_SLOPE, qualified_name
from .staged import update_running_stats
from .tail import block_tail

TIMM_BOTTLENECK = "timm.models.resnet.Bottleneck"
TIMM_BASIC_BLOCK = "timm.models.resnet.BasicBlock"
TIMM_DROP_PATH = "timm.layers.drop.DropPath"
LEGACY_BOTTLENECKS = ("timm.models.senet.SEBottleneck", "timm.models.senet.SEResNetBottleneck",
                      "timm.models.senet.SEResNeXtBottleneck")
LEGACY_BASIC_BLOCK = "timm.models.senet.SEResNetBlock"
OURS = "se_kernels.models.SEBottleneck"


@dataclass(frozen=True)
class BlockSpec:
    """Where a block's tail parts are: the children named norm, se, drop path (or None) and
    output ReLU, and the SE module's staged spec."""

    kind: str  # the block class's qualified name
    norm: str
    se: str
    drop_path: str | None
    act: str
    se_spec: object


def _hooks_problem(module: nn.Module, names) -> str | None:
    from .convert import _hooks
    for name in names:
        child = module if name == "" else getattr(module, name)
        hooks = _hooks(child)
        if hooks:
            return f"{name or 'the block'} has {', '.join(hooks)} registered"
    return None


def _block_parts(module: nn.Module) -> tuple[str, str, str | None, str] | None:
    """(norm, se, drop path, act) children of a recognised block class, or None."""
    kind = qualified_name(type(module))
    if kind == TIMM_BOTTLENECK:
        return "bn3", "se", "drop_path", "act3"
    if kind == TIMM_BASIC_BLOCK:
        return "bn2", "se", "drop_path", "act2"
    if kind in LEGACY_BOTTLENECKS:
        return "bn3", "se_module", None, "relu"
    if kind == OURS and getattr(module, "integration", None) == "standard":
        return "bn3", "se", None, "relu"
    return None


def inspect_block(module: nn.Module) -> tuple[BlockSpec | None, str | None]:
    """(spec, None) for a block whose tail fuses, (None, reason) for a recognised block
    whose tail does not, (None, None) for any other module."""
    from .convert import StagedSpec, inspect_se_module, staged_spec

    parts = _block_parts(module)
    if parts is None:
        if qualified_name(type(module)) == LEGACY_BASIC_BLOCK:
            return None, "a ReLU sits between bn2 and the SE: the tail fuses BatchNorm -> SE"
        return None, None
    norm_name, se_name, drop_name, act_name = parts
    if "forward" in vars(module):
        return None, "its forward is patched on the instance"
    norm, se = getattr(module, norm_name), getattr(module, se_name, None)
    drop = getattr(module, drop_name, None) if drop_name else None
    if se is None:
        return None, None  # no SE: not an SE block
    problem = _hooks_problem(module, ["", norm_name, se_name, act_name]
                             + ([drop_name] if drop is not None else []))
    if problem:
        return None, problem
    if type(norm) not in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return None, f"{norm_name} is {type(norm).__name__}, not an nn.BatchNorm2d or SyncBatchNorm"
    if type(getattr(module, act_name)) is not nn.ReLU:
        return None, f"{act_name} is {type(getattr(module, act_name)).__name__}, not an nn.ReLU"
    if drop is not None and type(drop) is not nn.Identity and qualified_name(type(drop)) != TIMM_DROP_PATH:
        return None, f"{drop_name} is {type(drop).__name__}, not timm's DropPath"
    if qualified_name(type(se)) == "se_kernels.modules.SqueezeExcitation":
        se_spec = StagedSpec(Mlp(se._activation_name, LEAKY_RELU_SLOPE),
                             ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", *(None,) * 4),
                             se._gate_name, se.pool)
    else:
        report = inspect_se_module(se, se_name)
        if report is None or not report.servable:
            return None, f"its SE module is not served ({report.reason if report else 'unknown class'})"
        se_spec = report.spec if isinstance(report.spec, StagedSpec) else staged_spec(report.spec)
    if se_spec.pool != AVG:
        return None, f"its SE pools {se_spec.pool!r}: the fused tail squeezes with the mean"
    return BlockSpec(qualified_name(type(module)), norm_name, se_name, drop_name, act_name,
                     se_spec), None


class FusedBlock(nn.Module):
    """A residual block of another class whose tail runs fused (se_kernels.tail). It holds
    the original's children under their names, and the original itself outside the module
    tree, for restore_se_modules."""

    def __init__(self, original: nn.Module, spec: BlockSpec, backend: str = "auto") -> None:
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        self.train(original.training)
        object.__setattr__(self, "original", original)
        self.source = spec.kind
        self.spec = spec
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.spec.kind
        m = self._modules
        if kind == TIMM_BOTTLENECK:
            shortcut = x
            x = m["act1"](m["bn1"](m["conv1"](x)))
            x = m["aa"](m["act2"](m["drop_block"](m["bn2"](m["conv2"](x)))))
            x = m["conv3"](x)
        elif kind == TIMM_BASIC_BLOCK:
            shortcut = x
            x = m["aa"](m["act1"](m["drop_block"](m["bn1"](m["conv1"](x)))))
            x = m["conv2"](x)
        elif kind in LEGACY_BOTTLENECKS:
            shortcut = x
            out = m["relu"](m["bn1"](m["conv1"](x)))
            out = m["relu"](m["bn2"](m["conv2"](out)))
            x = m["conv3"](out)
        else:  # OURS
            shortcut = x
            out = m["relu"](m["bn1"](m["conv1"](x)))
            x = m["conv3"](m["relu"](m["bn2"](m["conv2"](out))))
        keep = self._drop_path_keep(x)
        if m.get("downsample") is not None:
            shortcut = m["downsample"](shortcut)
        return self.tail(x, shortcut, keep)

    def _drop_path_keep(self, x: torch.Tensor) -> torch.Tensor | None:
        """timm's DropPath as a per-sample factor, drawn as DropPath draws it (same
        generator, shape and dtype), so the fused block drops the samples the original
        would."""
        name = self.spec.drop_path
        drop = self._modules.get(name) if name else None
        if drop is None or type(drop) is nn.Identity or drop.drop_prob == 0.0 or not drop.training:
            return None
        keep_prob = 1 - drop.drop_prob
        random = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep_prob)
        if keep_prob > 0.0 and drop.scale_by_keep:
            random.div_(keep_prob)
        return random.view(x.shape[0])

    def tail(self, x: torch.Tensor, shortcut: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        spec = self.spec
        norm = self._modules[spec.norm]
        se = self._modules[spec.se]
        batch_stats = norm.training or norm.running_mean is None
        group = None
        if type(norm) is nn.SyncBatchNorm and batch_stats and dist.is_available() and dist.is_initialized():
            group = norm.process_group or dist.group.WORLD
        form, params = se_form(se, spec.se_spec)
        out, stats = block_tail(x, (norm.weight, norm.bias, norm.running_mean, norm.running_var),
                                form, params, gate=spec.se_spec.gate, batch_stats=batch_stats,
                                eps=norm.eps, residual=shortcut, keep=keep, out_activation="relu",
                                group=group, backend=self.backend)
        if stats is not None:
            update_running_stats(norm, stats, stats[2])
        return out

    def extra_repr(self) -> str:
        return f"source={self.source}, tail={self.spec.norm} -> {self.spec.se} -> relu, backend={self.backend!r}"


def se_form(se: nn.Module, spec) -> tuple:
    """(form, parameters) of an SE module's staged spec in the module's present mode."""
    from .convert import staged_arguments
    return staged_arguments(se, spec)
