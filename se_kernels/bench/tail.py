"""The block-tail suite: BatchNorm -> SE -> + shortcut -> ReLU, the tail of SE-ResNet-50's
and SE-ResNeXt-50's bottlenecks, on its own (DESIGN.md §1.5). Every peer holds the same
parameters and runs on the same inputs:

  eager     nn.BatchNorm2d, timm's SEModule, `+= shortcut`, nn.ReLU(inplace=True): what
            timm's Bottleneck runs from bn3 on (its drop path is off in these networks)
  se-only   the same BatchNorm, then the fused SE op with the shortcut as its residual and
            ReLU as its output activation (se_kernels.squeeze_excitation, backend auto):
            the SE op of convert_se_modules(fuse_blocks=False), with the add and the ReLU
            fused into it as well
  compile   torch.compile of eager (mode default; compile-max, when named, is
            max-autotune-no-cudagraphs)
  fused     the fused tail a converted block runs (FusedBlock.tail, se_kernels.tail,
            backend auto)

A second row group times EfficientNet-B0's act tails, BatchNorm -> SiLU -> SE
(shapes.act_tail_shapes, a shape with a norm_activation; no shortcut): eager is timm's
BatchNormAct2d and SqueezeExcite, se-only the same BatchNormAct2d then the fused SE op,
fused the act tail a converted block runs (FusedActBlock.act_tail).

A case is a block.Case of a tail shape (shapes.tail_shapes: C the block's output channels,
S its SE's squeeze). fwd is inference: the BatchNorm in eval mode, on its running
statistics, under no_grad. fwd+bwd is a training step's share: the BatchNorm on the batch's
statistics, updating the running ones, then the gradients of x, the shortcut, the
BatchNorm's weight and bias and the SE's four weights. (There is no bwd mode: a backward
replayed on a kept graph would find the running statistics it saved updated in place by
the forwards since.) The input sets, held results,
check against eager, timing and rows are the SE block suite's (block.py); a tail row adds
x_se_only, the speed-up over the se-only peer.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from se_kernels import dispatch
from se_kernels.blocks import ActBlockSpec, BlockSpec, FusedActBlock, FusedBlock, se_form
from se_kernels.call import make_call
from se_kernels.convert import inspect_se_module, staged_spec
from se_kernels.functional import squeeze_excitation
from se_kernels.options import OUT_RELU, qualified_name
from se_kernels.tail import make_call as make_tail_call

from . import block
from . import peers as peers_mod
from .report import BLOCK_COLUMNS
from .shapes import SEShape

EAGER, SE_ONLY, FUSED = peers_mod.EAGER, "se-only", "fused"
PEERS = (EAGER, SE_ONLY, *peers_mod.COMPILE_MODES, FUSED)
DEFAULT_PEERS = (EAGER, SE_ONLY, "compile", FUSED)
GRADIENTS = ("dx", "dshortcut", "dbn_weight", "dbn_bias", "dw1", "db1", "dw2", "db2")
MODES = ("fwd", "fwd+bwd")
RESULT_NAMES = {"fwd": ("out",), "fwd+bwd": ("out", *GRADIENTS)}
ACT_RESULT_NAMES = {"fwd": ("out",),  # an act tail has no shortcut
                    "fwd+bwd": ("out", *(g for g in GRADIENTS if g != "dshortcut"))}
# A block row's columns, and the speed-up over se-only beside the one over compile.
_AT = BLOCK_COLUMNS.index("x_compile") + 1
TAIL_COLUMNS = [*BLOCK_COLUMNS[:_AT], "x_se_only", *BLOCK_COLUMNS[_AT:]]

NOTES = [
    "block tail peers, on the same parameters: eager = nn.BatchNorm2d -> timm SEModule -> "
    "+= shortcut -> ReLU(inplace) (timm's Bottleneck from bn3 on); se-only = the same "
    "BatchNorm, then se_kernels.squeeze_excitation with the shortcut as residual and "
    "out_activation relu (backend auto); compile = torch.compile of eager (mode default); "
    "fused = the fused tail of a converted block (FusedBlock.tail, backend auto)",
    "block tail modes: fwd = inference (the BatchNorm on its running statistics, under "
    "no_grad); fwd+bwd = training (batch statistics, the running ones updated), gradients "
    "of x, the shortcut, the BatchNorm's weight and bias and the SE's weights",
    "GB/s on the tail's floor bytes: fwd reads x and the shortcut and writes out once; bwd "
    "reads dout, out (the ReLU's mask) and x and writes dx and dshortcut once (plus the "
    "parameters, and their gradients)",
    "act tails (EfficientNet-B0, a norm activation): eager = timm BatchNormAct2d -> "
    "SqueezeExcite; se-only = the same BatchNormAct2d, then se_kernels.squeeze_excitation; "
    "fused = the act tail of a converted block (FusedActBlock.act_tail); floor bytes: fwd "
    "reads x and writes out once, bwd reads dout and x and writes dx once",
    "x eager / x compile / x se-only: speed-up over the eager tail / its torch.compile / "
    "the se-only peer",
    "check: each peer's output (and gradients) against eager's on the same inputs",
]


class EagerTail(nn.Module):
    """timm's Bottleneck from bn3 on: relu(se(bn(x)) + shortcut), the add and the ReLU in
    place, as timm runs them."""

    def __init__(self, channels: int, squeeze: int, activation: str, gate: str) -> None:
        super().__init__()
        from timm.layers import SEModule

        self.bn = nn.BatchNorm2d(channels)
        self.se = SEModule(channels, rd_channels=squeeze, act_layer=activation, gate_layer=gate)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        out = self.se(self.bn(x))
        out += shortcut
        return self.act(out)


def eager_tail(shape: SEShape, device: torch.device, dtype: torch.dtype) -> EagerTail:
    """The eager tail of `shape`, its BatchNorm's affine parameters and running statistics
    drawn at random: a fresh BatchNorm's (1, 0, 0, 1) would hide a peer that misuses them."""
    return _randomized_norm(EagerTail(shape.channels, shape.squeeze, shape.activation,
                                      shape.gate), device, dtype)


