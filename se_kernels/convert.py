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

import dataclasses
import functools
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import dispatch
from .call import SECall, make_call
from .excitation import ChannelConv, ChannelConvMlp, Fc, Mlp
from .functional import squeeze_excitation
from .modules import SqueezeExcitation
from .options import (ACTIVATION_CLASSES, AVG, AVGMAX, GATE_CLASSES, LEAKY_RELU,
                      LEAKY_RELU_SLOPE, NAMES, module_option, qualified_name)
from .staged import make_call as make_staged_call
from .staged import staged_squeeze_excitation, update_running_stats

logger = logging.getLogger(__name__)

# A leaf for torch.fx symbolic tracing (timm's feature extraction, FX quantization): the
# op validates its tensors, which a tracing Proxy is not.
torch.fx.wrap("squeeze_excitation")

TORCHVISION_SE = "torchvision.ops.misc.SqueezeExcitation"
TIMM_SE = "timm.layers.squeeze_excite.SEModule"
TIMM_EFFICIENTNET_SE = "timm.models._efficientnet_blocks.SqueezeExcite"
TIMM_LEGACY_SE = "timm.models.senet.SEModule"

# SE-like classes the op cannot compute at all, named so that users learn why they stay.
UNSERVABLE = {
    "timm.layers.squeeze_excite.SqueezeExciteCl":
        "works on channels-last [N, H, W, C] tensors with Linear FCs",
    "timm.layers.gather_excite.GatherExcite":
        "gather-excite: a spatial gather, or without its MLP no FC pair; its global-extent form "
        "with an MLP is an SE, but no timm model builds it",
}
TIMM_EFFECTIVE_SE = "timm.layers.squeeze_excite.EffectiveSEModule"
TIMM_HGNET_ESE = "timm.models.hgnet.EseModule"
TIMM_ECA = "timm.layers.eca.EcaModule"
TIMM_CECA = "timm.layers.eca.CecaModule"


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
class StagedSpec:
    """How to compute one SE module on the staged path (DESIGN.md §1.4): its excitation
    form, the attribute paths of the form's parameters in order (None for an absent one),
    the gate and pool, and the name of the BatchNorm child whose mode picks batch or
    running statistics, if it has one."""

    form: object
    params: tuple
    gate: str
    pool: str
    norm: str | None = None


