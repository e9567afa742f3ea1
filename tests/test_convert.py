"""convert_se_modules on torchvision and timm models: same outputs and gradients (fp64),
state_dicts that load both ways, every SE converted, the unservable ones left and logged."""

import copy
import functools
import logging
import pickle
import weakref

import pytest
import torch
from torch import nn

import se_kernels
from helpers import randomize_norms, run_python
from se_kernels.convert import (TIMM_ECA, TIMM_EFFECTIVE_SE, TIMM_EFFICIENTNET_SE, TIMM_HGNET_ESE,
                                TIMM_LEGACY_SE, TIMM_SE, TORCHVISION_SE, ConvertedSqueezeExcitation,
                                StagedSpec, convert_se_modules, find_se_modules,
                                restore_se_modules)
from se_kernels.blocks import FusedBlock
from se_kernels.excitation import ChannelConv, ChannelConvMlp, Fc, Mlp
from se_kernels.call import SECall

torchvision = pytest.importorskip("torchvision", reason="torchvision is a test extra: pip install .[test]")
timm = pytest.importorskip("timm", reason="timm is a test extra: pip install .[test]")


# Whole models in fp64: one thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


LOGGER = "se_kernels.convert"

# (library, model, its SE class, how many SE modules the architecture has)
MODELS = [
    ("torchvision", "efficientnet_b0", TORCHVISION_SE, 16),
    ("torchvision", "mobilenet_v3_large", TORCHVISION_SE, 8),
    ("torchvision", "regnet_y_400mf", TORCHVISION_SE, 16),
    ("timm", "seresnet50", TIMM_SE, 16),
    ("timm", "efficientnet_b0", TIMM_EFFICIENTNET_SE, 16),
    ("timm", "legacy_seresnet18", TIMM_LEGACY_SE, 8),
    ("timm", "fbnetv3_b", TIMM_EFFICIENTNET_SE, 18),    # hardswish, hardsigmoid
    ("timm", "sedarknet21", TIMM_SE, 7),                 # leaky_relu
    ("timm", "rexnet_100", TIMM_SE, 13),                 # BatchNorm between the FCs
    ("timm", "ese_vovnet19b_dw", TIMM_EFFECTIVE_SE, 4),  # one FC
    ("timm", "hgnet_tiny", TIMM_HGNET_ESE, 5),           # one FC
    ("timm", "eca_resnext26ts", TIMM_ECA, 8),            # 1-D convolution across channels
]
MODEL_IDS = [f"{library}-{name}" for library, name, _, _ in MODELS]


def qualified_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


@functools.lru_cache(maxsize=None)
def pristine(library: str, name: str) -> nn.Module:
    """A random-init model (no download), in eval mode so BN uses its running statistics.
    Built once per test run: random init of the larger models costs more than a copy."""
    torch.manual_seed(0)
    if library == "torchvision":
        model = getattr(torchvision.models, name)(weights=None)
    else:
        model = timm.create_model(name, pretrained=False)
    randomize_norms(model, seed=0)
    return model.eval()


def build(library: str, name: str) -> nn.Module:
    return copy.deepcopy(pristine(library, name))


def served_se_modules(model: nn.Module) -> list[nn.Module]:
    """The SE modules se_kernels computes: converted ones, and those of fused block tails."""
    return [m for m in model.modules() if isinstance(m, ConvertedSqueezeExcitation)] + \
        [m.get_submodule(m.spec.se) for m in model.modules() if isinstance(m, FusedBlock)]


def zeroed(model: nn.Module) -> nn.Module:
    """The model with every parameter and buffer zero, so a state_dict load is visible."""
    with torch.no_grad():
        for value in model.state_dict().values():
            value.zero_()
    return model


