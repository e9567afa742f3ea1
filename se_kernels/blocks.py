"""Residual blocks whose tail (BatchNorm -> SE -> drop path -> + shortcut -> ReLU) runs as
one fused function (se_kernels.tail, DESIGN.md §1.5), for convert_se_modules; and blocks
whose BatchNorm -> activation -> SE runs as one act tail (MBConv, RegNetY).

A recognised block is replaced by a FusedBlock that adopts its children under their
names (the same parameter tensors, the same state_dict keys) and runs the block's own
layers up to the tail's BatchNorm as they are, then the tail. Recognition is by exact
class and by the tail's parts: an exact nn.BatchNorm2d or SyncBatchNorm, an SE module that
convert_se_modules serves with average pooling, timm's DropPath (or none), an nn.ReLU,
and no hooks on any of them. Anything else keeps the SE-only conversion, with the reason
reported. The act tails are recognised likewise (ACT_BLOCKS): an exact nn.BatchNorm2d or
SyncBatchNorm with an activation module after it, or timm's BatchNormAct2d (or the
SyncBatchNormAct its convert_sync_batchnorm makes of one) without drop, whose activation is
one of options.ACTIVATIONS, feeding an SE served with average pooling. A SyncBatchNorm's
statistics are all-reduced on its process group (process_group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .excitation import Mlp
from .options import ACTIVATION_CLASSES, AVG, LEAKY_RELU_SLOPE, module_option, qualified_name
from .staged import update_running_stats
from . import dispatch
from .tail import block_tail, traced_quietly
from .tail import make_call as make_tail_call

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


def inspect_block(module: nn.Module) -> tuple[BlockSpec | ActBlockSpec | None, str | None]:
    """(spec, None) for a block whose tail fuses, (None, reason) for a recognised block
    whose tail does not, (None, None) for any other module."""
    from .convert import StagedSpec, inspect_se_module, staged_spec

    if qualified_name(type(module)) in ACT_BLOCKS:
        return inspect_act_block(module)
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


def process_group(norm: nn.Module, batch_stats: bool):
    """The process group a tail's batch statistics are all-reduced on: a SyncBatchNorm's
    (timm's SyncBatchNormAct is one), in training, once torch.distributed is set up; else
    None, this process's batch alone (as a SyncBatchNorm computes it outside a process
    group)."""
    if (isinstance(norm, nn.SyncBatchNorm) and batch_stats and dist.is_available()
            and dist.is_initialized()):
        return norm.process_group or dist.group.WORLD
    return None


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
        group = process_group(norm, batch_stats)
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


# ---- the act tails: BatchNorm -> activation -> SE --------------------------------------

TIMM_DS_CONV = "timm.models._efficientnet_blocks.DepthwiseSeparableConv"
TIMM_INVERTED_RESIDUAL = "timm.models._efficientnet_blocks.InvertedResidual"
TIMM_REGNET_BOTTLENECK = "timm.models.regnet.Bottleneck"
TV_MBCONV = "torchvision.models.efficientnet.MBConv"
TV_INVERTED_RESIDUAL = "torchvision.models.mobilenetv3.InvertedResidual"
TV_RES_BOTTLENECK = "torchvision.models.regnet.ResBottleneckBlock"
TIMM_BN_ACT = "timm.layers.norm_act.BatchNormAct2d"
TIMM_SYNC_BN_ACT = "timm.layers.norm_act.SyncBatchNormAct"  # timm's convert_sync_batchnorm
TIMM_CONV_NORM_ACT = "timm.layers.conv_bn_act.ConvNormAct"
TV_CONV_NORM_ACT = "torchvision.ops.misc.Conv2dNormActivation"
TV_BOTTLENECK_TRANSFORM = "torchvision.models.regnet.BottleneckTransform"
# Each block class: its conv, BatchNormAct2d and SE (timm), or the nn.Sequential child whose
# Conv2dNormActivation (conv, BatchNorm2d, activation) feeds the SE after it (torchvision).
ACT_BLOCKS = {
    TIMM_DS_CONV: ("conv_dw", "bn1", "se"),
    TIMM_INVERTED_RESIDUAL: ("conv_dw", "bn2", "se"),
    TIMM_REGNET_BOTTLENECK: ("conv2.conv", "conv2.bn", "se"),
    TV_MBCONV: ("block",),
    TV_INVERTED_RESIDUAL: ("block",),
    TV_RES_BOTTLENECK: ("f",),
}


@dataclass(frozen=True)
class ActBlockSpec:
    """Where a block's act tail is: the paths (from the block) of the conv feeding the norm,
    the norm, the activation module and the SE; the activation's option name; the SE's
    staged spec; for the torchvision blocks, the nn.Sequential they run in and the index in
    it of the Conv2dNormActivation (the SE is the next child)."""

    kind: str
    conv: str
    norm: str
    act: str
    se: str
    activation: str
    se_spec: object
    se_only_spec: object  # the SE's own spec, for the SE-only conversion (FusedActBlock)
    sequence: str | None = None
    index: int = -1


def _act_parts(module: nn.Module, kind: str):
    """(conv, norm, act, se, sequence, index, problem) paths of the act tail of a block of
    an ACT_BLOCKS class; se None when the block has no SE."""
    parts = ACT_BLOCKS[kind]
    if len(parts) == 3:  # timm: BatchNormAct2d holds its activation and drop
        conv, norm, se = parts
        if kind == TIMM_REGNET_BOTTLENECK:
            conv2 = module.conv2
            if qualified_name(type(conv2)) != TIMM_CONV_NORM_ACT:
                return None, f"conv2 is {type(conv2).__name__}, not timm's ConvNormAct"
            if type(getattr(conv2, "aa", None) or nn.Identity()) is not nn.Identity:
                return None, "conv2 has an anti-aliasing layer between its norm and the SE"
        elif type(getattr(module, "aa", None) or nn.Identity()) is not nn.Identity:
            return None, "aa sits between the norm and the SE"
        se_module = getattr(module, se, None)
        if se_module is None or type(se_module) is nn.Identity:
            return None, None
        bn = module.get_submodule(norm)
        if qualified_name(type(bn)) not in (TIMM_BN_ACT, TIMM_SYNC_BN_ACT):
            return None, (f"{norm} is {type(bn).__name__}, not timm's BatchNormAct2d or "
                          f"SyncBatchNormAct")
        drop = getattr(bn, "drop", nn.Identity())  # a SyncBatchNormAct may lack either
        if type(drop) is not nn.Identity:
            return None, f"{norm} has a drop layer ({type(drop).__name__}) before its activation"
        if not hasattr(bn, "act"):
            return None, f"{norm} has no activation"
        return (conv, norm, f"{norm}.act", se, None, -1), None
    sequence = parts[0]
    seq = module.get_submodule(sequence)
    if type(seq) is not nn.Sequential and qualified_name(type(seq)) != TV_BOTTLENECK_TRANSFORM:
        return None, f"{sequence} is {type(seq).__name__}, not an nn.Sequential"
    names = list(seq._modules)
    for i, name in enumerate(names[1:], start=1):
        if qualified_name(type(seq._modules[name])) == "torchvision.ops.misc.SqueezeExcitation":
            before = seq._modules[names[i - 1]]
            prefix = f"{sequence}.{names[i - 1]}"
            if qualified_name(type(before)) != TV_CONV_NORM_ACT or len(before) != 3:
                return None, (f"{prefix} before the SE is not a Conv2dNormActivation with an "
                              f"activation")
            if type(before[1]) not in (nn.BatchNorm2d, nn.SyncBatchNorm):
                return None, (f"{prefix}.1 is {type(before[1]).__name__}, not an nn.BatchNorm2d "
                              f"or SyncBatchNorm")
            return (f"{prefix}.0", f"{prefix}.1", f"{prefix}.2", f"{sequence}.{name}", sequence,
                    i - 1), None
    return None, None  # no SE: not an SE block


def inspect_act_block(module: nn.Module) -> tuple[ActBlockSpec | None, str | None]:
    """inspect_block for the ACT_BLOCKS classes."""
    from .convert import StagedSpec, inspect_se_module, staged_spec

    kind = qualified_name(type(module))
    parts, problem = _act_parts(module, kind)
    if parts is None:
        return None, problem
    conv, norm, act, se_path, sequence, index = parts
    if "forward" in vars(module):
        return None, "its forward is patched on the instance"
    from .convert import _hooks
    for path in ["", *filter(None, (sequence, conv.rpartition(".")[0])), conv, norm, act, se_path]:
        hooks = _hooks(module.get_submodule(path))
        if hooks:
            return None, f"{path or 'the block'} has {', '.join(hooks)} registered"
    activation = module_option(module.get_submodule(act), ACTIVATION_CLASSES)
    if activation is None:
        return None, (f"{act} is {type(module.get_submodule(act)).__name__}, which the act tail "
                      f"does not compute")
    se = module.get_submodule(se_path)
    report = inspect_se_module(se, se_path)
    if report is None or not report.servable:
        return None, f"its SE module is not served ({report.reason if report else 'unknown class'})"
    se_spec = report.spec if isinstance(report.spec, StagedSpec) else staged_spec(report.spec)
    if se_spec.pool != AVG:
        return None, f"its SE pools {se_spec.pool!r}: the act tail squeezes with the mean"
    return ActBlockSpec(kind, conv, norm, act, se_path, activation, se_spec, report.spec, sequence,
                        index), None


# On CPU the act tail computes the activation in each of its passes, where eager computes
# it once: with an exp-bound activation (SiLU) that costs more than the norm's output it does
# not write, and only training, whose backward reads x instead of a saved output, gains.
# EfficientNet-B0's act tails, batch 8 and 32, one thread
# (benchmarks/results/cpu-amd-epyc-2026-12-06-tail.md): 0.98-1.06x the SE-only conversion in
# training at 56 x 56 pixels and above, 0.71-0.74x in inference. So backend="auto" runs the
# act tail on CPU only on batch statistics from 56 x 56 pixels, the SE-only conversion
# otherwise (below 56 x 56, where less of x streams from memory, a rougher measurement had
# it no better than the SE-only conversion in training either).
ACT_TAIL_MIN_PIXELS_CPU = 56 * 56


class FusedActBlock(FusedBlock):
    """A block of another class whose BatchNorm -> activation -> SE runs as one act tail
    (se_kernels.tail); the rest of its forward is the original's, on the same children.
    Where backend="auto" finds no backend with the act tail's kernels for the tensors, or
    the cpu backend outside training or for fewer than ACT_TAIL_MIN_PIXELS_CPU pixels (the
    rule's measurements are beside it), it runs the SE-only
    conversion instead: the norm and the activation as they are, the SE on its own fused or
    staged op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind, m, o = self.spec.kind, self._modules, self.original
        if kind in (TIMM_DS_CONV, TIMM_INVERTED_RESIDUAL):
            shortcut = x
            if getattr(o, "conv_s2d", None) is not None:
                x = m["bn_s2d"](m["conv_s2d"](x))
            if kind == TIMM_INVERTED_RESIDUAL:
                x = m["conv_dw"](m["bn1"](m["conv_pw"](x)))
                x = m["bn3"](m["conv_pwl"](self.act_tail(x)))
            else:
                x = m["bn2"](m["conv_pw"](self.act_tail(m["conv_dw"](x))))
            if o.has_skip:
                x = m["drop_path"](x) + shortcut
            return x
        if kind == TIMM_REGNET_BOTTLENECK:
            shortcut = x
            x = m["conv1"](x)
            x = m["conv3"](self.act_tail(m["conv2"]._modules["conv"](x)))
            downsample = m.get("downsample")
            if downsample is not None:
                x = m["drop_path"](x) + downsample(shortcut)
            return m["act3"](x)
        result = self._sequence(m[self.spec.sequence], x)
        if kind == TV_RES_BOTTLENECK:
            proj = m.get("proj")
            return m["activation"]((proj(x) if proj is not None else x) + result)
        if o.use_res_connect:
            if kind == TV_MBCONV:
                result = m["stochastic_depth"](result)
            result = result + x
        return result

    def _sequence(self, sequence: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The nn.Sequential's children in order, its Conv2dNormActivation's norm and
        activation and the SE after it as the act tail."""
        index = self.spec.index
        for i, child in enumerate(sequence._modules.values()):
            if i == index:
                x = self.act_tail(child[0](x))
            elif i != index + 1:
                x = child(x)
        return x

    def act_tail_call(self, x: torch.Tensor):
        """(the act tail's call on x, the backend dispatch picks for it)."""
        spec = self.spec
        norm = self.get_submodule(spec.norm)
        batch_stats = norm.training or norm.running_mean is None
        form, params = se_form(self.get_submodule(spec.se), spec.se_spec)
        call = traced_quietly(
            make_tail_call, x, (norm.weight, norm.bias, norm.running_mean, norm.running_var), form,
            params, gate=spec.se_spec.gate, batch_stats=batch_stats, eps=norm.eps,
            out_activation=None, group=process_group(norm, batch_stats),
            activation=spec.activation)
        return call, dispatch.select(call, self.backend)

    def _runs_se_only(self, call, backend: dispatch.Backend) -> bool:
        """Whether backend="auto" runs the SE-only conversion instead of `call` (the class
        docstring's rule)."""
        return self.backend == "auto" and (backend.name == "torch" or (
            backend.name == "cpu" and not (call.batch_stats and call.x.shape[2] * call.x.shape[3]
                                           >= ACT_TAIL_MIN_PIXELS_CPU)))

    def act_tail(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.get_submodule(self.spec.norm)
        call, backend = self.act_tail_call(x)
        if self._runs_se_only(call, backend):
            return self._se_only(x, norm, self.get_submodule(self.spec.se))
        out, stats = backend.run_staged(call)
        if stats is not None:
            update_running_stats(norm, stats, stats[2])
        return out

    def _se_only(self, x: torch.Tensor, norm: nn.Module, se: nn.Module) -> torch.Tensor:
        """The norm and activation modules, then the SE as convert_se_modules converts it
        alone (kept outside the module tree, on the same children)."""
        from .convert import ConvertedSqueezeExcitation

        x = norm(x) if self.spec.sequence is None else self.get_submodule(self.spec.act)(norm(x))
        converted = self.__dict__.get("se_only")
        if converted is None or converted.original is not se:
            converted = ConvertedSqueezeExcitation(se, self.spec.se_only_spec, self.backend)
            object.__setattr__(self, "se_only", converted)
        converted.training = self.training
        return converted(x)

    def extra_repr(self) -> str:
        spec = self.spec
        return (f"source={self.source}, tail={spec.norm} -> {spec.activation} -> {spec.se}, "
                f"backend={self.backend!r}")


def fused_block(module: nn.Module, spec, backend: str = "auto") -> FusedBlock:
    """The fused replacement of a block inspect_block accepted."""
    return (FusedActBlock if isinstance(spec, ActBlockSpec) else FusedBlock)(module, spec, backend)


def se_form(se: nn.Module, spec) -> tuple:
    """(form, parameters) of an SE module's staged spec in the module's present mode."""
    from .convert import staged_arguments
    return staged_arguments(se, spec)