@dataclass(frozen=True)
class SEModuleReport:
    """One SE module found in a model: where, of which class, and either how the op
    computes it (spec) or why it cannot (reason)."""

    name: str
    source: str
    spec: SESpec | StagedSpec | None
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

    # What calls remember (_fused_weights, forward): tensors and a backend object, which a
    # copy or a pickle of the module does not take.
    _CACHES = ("_fused_cache", "_call_cache")

    def __getstate__(self):
        state = super().__getstate__()
        for name in self._CACHES:
            state.pop(name, None)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = self._reuse_key(x)
        if key is None:
            return self._forward(x)
        cached = self.__dict__.get("_call_cache")
        if cached is not None and _same_key(cached[0], key):
            backend, call = cached[1]
            return self._run(backend, call._replace(x=x))
        call = self.se_call(x)
        backend = dispatch.select(call, self.backend)
        # Without x: the cache must not keep an input alive.
        self.__dict__["_call_cache"] = (key, (backend, call._replace(x=None)))
        return self._run(backend, call)

    def _reuse_key(self, x: torch.Tensor):
        """What the last call's validated arguments and chosen backend hold for, or None
        where calls are not reused: when autograd may record the call, under tracing,
        compiling or export, and for anything but a plain tensor. The checks and the
        backend choice cost as much as a batch-1 kernel; a call that differs from the last
        only in x's values reuses them. Everything they depend on is in the key: x's shape,
        strides, dtype and device; the backend asked for (attribute and environment) and
        the registered backends; the modes; the spec; and every parameter and buffer the
        call reads, by identity, version and address."""
        if (torch.is_grad_enabled() or type(x) is not torch.Tensor or torch.jit.is_tracing()
                or torch.compiler.is_compiling() or torch.compiler.is_exporting()):
            return None
        spec = self.spec
        if isinstance(spec, StagedSpec):
            tensors = [_attribute(self, path) for path in spec.params if path is not None]
            norm = self._modules[spec.norm].training if spec.norm is not None else None
        else:
            reduce, expand = self._modules[spec.reduce], self._modules[spec.expand]
            tensors = [reduce.weight, reduce.bias, expand.weight, expand.bias]
            norm = None
        try:
            return ((x.shape, x.stride(), x.dtype, x.device, self.backend,
                     os.environ.get(dispatch.BACKEND_ENV), dispatch.generation(), norm),
                    (spec,), *((t, t._version, t.data_ptr()) for t in tensors if t is not None))
        except RuntimeError:  # an inference tensor has no version counter
            return None

    def _run(self, backend: dispatch.Backend, call):
        """The output of `call` (an SECall, or a staged call) on `backend`."""
        if isinstance(call, SECall):
            return backend.run(call)
        out, stats = backend.run_staged(call)
        if self.spec.norm is not None:
            update_running_stats(self._modules[self.spec.norm], stats, call.x.shape[0])
        return out

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if isinstance(spec, StagedSpec):
            return self._staged_forward(x, spec)
        reduce, expand = self._modules[spec.reduce], self._modules[spec.expand]
        return squeeze_excitation(
            x, reduce.weight, reduce.bias, expand.weight, expand.bias,
            activation=spec.activation, gate=spec.gate, pool=spec.pool,
            backend=self.backend)

    def _staged_forward(self, x: torch.Tensor, spec: StagedSpec) -> torch.Tensor:
        form, params = staged_arguments(self, spec)
        if form.fuses:
            return squeeze_excitation(x, *self._fused_weights(form, params),
                                      activation=form.activation, gate=spec.gate, pool=spec.pool,
                                      backend=self.backend)
        out, stats = staged_squeeze_excitation(x, form, params, gate=spec.gate, pool=spec.pool,
                                               backend=self.backend)
        if spec.norm is not None:
            update_running_stats(self._modules[spec.norm], stats, x.shape[0])
        return out

    def _fused_weights(self, form, params):
        """form.fused_weights(params) for a form that fuses, remembered across calls that
        autograd does not record: folding a norm into the first FC is several small
        operations, as many as the fused op's own call costs at batch 1. The folded weights
        are reused while every parameter is the same tensor, at the same version and address
        (an in-place update, a .data assignment or a move makes new ones)."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return form.fused_weights(params)
        key = (form, *((t, t._version, t.data_ptr()) for t in params if t is not None))
        cached = self.__dict__.get("_fused_cache")
        if cached is not None and _same_key(cached[0], key):
            return cached[1]
        weights = form.fused_weights(params)
        self.__dict__["_fused_cache"] = (key, weights)
        return weights

    def se_call(self, x: torch.Tensor):
        """The call forward(x) makes (an SECall, or a staged call for a staged form), for
        se_kernels.explain to say which backend runs it and why."""
        spec = self.spec
        if isinstance(spec, StagedSpec):
            form, params = staged_arguments(self, spec)
            if form.fuses:
                return make_call(x, *self._fused_weights(form, params),
                                 activation=form.activation, gate=spec.gate, pool=spec.pool)
            return make_staged_call(x, form, params, gate=spec.gate, pool=spec.pool)
        reduce, expand = self._modules[spec.reduce], self._modules[spec.expand]
        return make_call(x, reduce.weight, reduce.bias, expand.weight, expand.bias,
                         activation=spec.activation, gate=spec.gate, pool=spec.pool)

    def extra_repr(self) -> str:
        spec = self.spec
        what = (f"form={spec.form!r}" if isinstance(spec, StagedSpec)
                else f"activation={spec.activation!r}")
        return (f"source={self.source}, {what}, gate={spec.gate!r}, pool={spec.pool!r}, "
                f"backend={self.backend!r}")


def _same_key(a: tuple, b: tuple) -> bool:
    """Whether two _fused_weights keys name the same tensors (by identity: == on tensors
    would compare their elements) at the same versions and addresses."""
    return len(a) == len(b) and a[0] == b[0] and all(
        u[0] is v[0] and u[1:] == v[1:] for u, v in zip(a[1:], b[1:]))


def staged_arguments(module: nn.Module, spec: StagedSpec) -> tuple:
    """(form, parameters) of `module`'s staged call in its present mode: a BatchNorm in the
    excitation uses batch statistics in training (or without running ones)."""
    form = spec.form
    if spec.norm is not None:
        norm = module._modules[spec.norm]
        form = _norm_mode(form, norm.training or norm.running_mean is None, norm.eps)
    return form, tuple(None if path is None or form_skips(form, path) else _attribute(module, path)
                       for path in spec.params)


def _norm_mode(form, batch_stats: bool, eps: float):
    """`form` with its norm's mode: one object per mode, made once (a module call would
    otherwise build a dataclass every time); under torch.compile a constant of the graph,
    traced rather than looked up in a cache Dynamo would warn about."""
    if torch.compiler.is_compiling():
        return dataclasses.replace(form, batch_stats=batch_stats, eps=eps)
    return _norm_mode_made_once(form, batch_stats, eps)


@functools.lru_cache(maxsize=None)
def _norm_mode_made_once(form, batch_stats: bool, eps: float):
    return dataclasses.replace(form, batch_stats=batch_stats, eps=eps)


def staged_spec(spec: SESpec) -> StagedSpec:
    """The two-FC excitation of a fused-op spec as the staged path's Mlp form."""
    return StagedSpec(Mlp(spec.activation, LEAKY_RELU_SLOPE),
                      (f"{spec.reduce}.weight", f"{spec.reduce}.bias", f"{spec.expand}.weight",
                       f"{spec.expand}.bias", *(None,) * 4), spec.gate, spec.pool)