def forward_backward(model: nn.Module, x: torch.Tensor, seed: int = 1) -> dict[str, torch.Tensor]:
    """The output, the input's gradient and every parameter's gradient, by parameter name."""
    x = x.detach().clone().requires_grad_()
    out = model(x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    out.backward(grad)
    result = {"out": out.detach(), "x.grad": x.grad}
    result.update({f"{n}.grad": p.grad for n, p in model.named_parameters()})
    return result


def assert_all_close(got: dict, expected: dict, tol: float, floor: float = 0.0) -> None:
    """Each tensor within tol of the largest magnitude of its expected value, or of `floor`
    times the largest of all (for a gradient that is zero in exact arithmetic, such as a
    bias before a batch norm, whose value is a sum of rounding errors)."""
    assert got.keys() == expected.keys()
    floor *= max(e.abs().max().item() for e in expected.values() if e is not None)
    for name, e in expected.items():
        g = got[name]
        assert g is not None and e is not None, f"{name}: missing"
        err = (g - e).abs().max().item()
        scale = max(e.abs().max().item(), floor)
        assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:g} x {scale:.3g}"


@pytest.mark.parametrize("library, name, source, count", MODELS, ids=MODEL_IDS)
def test_converted_model_matches_original(library, name, source, count):
    original = build(library, name).double()
    converted = convert_se_modules(build(library, name).double())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = forward_backward(original, x)
    got = forward_backward(converted, x)
    # torch's hardsigmoid backward multiplies by a float32 1/6 even in fp64 (3e-8 off, which
    # a deep network's gradients gather); everything else agrees to rounding.
    hardsigmoid = any(isinstance(m, nn.Hardsigmoid) for m in original.modules())
    assert_all_close(got, expected, tol=1e-6 if hardsigmoid else 1e-11)
    # Not vacuous: the SE weights take part in the gradients.
    se_grads = [p.grad for m in served_se_modules(converted) for p in m.parameters()]
    # (A gate saturated on every sample, hardsigmoid's beyond +-3, passes no gradient: fbnetv3
    # has such SE modules, so at least half of the SE parameters get one, not all.)
    assert len(se_grads) >= count  # ECA has one weight; the others two or more
    assert sum(bool(g.abs().max() > 0) for g in se_grads) >= len(se_grads) / 2


@pytest.mark.parametrize("library, name, source, count", MODELS, ids=MODEL_IDS)
def test_every_se_module_is_converted(library, name, source, count, caplog):
    model = build(library, name)
    assert sum(qualified_name(m) == source for m in model.modules()) == count
    parameters = [id(p) for p in model.parameters()]
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert convert_se_modules(model) is model
    converted = [m for m in model.modules() if isinstance(m, ConvertedSqueezeExcitation)]
    fused = [m.get_submodule(m.spec.se) for m in model.modules() if isinstance(m, FusedBlock)]
    assert len(converted) + len(fused) == count
    assert all(m.source == source for m in converted)
    assert all(qualified_name(m) == source for m in fused)
    assert sum(qualified_name(m) == source for m in model.modules()) == len(fused)
    # The same parameter tensors, in the same order: an optimizer built before still applies.
    assert [id(p) for p in model.parameters()] == parameters
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert f"converted {count} of {count} SE modules; {count} x {source}" in caplog.text


