"""SqueezeExcitation as a drop-in for torchvision.ops.SqueezeExcitation."""

import pytest
import torch
from torch import nn

import se_kernels

torchvision = pytest.importorskip("torchvision", reason="torchvision is a test extra: pip install .[test]")


@pytest.mark.parametrize("activation, gate", [(nn.ReLU, nn.Sigmoid), (nn.SiLU, nn.Sigmoid),
                                              (nn.ReLU, nn.Hardsigmoid)])
def test_state_dict_round_trip_with_torchvision(activation, gate):
    ours = se_kernels.SqueezeExcitation(24, 6, activation, gate).double()
    theirs = torchvision.ops.SqueezeExcitation(24, 6, activation, gate).double()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict())          # ours -> torchvision
    x = torch.randn(3, 24, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x))
    fresh = se_kernels.SqueezeExcitation(24, 6, activation, gate).double()
    fresh.load_state_dict(theirs.state_dict())         # torchvision -> ours
    torch.testing.assert_close(fresh(x), theirs(x))


def test_gradients_match_torchvision():
    ours = se_kernels.SqueezeExcitation(16, 4).double()
    theirs = torchvision.ops.SqueezeExcitation(16, 4).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64).to(memory_format=torch.channels_last)
    grads = []
    for module in (ours, theirs):
        xx = x.clone().requires_grad_()
        (module(xx) * torch.linspace(-1, 1, 16, dtype=torch.float64)[:, None, None]).sum().backward()
        grads.append([xx.grad] + [p.grad for p in module.parameters()])
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected)


def test_residual_and_out_activation():
    module = se_kernels.SqueezeExcitation(8, 2, out_activation="relu").double()
    x, r = torch.randn(2, 8, 3, 3, dtype=torch.float64), torch.randn(2, 8, 3, 3, dtype=torch.float64)
    plain = se_kernels.SqueezeExcitation(8, 2).double()
    plain.load_state_dict(module.state_dict())
    torch.testing.assert_close(module(x, r), torch.relu(plain(x) + r))


def test_autocast_bf16_casts_weights_like_conv():
    module = se_kernels.SqueezeExcitation(16, 4)
    x = torch.randn(2, 16, 4, 4).to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert module.fc1.weight.grad.dtype == torch.float32
    assert module.fc1.weight.grad.abs().sum() > 0


def test_weights_dtype_mismatch_outside_autocast_is_an_error():
    module = se_kernels.SqueezeExcitation(16, 4)
    with pytest.raises(TypeError, match="w1 must have dtype torch.bfloat16"):
        module(torch.randn(2, 16, 4, 4, dtype=torch.bfloat16))


@pytest.mark.parametrize("kwargs, message", [
    (dict(activation=nn.Mish), r"activation must make a module computing one of the activations "
                               r"\(relu, silu, .*\); Mish\(\) computes none of them"),
    (dict(activation=lambda: nn.LeakyReLU(0.2)), r"LeakyReLU\(negative_slope=0.2\) computes none"),
    (dict(scale_activation=nn.Softsign), r"scale_activation must make a module computing one of "
                                         r"the gates \(sigmoid, hardsigmoid, tanh, relu\)"),
    (dict(pool="median"), "pool must be one of"),
    (dict(out_activation="gelu"), "out_activation must be None or 'relu'"),
])
def test_constructor_rejects_what_it_cannot_fuse(kwargs, message):
    with pytest.raises(ValueError, match=message):
        se_kernels.SqueezeExcitation(8, 2, **kwargs)


def test_squeeze_channels_must_be_positive():
    with pytest.raises(ValueError, match="squeeze_channels must be >= 1, got 0"):
        se_kernels.SqueezeExcitation(8, 0)


def test_repr_names_the_options():
    text = repr(se_kernels.SqueezeExcitation(8, 2, pool="avgmax", backend="cpu"))
    assert "fc1" in text and "pool='avgmax'" in text and "backend='cpu'" in text