def _attribute(module: nn.Module, path: str):
    """The tensor at a dotted attribute path. Submodules, parameters and buffers are read
    from nn.Module's own tables, which nn.Module.__getattr__ would search in Python on
    every call; anything else (a property, a plain attribute) through getattr."""
    *owners, name = path.split(".")
    for part in owners:
        child = module._modules.get(part)
        module = child if child is not None else getattr(module, part)
    if name in module._parameters:
        return module._parameters[name]
    if name in module._buffers:
        return module._buffers[name]
    return getattr(module, name)


def form_skips(form, path: str) -> bool:
    """Whether `form` leaves out the parameter at `path`: a normalization on batch
    statistics reads no running statistics."""
    return getattr(form, "batch_stats", False) and path.endswith(("running_mean", "running_var"))


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


def _activation(module: nn.Module, child: str) -> tuple[str, float]:
    """The activation option of `module`'s child and the negative slope it uses (leaky_relu
    takes any slope on the staged path; the fused op's is LEAKY_RELU_SLOPE)."""
    act = getattr(module, child)
    if qualified_name(type(act)) == "torch.nn.modules.activation.LeakyReLU":
        return LEAKY_RELU, float(act.negative_slope)
    return _op_name(act, "activation", child, ACTIVATION_CLASSES), LEAKY_RELU_SLOPE


def _gate(module: nn.Module, child: str) -> str:
    return _op_name(getattr(module, child), "gate", child, GATE_CLASSES)


def _norm_problem(norm: nn.Module, child: str) -> str | None:
    """Why the norm child between the FCs is not a BatchNorm the staged path computes."""
    if type(norm) is nn.SyncBatchNorm:
        return (f"norm layer {child}=SyncBatchNorm between the FCs: its batch statistics span "
                f"processes")
    if type(norm) is not nn.BatchNorm2d:
        return f"norm layer {child}={type(norm).__name__} between the FCs: only nn.BatchNorm2d is computed"
    return None


def _spec(module: nn.Module, reduce: str, expand: str, act: str, gate: str, pool: str,
          norm: str | None = None) -> SESpec | StagedSpec:
    """The fused op's spec for a pair of FCs, or the staged path's when a BatchNorm sits
    between them or the activation is a leaky_relu of another slope than the op's."""
    problem = _fc_pair_problem(module, reduce, expand)
    if problem:
        raise _Unservable(problem)
    activation, slope = _activation(module, act)
    gate_name = _gate(module, gate)
    if norm is None and slope == LEAKY_RELU_SLOPE:
        return SESpec(reduce, expand, activation, gate_name, pool)
    norm_params = ((f"{norm}.weight", f"{norm}.bias", f"{norm}.running_mean", f"{norm}.running_var")
                   if norm else (None,) * 4)
    return StagedSpec(Mlp(activation, slope, norm=norm is not None),
                      (f"{reduce}.weight", f"{reduce}.bias", f"{expand}.weight", f"{expand}.bias",
                       *norm_params), gate_name, pool, norm)