@pytest.mark.parametrize("library, name, source, count", MODELS, ids=MODEL_IDS)
def test_state_dict_round_trip(library, name, source, count):
    original = build(library, name)
    converted = convert_se_modules(zeroed(build(library, name)))
    assert converted.state_dict().keys() == original.state_dict().keys()
    converted.load_state_dict(original.state_dict())                 # original -> converted
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = original(x)
        # fp32 rounding, amplified through the depth alike in both: relative to the output's scale
        torch.testing.assert_close(converted(x), expected, rtol=1e-4,
                                   atol=1e-4 * expected.abs().max().item())
    fresh = zeroed(build(library, name))
    fresh.load_state_dict(converted.state_dict())                    # converted -> original
    for key, value in original.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def se_variants():
    """Small SE modules of every served class with each activation, gate, pool and bias
    option they offer, and the op options (activation, gate, pool) they must map to."""
    from timm.layers import activations, activations_me
    from timm.layers.helpers import make_divisible
    from timm.layers.squeeze_excite import SEModule
    from timm.models._efficientnet_blocks import SqueezeExcite
    from timm.models.senet import SEModule as LegacySEModule
    tv_se = torchvision.ops.SqueezeExcitation
    timm_se = functools.partial(SEModule, 24, rd_channels=6)
    inplace_silu = functools.partial(nn.SiLU, inplace=True)
    inplace_sigmoid = functools.partial(activations.Sigmoid, inplace=True)
    round_to_4 = functools.partial(make_divisible, divisor=4)
    relu_sigmoid, silu_sigmoid = ("relu", "sigmoid", "avg"), ("silu", "sigmoid", "avg")
    relu_hardsigmoid, silu_hardsigmoid = ("relu", "hardsigmoid", "avg"), ("silu", "hardsigmoid", "avg")
    return {
        "tv-relu-sigmoid": (lambda: tv_se(24, 6), relu_sigmoid),
        "tv-silu-inplace": (lambda: tv_se(24, 6, inplace_silu), silu_sigmoid),
        "tv-hardsigmoid": (lambda: tv_se(24, 6, nn.ReLU, nn.Hardsigmoid), relu_hardsigmoid),
        "timm-default": (lambda: timm_se(), relu_sigmoid),
        "timm-avgmax": (lambda: timm_se(add_maxpool=True), ("relu", "sigmoid", "avgmax")),
        "timm-no-bias": (lambda: timm_se(bias=False), relu_sigmoid),
        "timm-swish-hardsigmoid": (lambda: timm_se(act_layer="swish", gate_layer="hard_sigmoid"),
                                   silu_hardsigmoid),
        "timm-own-swish-hardsigmoid": (
            lambda: timm_se(act_layer=activations.Swish, gate_layer=activations.HardSigmoid),
            silu_hardsigmoid),
        "timm-me-variants": (
            lambda: timm_se(act_layer=activations_me.SwishMe, gate_layer=activations_me.HardSigmoidMe),
            silu_hardsigmoid),
        "timm-inplace-sigmoid": (lambda: timm_se(gate_layer=inplace_sigmoid), relu_sigmoid),
        "efficientnet-silu": (lambda: SqueezeExcite(24, act_layer=nn.SiLU), silu_sigmoid),
        "mobilenetv3-style": (lambda: SqueezeExcite(24, gate_layer="hard_sigmoid", force_act_layer=nn.ReLU,
                                                    rd_round_fn=round_to_4), relu_hardsigmoid),
        "legacy-senet": (lambda: LegacySEModule(24, reduction=4), relu_sigmoid),
        "gcvit-gelu": (lambda: timm_se(act_layer=nn.GELU), ("gelu", "sigmoid", "avg")),
        "timm-gelu": (lambda: timm_se(act_layer=activations.GELU), ("gelu", "sigmoid", "avg")),
        "gelu-tanh": (lambda: timm_se(act_layer=activations.GELUTanh), ("gelu_tanh", "sigmoid", "avg")),
        "fbnetv3-hardswish": (lambda: SqueezeExcite(24, act_layer=nn.Hardswish,
                                                    gate_layer="hard_sigmoid"),
                              ("hardswish", "hardsigmoid", "avg")),
        "timm-hardswish-me": (lambda: timm_se(act_layer=activations_me.HardSwishMe),
                              ("hardswish", "sigmoid", "avg")),
        "sedarknet-leaky-relu": (lambda: timm_se(act_layer=nn.LeakyReLU), ("leaky_relu", "sigmoid", "avg")),
        "tv-tanh-gate": (lambda: tv_se(24, 6, nn.ReLU, nn.Tanh), ("relu", "tanh", "avg")),
        "timm-tanh-gate": (lambda: timm_se(gate_layer=activations.Tanh), ("relu", "tanh", "avg")),
        "relu-gate": (lambda: tv_se(24, 6, nn.SiLU, nn.ReLU), ("silu", "relu", "avg")),
    }


