"""SE-ResNet builders: architecture (parameter counts, timm's seresnet50 weights), the fused
SE + residual + ReLU epilogue against the unfused composition (fp64), and training."""

import copy
import functools
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import se_kernels
from helpers import randomize_norms, sgd_losses
from se_kernels.models import INTEGRATIONS, SEBottleneck, se_resnet50, se_resnet101, se_resnet152

torchvision = pytest.importorskip("torchvision", reason="torchvision is a test extra: pip install .[test]")

BUILDERS = {50: (se_resnet50, torchvision.models.resnet50, [3, 4, 6, 3]),
            101: (se_resnet101, torchvision.models.resnet101, [3, 4, 23, 3]),
            152: (se_resnet152, torchvision.models.resnet152, [3, 8, 36, 3])}


# Whole models in fp64: one thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_se_resnet50_parameter_count():
    # torchvision's resnet50 (25,557,032) plus the 16 SE blocks' FCs at r=16: the count
    # of the SE-ResNet-50 of the paper and of timm's seresnet50.
    assert count_parameters(se_resnet50()) == 28_088_024


@pytest.mark.parametrize("depth, reduction", [(50, 16), (50, 8), (101, 16), (152, 16)])
def test_parameter_count_is_resnet_plus_se_fcs(depth, reduction):
    build, build_resnet, layers = BUILDERS[depth]
    model = build(reduction)
    se_fcs = 0
    for planes, blocks in zip((64, 128, 256, 512), layers):
        c = planes * 4
        s = c // reduction
        se_fcs += blocks * (c * s + s + s * c + c)  # fc1 and fc2 with biases
    assert count_parameters(model) == count_parameters(build_resnet()) + se_fcs
    blocks = [m for m in model.modules() if isinstance(m, SEBottleneck)]
    assert len(blocks) == sum(layers)
    for block in blocks:
        c = block.bn3.num_features
        assert (block.se.fc1.in_channels, block.se.fc1.out_channels) == (c, c // reduction)
        assert block.se.out_activation == "relu"


def test_se_resnet50_matches_timm_seresnet50():
    """timm's seresnet50 has the same architecture and state_dict keys: its weights load
    strictly and give the same outputs, which pins the SE's place and widths."""
    timm = pytest.importorskip("timm", reason="timm is a test extra: pip install .[test]")
    theirs = timm.create_model("seresnet50", pretrained=False)
    randomize_norms(theirs, seed=0)
    ours = se_resnet50()
    ours.load_state_dict(theirs.state_dict())
    ours, theirs = ours.double().eval(), theirs.double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-12)


def unfused_block_forward(block: SEBottleneck, x: torch.Tensor) -> torch.Tensor:
    """The block as plain PyTorch ops, its SE where `block.integration` puts it (the paper's
    Fig. 5 and Table 15): on the branch before the add, on the unit's input, after the add
    and ReLU, on the identity branch, or after the 3x3 conv."""
    def se(t):
        fc1, fc2 = block.se.fc1, block.se.fc2
        return t * torch.sigmoid(fc2(F.relu(fc1(t.mean((2, 3), keepdim=True)))))

    where = block.integration
    identity = x if block.downsample is None else block.downsample(x)
    out = F.relu(block.bn1(block.conv1(se(x) if where == "pre" else x)))
    out = F.relu(block.bn2(block.conv2(out)))
    out = block.bn3(block.conv3(se(out) if where == "after_3x3" else out))
    if where == "standard":
        out = se(out)
    elif where == "identity":
        identity = se(identity)
    out = F.relu(out + identity)
    return se(out) if where == "post" else out


# Every integration with both shortcuts and both modes; the layouts on the standard one.
BLOCK_CASES = [(integration, stride, "nchw", train) for integration in INTEGRATIONS
               for stride in (1, 2) for train in (True, False)]
BLOCK_CASES += [("standard", stride, "channels_last", train) for stride in (1, 2)
                for train in (True, False)]