def _torchvision_se(module: nn.Module) -> SESpec:
    if type(module.avgpool) is not nn.AdaptiveAvgPool2d or module.avgpool.output_size not in (1, (1, 1)):
        raise _Unservable(f"avgpool={module.avgpool!r} is not a global average pool")
    return _spec(module, "fc1", "fc2", "activation", "scale_activation", AVG)


def _timm_se(module: nn.Module) -> SESpec | StagedSpec:
    norm = None
    if type(module.bn) is not nn.Identity:
        problem = _norm_problem(module.bn, "bn")
        if problem:
            raise _Unservable(problem)
        norm = "bn"
    return _spec(module, "fc1", "fc2", "act", "gate", AVGMAX if module.add_maxpool else AVG, norm)


def _timm_efficientnet_se(module: nn.Module) -> SESpec:
    return _spec(module, "conv_reduce", "conv_expand", "act1", "gate", AVG)


def _timm_legacy_se(module: nn.Module) -> SESpec:
    return _spec(module, "fc1", "fc2", "relu", "sigmoid", AVG)  # its children's names


def _one_fc(module: nn.Module, fc: str, gate: str, pool: str) -> StagedSpec:
    conv = getattr(module, fc)
    problem = _conv_problem(conv, fc, nn.Conv2d, (1, 1), (0, 0))
    if problem:
        raise _Unservable(problem)
    if conv.in_channels != conv.out_channels:
        raise _Unservable(f"{fc} maps {conv.in_channels} to {conv.out_channels} channels, not C -> C")
    return StagedSpec(Fc(), (f"{fc}.weight", f"{fc}.bias"), _gate(module, gate), pool)


def _timm_effective_se(module: nn.Module) -> StagedSpec:
    return _one_fc(module, "fc", "gate", AVGMAX if module.add_maxpool else AVG)


def _timm_hgnet_ese(module: nn.Module) -> StagedSpec:
    return _one_fc(module, "conv", "sigmoid", AVG)


def _conv_problem(conv: nn.Module, name: str, cls: type, kernel: tuple, padding: tuple) -> str | None:
    """Why `conv` is not a plain `cls` convolution with this kernel and padding, or None."""
    if type(conv) is not cls:
        return f"{name} is {type(conv).__name__}, not an {cls.__name__}"
    if (conv.kernel_size != kernel or conv.padding != padding or set(conv.stride) != {1}
            or set(conv.dilation) != {1} or conv.groups != 1 or conv.padding_mode != "zeros"):
        return (f"{name} is not a plain convolution with kernel {kernel} and padding {padding} "
                f"(kernel {conv.kernel_size}, padding {conv.padding}, stride {conv.stride}, "
                f"dilation {conv.dilation}, groups {conv.groups}, padding_mode {conv.padding_mode!r})")
    return None


def _channel_kernel(conv: nn.Module, name: str, channels: tuple[int, int]) -> int:
    """The odd kernel of a Conv1d across the channels with `channels` (in, out)."""
    k = conv.kernel_size[0] if type(conv) is nn.Conv1d else 0
    if k % 2 == 0:
        raise _Unservable(f"{name}={conv!r} is not an nn.Conv1d with an odd kernel")
    if (conv.in_channels, conv.out_channels) != channels:
        raise _Unservable(f"{name} maps {conv.in_channels} to {conv.out_channels} channels, "
                          f"not {channels[0]} -> {channels[1]}")
    return k