def scale_weights(module: nn.Module, seed: int) -> None:
    """Weights large enough that hidden units and gate logits fall on both sides of the
    nonlinearities' kinks (hardsigmoid saturates outside +-3)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 3 / max(1, p[0].numel()) ** 0.5)


@pytest.mark.parametrize("variant", list(se_variants()))
def test_served_variant_matches_original(variant):
    make, (activation, gate, pool) = se_variants()[variant]
    torch.manual_seed(0)
    original = nn.Sequential(make()).double()
    scale_weights(original, seed=0)
    converted = convert_se_modules(copy.deepcopy(original))
    assert isinstance(converted[0], ConvertedSqueezeExcitation)
    spec = converted[0].spec
    assert (spec.activation, spec.gate, spec.pool) == (activation, gate, pool)
    x = torch.randn(3, 24, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert_all_close(forward_backward(converted, x), forward_backward(original, x),
                     tol=1e-7 if gate == "hardsigmoid" else 1e-11)
    assert converted.state_dict().keys() == original.state_dict().keys()


def with_forward_hook():
    se = torchvision.ops.SqueezeExcitation(24, 6)
    se.register_forward_hook(lambda module, args, out: out * 2)
    return se


class PatchedSqueezeExcitation(torchvision.ops.SqueezeExcitation):
    def forward(self, x):
        return super().forward(x) + x


def staged_variants():
    """Small SE modules whose excitation runs on the staged path, and the form each must
    map to (DESIGN.md §1.4)."""
    from timm.layers.eca import CecaModule, EcaModule
    from timm.layers.squeeze_excite import EffectiveSEModule, SEModule
    from timm.models.hgnet import EseModule
    timm_se = functools.partial(SEModule, 24, rd_channels=6)
    return {
        "rexnet-batchnorm": (lambda: timm_se(norm_layer=nn.BatchNorm2d), Mlp("relu", 0.01, norm=True)),
        "batchnorm-cumulative": (
            lambda: timm_se(norm_layer=functools.partial(nn.BatchNorm2d, momentum=None),
                            act_layer=nn.SiLU), Mlp("silu", 0.01, norm=True)),
        "batchnorm-no-affine-avgmax": (
            lambda: timm_se(norm_layer=functools.partial(nn.BatchNorm2d, affine=False), add_maxpool=True),
            Mlp("relu", 0.01, norm=True)),
        "leaky-relu-0.1": (lambda: timm_se(act_layer=lambda **_: nn.LeakyReLU(0.1)),
                           Mlp("leaky_relu", 0.1)),
        "effective-se": (lambda: EffectiveSEModule(24), Fc()),
        "effective-se-maxpool-sigmoid": (lambda: EffectiveSEModule(24, add_maxpool=True,
                                                                  gate_layer="sigmoid"), Fc()),
        "hgnet-ese": (lambda: EseModule(24), Fc()),
        "eca-adaptive": (lambda: EcaModule(24), ChannelConv(3)),
        "eca-k5-hardsigmoid": (lambda: EcaModule(kernel_size=5, gate_layer="hard_sigmoid"),
                               ChannelConv(5)),
        "eca-mlp": (lambda: EcaModule(24, kernel_size=5, use_mlp=True, act_layer=nn.GELU),
                    ChannelConvMlp(3, "gelu", 0.01)),
        "ceca": (lambda: CecaModule(24), ChannelConv(3, circular=True)),
        "ceca-bias-k7": (lambda: CecaModule(kernel_size=7, act_layer=nn.ReLU),
                         ChannelConv(7, circular=True)),
    }


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", list(staged_variants()))
def test_staged_variant_matches_original(variant, training):
    make, form = staged_variants()[variant]
    torch.manual_seed(0)
    original = nn.Sequential(make()).double().train(training)
    scale_weights(original, seed=0)
    randomize_norms(original, seed=1)
    converted = convert_se_modules(copy.deepcopy(original))
    spec = converted[0].spec
    assert isinstance(converted[0], ConvertedSqueezeExcitation) and isinstance(spec, StagedSpec)
    assert spec.form == form
    for step in range(2):  # the second step sees the running statistics the first updated
        x = torch.randn(3, 24, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        hardsigmoid = any(isinstance(m, nn.Hardsigmoid) or "HardSigmoid" in type(m).__name__
                          for m in original.modules())
        assert_all_close(forward_backward(converted, x), forward_backward(original, x),
                         tol=1e-7 if hardsigmoid else 1e-11, floor=1e-3)
        for key, value in original.state_dict().items():
            torch.testing.assert_close(converted.state_dict()[key], value, rtol=1e-13, atol=1e-13)
    assert converted.state_dict().keys() == original.state_dict().keys()
    restored = restore_se_modules(converted)
    assert type(restored[0]) is type(original[0])
    assert [id(p) for p in restored.parameters()] == [id(p) for p in converted.parameters()]


def test_eval_batchnorm_excitation_folds_into_the_fused_op_and_follows_its_parameters():
    """In eval the norm between the FCs folds into the first FC (the fused op runs it); calls
    autograd does not record reuse the folded weights while the parameters stay the same
    tensors, and make them anew after an in-place update, a .data assignment or a new
    parameter."""
    from timm.layers.squeeze_excite import SEModule
    torch.manual_seed(0)
    original = nn.Sequential(SEModule(24, rd_channels=6, norm_layer=nn.BatchNorm2d)).double().eval()
    randomize_norms(original, seed=1)
    converted = convert_se_modules(copy.deepcopy(original))
    assert isinstance(converted[0].se_call(torch.randn(1, 24, 3, 3, dtype=torch.float64)), SECall)
    x = torch.randn(2, 24, 5, 7, dtype=torch.float64)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(converted(x), original(x), rtol=1e-12, atol=1e-12)

    check()
    check()
    updates = [
        lambda m: m[0].bn.running_var.mul_(3.0),
        lambda m: m[0].bn.weight.add_(0.5),
        lambda m: setattr(m[0].fc1.bias, "data", m[0].fc1.bias.data + 1.0),
        lambda m: setattr(m[0].bn, "bias", nn.Parameter(m[0].bn.bias.detach() - 0.25)),
    ]
    for update in updates:
        with torch.no_grad():
            update(original)
            update(converted)
        check()


def unservable_cases():
    from timm.layers.gather_excite import GatherExcite
    from timm.layers.squeeze_excite import SEModule
    from timm.models._efficientnet_blocks import SqueezeExcite
    tv_se = torchvision.ops.SqueezeExcitation
    return {
        "sync-batchnorm": (lambda: SEModule(24, rd_channels=6, norm_layer=nn.SyncBatchNorm),
                           "norm layer bn=SyncBatchNorm between the FCs"),
        "group-norm": (lambda: SEModule(24, rd_channels=6, norm_layer=lambda c, **_: nn.GroupNorm(2, c)),
                       "norm layer bn=GroupNorm between the FCs: only nn.BatchNorm2d"),
        "mish-activation": (lambda: tv_se(24, 6, nn.Mish), "activation activation=Mish()"),
        "hardtanh-gate": (lambda: tv_se(24, 6, nn.ReLU, nn.Hardtanh), "gate scale_activation=Hardtanh"),
        "relu6-activation": (lambda: SqueezeExcite(24, act_layer=nn.ReLU6), "activation act1=ReLU6("),
        "gather-excite": (lambda: GatherExcite(24, use_mlp=False), "gather-excite"),
        "subclass": (lambda: PatchedSqueezeExcitation(24, 6), f"subclass of {TORCHVISION_SE}"),
        "forward-hook": (with_forward_hook, "has forward_hooks registered"),
    }


@pytest.mark.parametrize("case", list(unservable_cases()))
def test_unservable_module_is_left_as_is_and_logged(case, caplog):
    make, reason = unservable_cases()[case]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 24, 1), make(), nn.ReLU())
    se = model[1]
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        before = model(x)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert convert_se_modules(model) is model
    assert model[1] is se
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert reason in message and qualified_name(se) in message and "[1]" in message
    [report] = find_se_modules(model)
    assert report.name == "1" and report.source == qualified_name(se) and reason in report.reason


def test_mixed_model_converts_what_it_can(caplog):
    from timm.layers.squeeze_excite import SEModule
    model = nn.Sequential(torchvision.ops.SqueezeExcitation(8, 2),
                          nn.Sequential(SEModule(8, rd_channels=2, norm_layer=nn.SyncBatchNorm)))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        convert_se_modules(model)
    assert isinstance(model[0], ConvertedSqueezeExcitation)
    assert type(model[1][0]) is SEModule
    assert "converted 1 of 2 SE modules" in caplog.text
    assert f"left 1 {TIMM_SE} as is: norm layer bn=SyncBatchNorm between the FCs" in caplog.text


def test_shared_modules_stay_shared_and_are_reported_once(caplog):
    se = torchvision.ops.SqueezeExcitation(8, 2)
    kept = torchvision.ops.SqueezeExcitation(8, 2, nn.Mish)
    model = nn.Sequential(se, kept, nn.Sequential(se, kept))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        convert_se_modules(model)
    assert isinstance(model[0], ConvertedSqueezeExcitation) and model[2][0] is model[0]
    assert model[1] is kept and model[2][1] is kept
    assert "converted 1 of 2 SE modules" in caplog.text
    assert f"left 1 {TORCHVISION_SE} as is: activation activation=Mish" in caplog.text


def test_root_se_module_is_returned_converted():
    se = torchvision.ops.SqueezeExcitation(8, 2)
    converted = convert_se_modules(se)
    assert isinstance(converted, ConvertedSqueezeExcitation) and converted.fc1 is se.fc1


def test_second_conversion_finds_nothing_to_do(caplog):
    model = convert_se_modules(nn.Sequential(torchvision.ops.SqueezeExcitation(8, 2),
                                             se_kernels.SqueezeExcitation(8, 2)))
    first = model[0]
    with caplog.at_level(logging.INFO, logger=LOGGER):
        convert_se_modules(model)
    assert model[0] is first
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert "(2 already fused)" in caplog.text


def test_model_without_se_modules_is_reported(caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        convert_se_modules(nn.Sequential(nn.Conv2d(3, 8, 1)))
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "found no SE module" in caplog.text


def test_backend_is_checked_and_kept():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of .* got 'nope'"):
        convert_se_modules(nn.Sequential(torchvision.ops.SqueezeExcitation(8, 2)), backend="nope")
    torch.manual_seed(0)
    original = nn.Sequential(torchvision.ops.SqueezeExcitation(8, 2))
    model = convert_se_modules(copy.deepcopy(original), backend="torch")
    assert model[0].backend == "torch" and "backend='torch'" in repr(model)
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(model(x), original(x))


def test_converted_model_pickles_and_trains_mode_follows():
    model = convert_se_modules(nn.Sequential(torchvision.ops.SqueezeExcitation(8, 2)).eval())
    assert not model[0].training
    clone = pickle.loads(pickle.dumps(model))
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(clone(x), model(x))
    assert model.train()[0].training


def test_converted_model_compiles_without_graph_breaks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), torchvision.ops.SqueezeExcitation(8, 2))
    model = convert_se_modules(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 4, 4)
    x_compiled = x.clone().requires_grad_()
    torch.testing.assert_close(compiled(x_compiled), model(x))
    compiled(x_compiled).sum().backward()
    assert x_compiled.grad is not None and x_compiled.grad.abs().max() > 0


def test_converted_model_traces_with_fx():
    """timm's feature extraction and FX quantization trace models symbolically: the fused
    op must be a leaf of the graph, not run on tracing proxies."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), torchvision.ops.SqueezeExcitation(8, 2))
    model = convert_se_modules(model)
    traced = torch.fx.symbolic_trace(model)
    assert any(node.op == "call_function" and "squeeze_excitation" in str(node.target)
               for node in traced.graph.nodes)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(traced(x), model(x))