@pytest.mark.parametrize("integration, stride, layout, train", BLOCK_CASES,
                         ids=["-".join(map(str, case)) for case in BLOCK_CASES])
def test_block_matches_unfused_composition(integration, stride, layout, train):
    torch.manual_seed(0)
    planes = 8
    inplanes = planes * 4 if stride == 1 else 24  # stride 1: identity shortcut, no downsample
    downsample = None
    if stride != 1:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(planes * 4))
    block = SEBottleneck(inplanes, planes, stride, downsample, reduction=4, integration=integration)
    randomize_norms(block, seed=1)
    block = block.double().train(train)
    reference = copy.deepcopy(block)
    x = torch.randn(2, inplanes, 7, 9, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    grad = None
    results = []
    unfused = functools.partial(unfused_block_forward, reference)
    for module, forward in ((block, block), (reference, unfused)):
        xx = x.detach().clone().requires_grad_()
        out = forward(xx)
        if grad is None:
            grad = torch.randn(out.shape, dtype=torch.float64)
        out.backward(grad)
        results.append([out.detach(), xx.grad] + [p.grad for p in module.parameters()])
    # Not vacuous: the ReLU clips part of the sum, and every parameter gets a gradient.
    if integration != "post":  # post's SE follows the ReLU: a sigmoid scale keeps zeros
        assert 0 < (results[1][0] == 0).double().mean() < 1
    for got, expected in zip(*results):
        assert expected.abs().max() > 0
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_se_resnet50_trains():
    torch.manual_seed(0)
    model = se_resnet50(num_classes=10)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    se_weight = model.layer4[0].se.fc1.weight
    before = se_weight.detach().clone()
    losses = sgd_losses(model, x, y, steps=5, lr=0.02)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses
    assert not torch.equal(se_weight, before), "the SE weights did not train"


def test_zero_init_residual_zeroes_the_last_bn():
    model = se_resnet50(zero_init_residual=True)
    bn3 = [m.bn3.weight for m in model.modules() if isinstance(m, SEBottleneck)]
    assert len(bn3) == 16 and all(torch.all(w == 0) for w in bn3)


def test_backend_reaches_the_se_modules():
    model = se_resnet50(backend="torch")
    se_modules = [m for m in model.modules() if isinstance(m, se_kernels.SqueezeExcitation)]
    assert len(se_modules) == 16 and {m.backend for m in se_modules} == {"torch"}


@pytest.mark.parametrize("reduction, message", [
    (0, "reduction must be a positive int, got 0"),
    (1.5, "reduction must be a positive int, got 1.5"),
    (512, "reduction=512 leaves no squeeze channels for 256 channels"),
])
def test_bad_reduction_is_rejected(reduction, message):
    with pytest.raises(ValueError, match=message):
        se_resnet50(reduction)


@pytest.mark.parametrize("integration, se_channels", [
    ("standard", [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3),
    ("pre", [64, 256, 256, 256, 512, 512, 512, 512, 1024, 1024, 1024, 1024, 1024, 1024, 2048, 2048]),
    ("after_3x3", [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3)])
def test_integration_places_the_se_on_the_paper_s_channels(integration, se_channels):
    model = se_resnet50(integration=integration)
    blocks = [m for m in model.modules() if isinstance(m, SEBottleneck)]
    assert [b.se.fc1.in_channels for b in blocks] == se_channels
    assert {b.integration for b in blocks} == {integration}


def test_bad_integration_is_rejected():
    with pytest.raises(ValueError, match="integration must be one of 'standard', 'pre', 'post', "
                                         "'identity', 'after_3x3', got 'middle'"):
        se_resnet50(integration="middle")


def test_weights_argument_is_rejected():
    with pytest.raises(TypeError, match="take no weights="):
        se_resnet50(weights="IMAGENET1K_V1")


def test_missing_torchvision_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision.models.resnet", None)
    with pytest.raises(ImportError, match="pip install torchvision"):
        se_resnet50()
