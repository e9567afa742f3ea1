"""se-kernels flops: the FLOP and parameter tables of the SE paper (Hu et al., "Squeeze-and-
Excitation Networks", TPAMI 2019), recounted on torchvision's ResNets and ours.

FLOPs come from torch.utils.flop_counter.FlopCounterMode over one forward of a 1x3x224x224
image on fake tensors (shapes only, no arithmetic): 2 FLOPs per multiply-add in convolutions
and linear layers, and for our SE op the formula registered in se_kernels/_ops.py (pooling
adds, 2 per multiply-add in the two FCs, the scale multiply, the fused residual add). The
paper's "GFLOPs" are multiply-adds, so the tables show the counter's total / 2 as GMACs.

Differences from the paper, explained in the printed notes:
  * torchvision's ResNets are "v1.5": the stride-2 of a downsampling bottleneck sits on the
    3x3 conv, where the paper's (original Caffe) ResNet puts it on the first 1x1 conv. The
    3x3 conv then runs at the higher resolution: 4.09 vs 3.86 GMACs for ResNet-50. The
    "v1 strides" column moves the strides back and recounts the same model.
  * Table 10's parameter counts are ours rounded up to 0.1 M.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .. import _compat
from .report import number, table

# The paper's Table 2 (GFLOPs = multiply-adds, at 224x224) and Table 10 (SE-ResNet-50 params
# by reduction ratio r; "original" ResNet-50 25.6 M).
PAPER_GFLOPS = {"resnet50": 3.86, "se_resnet50": 3.87, "resnet101": 7.58, "se_resnet101": 7.60,
                "resnet152": 11.30, "se_resnet152": 11.32}
PAPER_PARAMS_M = {"resnet50": 25.6, "se_resnet50": 28.1}
PAPER_TABLE10_PARAMS_M = {2: 45.7, 4: 35.7, 8: 30.7, 16: 28.1, 32: 26.9}
# Table 15 (SE-ResNet-50, r=16): the standard SE and SE after the 3x3 conv, (GFLOPs, params
# M); Table 14 (standard, SE-PRE, SE-POST, SE-Identity) reports error rates only.
PAPER_TABLE15 = {"standard": (3.87, 28.1), "after_3x3": (3.86, 25.8)}
IMAGE_SIZE = 224


def count(build: Callable[[], nn.Module], *, v1_strides: bool = False) -> dict:
    """FLOPs (total and per op) of one 224x224 forward at batch 1, the parameter count, and
    the elements of all bottleneck outputs (= the residual additions, which FlopCounterMode
    does not count)."""
    from torch.utils.flop_counter import FlopCounterMode

    # FakeTensorMode goes on first so that the counter, entered above it, sees every op
    # before the fake tensors answer it.
    with _compat.fake_tensor_mode():
        model = build().eval()
        if v1_strides:
            to_v1_strides(model)
        block_outputs = []
        for module in model.modules():
            if isinstance(getattr(module, "conv3", None), nn.Conv2d):
                module.register_forward_hook(lambda m, i, out: block_outputs.append(out.numel()))
        image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(image)
        params = sum(p.numel() for p in model.parameters())
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return {"flops": counter.get_total_flops(), "by_op": by_op, "params": params,
            "residual_adds": sum(block_outputs)}


def to_v1_strides(model: nn.Module) -> None:
    """Move each downsampling bottleneck's stride from its 3x3 conv to its first 1x1 conv,
    as in the original ResNet (v1) the paper used. Parameters are unchanged."""
    for module in model.modules():
        conv1, conv2 = getattr(module, "conv1", None), getattr(module, "conv2", None)
        if isinstance(conv1, nn.Conv2d) and isinstance(conv2, nn.Conv2d) and \
                conv1.kernel_size == (1, 1) and conv2.stride == (2, 2):
            conv1.stride, conv2.stride = (2, 2), (1, 1)


def se_stages(model: nn.Module) -> list[tuple[int, int]]:
    """(blocks N_s, channels C_s) of every stage of a torchvision-style ResNet."""
    stages = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        layer = getattr(model, name)
        stages.append((len(layer), layer[-1].conv3.out_channels))
    return stages


def _builders():
    import torchvision

    from se_kernels import models

    return {
        "resnet50": torchvision.models.resnet50, "se_resnet50": models.se_resnet50,
        "resnet101": torchvision.models.resnet101, "se_resnet101": models.se_resnet101,
        "resnet152": torchvision.models.resnet152, "se_resnet152": models.se_resnet152,
    }


def table2(*, markdown: bool) -> str:
    builders = _builders()
    headers = ["model", "params M", "paper params M", "GMACs (v1.5)", "GMACs (v1 strides)",
               "v1 + residual adds", "paper GFLOPs", "SE op MFLOPs"]
    body = []
    for name, build in builders.items():
        v15, v1 = count(build), count(build, v1_strides=True)
        se_flops = v15["by_op"].get("se_kernels.se_forward", 0)
        body.append([name, number(v15["params"] / 1e6, 4), number(PAPER_PARAMS_M.get(name)),
                     f"{v15['flops'] / 2e9:.2f}", f"{v1['flops'] / 2e9:.2f}",
                     f"{v1['flops'] / 2e9 + v1['residual_adds'] / (2e9 if se_flops else 1e9):.2f}",
                     f"{PAPER_GFLOPS[name]:.2f}", number(se_flops / 1e6, 4) if se_flops else "-"])
    return table(headers, body, markdown=markdown)


def table10(*, markdown: bool) -> str:
    import torchvision

    from se_kernels.models import se_resnet50

    base = count(torchvision.models.resnet50)
    stages = se_stages(torchvision.models.resnet50())
    sum_nc2 = sum(n * c * c for n, c in stages)
    headers = ["r", "params M (counted)", "base + (2/r)*sum N*C^2", "+ SE biases",
               "counted, rounded up", "paper M", "GMACs (v1.5)"]
    body = [["none (ResNet-50)", number(base["params"] / 1e6, 5), "-", "-",
             f"{math.ceil(base['params'] / 1e5) / 10:.1f}", "25.6", f"{base['flops'] / 2e9:.2f}"]]
    for r, paper in PAPER_TABLE10_PARAMS_M.items():
        counted = count(lambda r=r: se_resnet50(reduction=r))
        formula = base["params"] + 2 / r * sum_nc2
        biases = sum(n * (c + c // r) for n, c in stages)
        body.append([str(r), number(counted["params"] / 1e6, 5), number(formula / 1e6, 5),
                     number((formula + biases) / 1e6, 5),
                     f"{math.ceil(counted['params'] / 1e5) / 10:.1f}", f"{paper:.1f}",
                     f"{counted['flops'] / 2e9:.2f}"])
    return table(headers, body, markdown=markdown), stages, sum_nc2


def table15(*, markdown: bool) -> str:
    from se_kernels.models import INTEGRATIONS, se_resnet50

    headers = ["integration", "params M (counted)", "counted, rounded up", "paper params M",
               "GMACs (v1.5)", "GMACs (v1 strides)", "paper GFLOPs", "SE op MFLOPs",
               "SE op fuses the add + ReLU"]
    body = []
    for integration in INTEGRATIONS:
        build = lambda integration=integration: se_resnet50(integration=integration)
        v15, v1 = count(build), count(build, v1_strides=True)
        paper_gflops, paper_params = PAPER_TABLE15.get(integration, (None, None))
        body.append([integration, number(v15["params"] / 1e6, 5),
                     f"{math.ceil(v15['params'] / 1e5) / 10:.1f}", number(paper_params),
                     f"{v15['flops'] / 2e9:.2f}", f"{v1['flops'] / 2e9:.2f}", number(paper_gflops),
                     number(v15["by_op"].get("se_kernels.se_forward", 0) / 1e6, 4),
                     "yes" if integration in ("standard", "identity") else "no"])
    return table(headers, body, markdown=markdown)


NOTES = """\
Notes
- GMACs = FlopCounterMode FLOPs / 2 at 224x224, batch 1. The paper counts multiply-adds.
- torchvision's ResNets are v1.5 (stride 2 on the 3x3 conv of each downsampling block); the
  paper's are v1 (stride 2 on the first 1x1 conv). "GMACs (v1 strides)" recounts the same
  models with the strides moved back: that accounts for the gap to the paper (4.09 vs 3.86
  for ResNet-50).