def _timm_eca(module: nn.Module) -> StagedSpec:
    gate = _gate(module, "gate")
    if module.conv2 is None:
        k = _channel_kernel(module.conv, "conv", (1, 1))
        problem = _conv_problem(module.conv, "conv", nn.Conv1d, (k,), ((k - 1) // 2,))
        if problem:
            raise _Unservable(problem)
        return StagedSpec(ChannelConv(k), ("conv.weight", "conv.bias"), gate, AVG)
    hidden = module.conv.out_channels
    _channel_kernel(module.conv, "conv", (1, hidden))
    k = _channel_kernel(module.conv2, "conv2", (hidden, 1))
    problem = (_conv_problem(module.conv, "conv", nn.Conv1d, (1,), (0,))
               or _conv_problem(module.conv2, "conv2", nn.Conv1d, (k,), ((k - 1) // 2,)))
    if problem:
        raise _Unservable(problem)
    activation, slope = _activation(module, "act")
    return StagedSpec(ChannelConvMlp(k, activation, slope),
                      ("conv.weight", "conv.bias", "conv2.weight", "conv2.bias"), gate, AVG)


def _timm_ceca(module: nn.Module) -> StagedSpec:
    k = _channel_kernel(module.conv, "conv", (1, 1))
    problem = _conv_problem(module.conv, "conv", nn.Conv1d, (k,), (0,))
    if problem:
        raise _Unservable(problem)
    if module.padding != (k - 1) // 2:
        raise _Unservable(f"circular padding {module.padding} is not (kernel - 1) / 2 = {(k - 1) // 2}")
    return StagedSpec(ChannelConv(k, circular=True), ("conv.weight", "conv.bias"),
                      _gate(module, "gate"), AVG)


SERVED = {
    TORCHVISION_SE: _torchvision_se,
    TIMM_SE: _timm_se,
    TIMM_EFFICIENTNET_SE: _timm_efficientnet_se,
    TIMM_LEGACY_SE: _timm_legacy_se,
    TIMM_EFFECTIVE_SE: _timm_effective_se,
    TIMM_HGNET_ESE: _timm_hgnet_ese,
    TIMM_ECA: _timm_eca,
    TIMM_CECA: _timm_ceca,
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


def convert_se_modules(model: nn.Module, backend: str = "auto", *, fuse_blocks: bool = True) -> nn.Module:
    """Replace, in place, every SE module of `model` that se_kernels computes exactly, and
    (with fuse_blocks) every residual block whose tail it fuses.

    Served: torchvision.ops.SqueezeExcitation (EfficientNet, MobileNetV3, RegNet), timm's
    SEModule (ResNet/RegNet/ByobNet "se" attention, add_maxpool -> "avgmax", bias=False, a
    BatchNorm between the FCs as in RexNet), timm's EfficientNet/MobileNet SqueezeExcite,
    timm's legacy senet.SEModule, EffectiveSEModule and hgnet's EseModule (one FC), and
    EcaModule/CecaModule (ECA), with any activation and gate module that
    se_kernels.options.ACTIVATION_CLASSES / GATE_CLASSES map to an option (torch's or
    timm's), LeakyReLU of any slope. The two-FC ones run on the fused op, the others on the
    staged path (DESIGN.md §1.4).

    Blocks (fuse_blocks=True): timm's ResNet Bottleneck and BasicBlock with an SE (SE-ResNet,
    SE-ResNeXt, ECA-ResNet, ...), timm's legacy SENet blocks and se_kernels.models'
    SEBottleneck run BatchNorm -> SE -> drop path -> + shortcut -> ReLU as one fused tail
    (se_kernels.tail, DESIGN.md §1.5), which computes the same function. Blocks with an
    activation between the BatchNorm and the SE run BatchNorm -> activation -> SE as one
    act tail: timm's EfficientNet/MobileNet DepthwiseSeparableConv and InvertedResidual
    (a BatchNormAct2d before the SE) and RegNet Bottleneck, torchvision's MBConv,
    MobileNetV3 InvertedResidual and RegNet ResBottleneckBlock. A block whose tail cannot
    fuse exactly (another norm or activation, a layer between the norm and the SE, an SE
    that pools otherwise, hooks) keeps the SE-only conversion, and the summary says why.

    The replacement holds the original's submodules under their original names, so the
    parameters stay the same tensors and `state_dict()` keys are unchanged: checkpoints
    load into the converted model and back into the original architecture. Modules it
    cannot serve exactly stay as they are; a WARNING log record says which and why, and
    an INFO record sums up (logger "se_kernels.convert"). `find_se_modules(model)` lists
    the same findings without changing anything.

    Args:
        model: any nn.Module; if it is itself an SE module or block, its replacement is
            returned.
        backend: the se_kernels backend the converted modules ask for ("auto" picks per call).
        fuse_blocks: fuse the tails of the blocks it recognises; False converts SE modules only.

    Returns:
        The model (the same object, unless the model itself was replaced).
    """
    from .blocks import FusedBlock, fused_block, inspect_block

    if backend != "auto":
        dispatch.get_backend(backend)  # an unknown name fails now, not at the first forward
    # Decided once per module object, so a module shared by two parents is reported once
    # and both parents get the same replacement.
    replacements: dict[int, nn.Module | None] = {}  # id(module) -> replacement, None: keep
    reports: list[SEModuleReport] = []
    blocks: list[tuple[str, str, str | None]] = []  # (name, block class, reason or None: fused)
    already_fused = sum(isinstance(m, (SqueezeExcitation, ConvertedSqueezeExcitation, FusedBlock))
                        for m in model.modules())

    def replacement(name: str, module: nn.Module) -> nn.Module | None:
        if id(module) not in replacements:
            replacements[id(module)] = None
            block, reason = inspect_block(module) if fuse_blocks else (None, None)
            if block is not None:
                se = module.get_submodule(block.se)
                if inspect_se_module(se) is not None:
                    reports.append(SEModuleReport(f"{name}.{block.se}".lstrip("."),
                                                  qualified_name(type(se)), block.se_spec))
                blocks.append((name, block.kind, None))
                replacements[id(module)] = fused_block(module, block, backend)
            else:
                if reason is not None:
                    blocks.append((name, qualified_name(type(module)), reason))
                report = inspect_se_module(module, name)
                if report is not None:
                    reports.append(report)
                    if report.servable:
                        replacements[id(module)] = ConvertedSqueezeExcitation(module, report.spec,
                                                                              backend)
        return replacements[id(module)]

    model = _replace_modules(model, replacement)
    _log_summary(reports, already_fused, blocks)
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


def restore_module(module: nn.Module) -> nn.Module:
    """The original SE module of `module`, holding `module`'s current children (so the
    same parameter tensors) and in its training mode. The served classes keep all their
    parameters and buffers in those children, so nothing else can have changed."""
    original = module.__dict__.get("original")
    if original is None:
        raise ValueError(f"cannot restore {module.source}: this {type(module).__name__} "
                         f"holds no original module (it was not made by convert_se_modules)")
    original._modules.clear()
    original._modules.update(module._modules)
    original.training = module.training
    return original


def restore_se_modules(model: nn.Module) -> nn.Module:
    """Undo convert_se_modules, in place: put back the original torchvision/timm SE module
    of every ConvertedSqueezeExcitation, and the original block of every FusedBlock, in
    `model`.

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

    from .blocks import FusedBlock

    def original_of(name: str, module: nn.Module) -> nn.Module | None:
        if not isinstance(module, (ConvertedSqueezeExcitation, FusedBlock)):
            return None
        if id(module) not in restored:
            restored[id(module)] = restore_module(module)
        return restored[id(module)]

    model = _replace_modules(model, original_of)
    if restored:
        logger.info("restore_se_modules: restored %d modules", len(restored))
    return model


def _blocks_summary(blocks: list[tuple[str, str, str | None]]) -> str:
    """"; fused the tails of 16 blocks (16 x timm.models.resnet.Bottleneck); 2 blocks SE
    only: reason [names]"."""
    fused = Counter(kind for _, kind, reason in blocks if reason is None)
    text = ""
    if fused:
        text += (f"; fused the tails of {sum(fused.values())} blocks ("
                 + ", ".join(f"{n} x {kind}" for kind, n in fused.items()) + ")")
    kept: dict[str, list[str]] = defaultdict(list)
    for name, kind, reason in blocks:
        if reason is not None:
            kept[f"{kind}: {reason}"].append(name or "<root>")
    for why, names in kept.items():
        shown = ", ".join(names[:5]) + (f", ... ({len(names) - 5} more)" if len(names) > 5 else "")
        text += f"; {len(names)} blocks keep their tail unfused, {why} [{shown}]"
    return text


def _log_summary(reports: list[SEModuleReport], already_fused: int,
                 blocks: list[tuple[str, str, str | None]] = ()) -> None:
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
    fused += _blocks_summary(blocks)
    if not reports:
        log = logger.info if already_fused else logger.warning
        log("convert_se_modules: found no SE module of a known class to convert%s", fused)
        return
    logger.info("convert_se_modules: converted %d of %d SE modules%s%s", sum(served.values()),
                len(reports), "".join(f"; {n} x {source}" for source, n in served.items()), fused)