def _randomized_norm(tail: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    with torch.no_grad():
        tail.bn.weight.uniform_(0.5, 1.5)
        tail.bn.bias.normal_(0.0, 0.1)
        tail.bn.running_mean.normal_(0.0, 0.1)
        tail.bn.running_var.uniform_(0.5, 1.5)
    return tail.to(device=device, dtype=dtype)


class SEOnlyTail(nn.Module):
    """The eager tail's BatchNorm (an act tail's BatchNormAct2d), then the fused SE op on its
    output, with the shortcut, where there is one, as residual and ReLU as output
    activation."""

    def __init__(self, eager: nn.Module, backend: str = "auto") -> None:
        super().__init__()
        self.bn, self.se = eager.bn, eager.se
        self.spec = inspect_se_module(eager.se, "se").spec
        self.backend = backend

    def _arguments(self, u: torch.Tensor, shortcut: torch.Tensor | None) -> tuple[tuple, dict]:
        spec = self.spec
        reduce, expand = self.se.get_submodule(spec.reduce), self.se.get_submodule(spec.expand)
        epilogue = {} if shortcut is None else dict(residual=shortcut, out_activation=OUT_RELU)
        return ((u, reduce.weight, reduce.bias, expand.weight, expand.bias),
                dict(activation=spec.activation, gate=spec.gate, pool=spec.pool, **epilogue))

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        arguments, options = self._arguments(self.bn(x), shortcut)
        return squeeze_excitation(*arguments, **options, backend=self.backend)

    def runs(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> str:
        """The backend the SE op runs on (x stands for the BatchNorm's output: the same
        shape, dtype and layout)."""
        arguments, options = self._arguments(x, shortcut)
        return dispatch.select(make_call(*arguments, **options), self.backend).name


class FusedTail(nn.Module):
    """The fused tail a converted block runs (FusedBlock.tail) on the eager tail's own
    modules."""

    def __init__(self, eager: EagerTail, backend: str = "auto") -> None:
        super().__init__()
        se_spec = staged_spec(inspect_se_module(eager.se, "se").spec)
        spec = BlockSpec(qualified_name(type(eager)), "bn", "se", None, "act", se_spec)
        self.block = FusedBlock(eager, spec, backend)

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        return self.block.tail(x, shortcut, None)

    def runs(self, x: torch.Tensor, shortcut: torch.Tensor) -> str:
        """The backend whose stream ops run the tail: dispatch's choice for the call
        FusedBlock.tail makes."""
        block, spec = self.block, self.block.spec
        norm = block.bn
        form, params = se_form(block.se, spec.se_spec)
        call = make_tail_call(x, (norm.weight, norm.bias, norm.running_mean, norm.running_var),
                              form, params, gate=spec.se_spec.gate, batch_stats=norm.training,
                              eps=norm.eps, residual=shortcut, out_activation=OUT_RELU)
        return dispatch.select(call, block.backend).name


class EagerActTail(nn.Module):
    """timm's EfficientNet block from the BatchNormAct2d before its SE on: se(act(bn(x)))."""

    def __init__(self, shape: SEShape) -> None:
        super().__init__()
        from timm.layers import BatchNormAct2d, get_act_layer
        from timm.models._efficientnet_blocks import SqueezeExcite

        self.bn = BatchNormAct2d(shape.channels, act_layer=get_act_layer(shape.norm_activation))
        self.se = SqueezeExcite(shape.channels, rd_channels=shape.squeeze,
                                act_layer=get_act_layer(shape.activation),
                                gate_layer=get_act_layer(shape.gate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(self.bn(x))


class FusedActTail(nn.Module):
    """The act tail a converted block runs (FusedActBlock.act_tail) on the eager act tail's
    own modules."""

    def __init__(self, eager: EagerActTail, shape: SEShape, backend: str = "auto") -> None:
        super().__init__()
        report = inspect_se_module(eager.se, "se")
        spec = ActBlockSpec(qualified_name(type(eager)), "", "bn", "bn.act", "se",
                            shape.norm_activation, staged_spec(report.spec), report.spec)
        self.block = FusedActBlock(eager, spec, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.act_tail(x)

    def runs(self, x: torch.Tensor) -> str:
        """dispatch's choice for the call FusedActBlock.act_tail makes."""
        return self.block.act_tail_call(x)[1].name


OURS = {SE_ONLY: SEOnlyTail, FUSED: FusedTail}
ACT_OURS = {SE_ONLY: SEOnlyTail, FUSED: FusedActTail}


def floor_bytes(case: block.Case) -> int:
    """The fewest bytes the tail must move (DESIGN.md §1.5): the forward reads x and the
    shortcut and writes out once; the backward reads dout, out (the ReLU's mask) and x and
    writes dx and dshortcut once. The parameters (the SE's weights and biases, the
    BatchNorm's weight and bias) are read once each way and their gradients written once."""
    s = case.shape
    size = block.DTYPES[case.dtype].itemsize
    activation = case.batch * s.channels * s.height * s.width * size
    params = (2 * s.channels * s.squeeze + s.channels + s.squeeze + 2 * s.channels) * size
    # An act tail has no shortcut, nor an output ReLU whose mask the backward reads.
    forward = (2 if s.norm_activation else 3) * activation + params
    backward = (3 if s.norm_activation else 5) * activation + 2 * params
    return {"fwd": forward, "fwd+bwd": forward + backward}[case.mode]


def eager_act_tail(shape: SEShape, device: torch.device, dtype: torch.dtype) -> EagerActTail:
    """The eager act tail of `shape`, its BatchNorm's affine parameters and running
    statistics drawn at random, as eager_tail's."""
    return _randomized_norm(EagerActTail(shape), device, dtype)


def _ours(name: str, eager: nn.Module, shape: SEShape) -> nn.Module:
    return ACT_OURS[name](eager, shape) if name == FUSED and shape.norm_activation else (
        (ACT_OURS if shape.norm_activation else OURS)[name](eager))


def _peer(name: str, eager: nn.Module, shape: SEShape) -> tuple[nn.Module, list[torch.Tensor]]:
    """A peer's module and the parameters its gradients are taken of: eager's, which every
    peer holds."""
    module = _ours(name, eager, shape) if name in OURS else peers_mod.build_peer(name, eager, shape)
    return module, list(eager.parameters())


def runs_backend(name: str, eager: nn.Module, inputs, mode: str, shape: SEShape) -> str:
    """The se_kernels backend an se-only or fused peer runs on in `mode`; '' for the
    baselines."""
    if name not in OURS:
        return ""
    with torch.set_grad_enabled(mode != "fwd"):
        peer = _ours(name, eager, shape)
        return peer.runs(inputs[0][0]) if shape.norm_activation else peer.runs(*inputs[0][:2])


def run_case(case: block.Case, requested: list[str], device: torch.device, *, quick: bool,
             copy_gbps: float, refused: dict[str, set[str]]) -> list[dict]:
    """One row per peer of `case` (refused is block.run's: no peer here is a backend that
    refuses a case by its declarations; one that fails is an ERROR row)."""
    block.begin_case(case, device)
    act = case.shape.norm_activation is not None
    eager = (eager_act_tail if act else eager_tail)(case.shape, device, block.DTYPES[case.dtype])
    eager.train(case.mode != "fwd")
    inputs = block.make_inputs(case, device, arguments=1 if act else 2)
    names = [EAGER] + [n for n in (requested or DEFAULT_PEERS) if n != EAGER]
    builders = {name: functools.partial(_peer, name, eager, case.shape) for name in names}
    checked = block.check_peers(builders, inputs, case, device,
                                result_names=(ACT_RESULT_NAMES if act else RESULT_NAMES)[case.mode])
    rows = block.timed_rows(case, names, checked, device, quick=quick, floor=floor_bytes(case),
                            copy_gbps=copy_gbps, input_sets=len(inputs))
    se_only_us = next((r["median_us"] for r in rows if r["peer"] == SE_ONLY), math.nan)
    for row in rows:
        row.update(block.shape_fields(case.shape),
                   runs=runs_backend(row["peer"], eager, inputs, case.mode, case.shape),
                   x_se_only=se_only_us / row["median_us"])
    return rows