- What remains for ResNet-101/152 (0.01-0.02 G) is the residual additions: FlopCounterMode
  counts no elementwise op, and adding one op per element of every bottleneck output
  (5.5 M / 8.9 M / 13.1 M elements, found with forward hooks) gives the paper's 3.86 / 7.58 /
  11.30 exactly ("v1 + residual adds"), so the paper's count includes them. In the SE rows
  our op's formula already counts each add as 1 FLOP (half a MAC after the /2): the column
  adds the other half, and lands within 0.01 of the paper (which does not state how it
  counted SE's pooling and scaling; at one op per element they add 0.005-0.013 G).
- SE op MFLOPs: our op's registered formula: pooling adds, 2 per multiply-add in the FCs,
  the scale multiply and the fused residual add (so the SE rows already hold the residual
  adds, at half weight after the /2). SE adds ~0.01-0.02 GMACs per network (the paper: 3.86
  -> 3.87, 7.58 -> 7.60, 11.30 -> 11.32).
- Parameters do not depend on strides. The paper's Table 10 matches our counts rounded up to
  0.1 M (ResNet-50 25.557 M -> 25.6, SE-ResNet-50 r=16 28.088 M -> 28.1, r=8 30.604 -> 30.7).
  The formula (2/r) * sum_s N_s * C_s^2 counts the SE weights; each SE block adds C + C/r
  biases on top.
- Tables 14-15: SE-PRE sees each block's input channels and SE after the 3x3 conv the
  block's width, so both have fewer SE parameters; SE-POST and SE-Identity have the
  standard SE's. Where the SE op cannot fuse the residual add (pre, post, after_3x3), the
  add and ReLU run as their own ops and FlopCounterMode does not count them, so those rows
  count up to 0.005 GMACs less than the fused ones for the same arithmetic.
"""


def main(args) -> int:
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        raise SystemExit("se-kernels flops needs torchvision: pip install 'se-kernels[bench]'")
    markdown = bool(args.markdown)
    t2 = table2(markdown=markdown)
    t10, stages, sum_nc2 = table10(markdown=markdown)
    formula = ("ResNet-50 stages (N_s, C_s): " + ", ".join(f"({n}, {c})" for n, c in stages)
               + f"; sum N_s*C_s^2 = {sum_nc2:,}; (2/16)*sum = {sum_nc2 / 8:,.0f} SE weights at r=16")
    heading = "## " if markdown else ""
    text = "\n\n".join([
        f"{heading}Table 2 (paper) vs counted: ResNets and SE-ResNets (r=16) at 224x224", t2,
        f"{heading}Table 10 (paper) vs counted: SE-ResNet-50 parameters by reduction ratio r",
        t10, formula,
        f"{heading}Tables 14-15 (paper) vs counted: where the SE block sits in SE-ResNet-50 (r=16)",
        table15(markdown=markdown), NOTES])
    if args.markdown:
        from pathlib import Path

        Path(args.markdown).write_text("# SE paper FLOP and parameter tables, recounted\n\n" + text)
        print(f"wrote {args.markdown}")
    print(text)
    return 0