def test_import_does_not_load_timm_or_torchvision():
    code = ("import sys, se_kernels; loaded = sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('timm', 'torchvision')); print(loaded); assert not loaded")
    result = run_python("-c", code)
    assert result.returncode == 0, result.stdout + result.stderr


def test_calls_reuse_their_checks_and_backend_until_something_they_depend_on_changes(monkeypatch):
    """A call autograd does not record reuses the last call's validated arguments and
    backend while x differs only in its values; a new shape or layout, another backend (the
    attribute or SE_KERNELS_BACKEND), a registration, a mode change or a parameter replaced
    makes them anew. Copies and pickles take no cache."""
    from timm.layers.eca import EcaModule
    from se_kernels import dispatch
    torch.manual_seed(0)
    original = nn.Sequential(torchvision.ops.SqueezeExcitation(16, 4), EcaModule(16)).double().eval()
    model = convert_se_modules(copy.deepcopy(original))
    picked = []
    select = dispatch.select
    monkeypatch.setattr(dispatch, "select", lambda call, backend="auto": picked.append(
        (type(call).__name__, backend)) or select(call, backend))

    def check(x):
        with torch.no_grad():
            torch.testing.assert_close(model(x), original(x), rtol=1e-12, atol=1e-12)

    first = torch.randn(2, 16, 5, 3, dtype=torch.float64)
    check(first)
    assert picked == [("SECall", "auto"), ("StagedCall", "auto")]
    gone = weakref.ref(first)
    del first
    assert gone() is None  # the cache keeps no input alive
    x = torch.randn(2, 16, 5, 3, dtype=torch.float64)
    check(x)
    assert len(picked) == 2
    check(torch.randn_like(x))
    assert len(picked) == 2
    for change in (lambda: check(torch.randn(1, 16, 5, 3, dtype=torch.float64)),
                   lambda: check(x.contiguous(memory_format=torch.channels_last)),
                   lambda: setattr(model[0], "backend", "torch") or check(x),
                   lambda: monkeypatch.setenv(dispatch.BACKEND_ENV, "cpu") or check(x),
                   lambda: dispatch.register(dispatch.get_backend("torch")) and check(x),
                   lambda: setattr(model[1].conv, "weight", nn.Parameter(
                       original[1].conv.weight.detach().clone())) or check(x)):
        before = len(picked)
        change()
        assert len(picked) > before
    assert picked[-1] == ("StagedCall", "auto") and model[0].backend == "torch"
    with torch.no_grad():
        original[1].conv.weight.mul_(2.0)
        model[1].conv.weight.mul_(2.0)
    check(x)  # an in-place update: the call reads the same tensor, anew
    assert "_call_cache" in vars(model[1])
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert "_call_cache" not in vars(clone[1]) and "_call_cache" not in vars(clone[0])
        with torch.no_grad():
            torch.testing.assert_close(clone(x), original(x), rtol=1e-12, atol=1e-12)
    before = len(picked)
    check(x.requires_grad_())  # grad mode is off: still no recording, still reused
    assert len(picked) == before
    model(x).sum().backward()  # recorded calls are made anew each time
    assert len(picked) == before + 2
