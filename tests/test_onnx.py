"""ONNX export of models with se_kernels layers, as a user runs it (torch.onnx.export with
no extra argument, either exporter): the graph holds standard operators only, and ONNX
Runtime's output matches the fused kernels' in fp32."""


import pytest
import torch
from torch import nn

import se_kernels
from helpers import CASE_OUT_ACTIVATIONS, covering_cases, fused_forward, image, randomize_norms
from se_kernels.convert import convert_se_modules
from se_kernels.options import ACTIVATION_MODULES, ACTIVATIONS, GATE_MODULES, GATES, POOLS
from test_convert import build, scale_weights

onnx = pytest.importorskip("onnx", reason="onnx is a test extra: pip install .[test]")
pytest.importorskip("onnxscript", reason="onnxscript is a test extra: pip install .[test]")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a test extra: pip install .[test]")

# Whole models: one thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def onnx_operators(path) -> set[tuple[str, str]]:
    proto = onnx.load(str(path))
    assert not proto.functions, "the exported model defines its own functions"
    return {(node.domain, node.op_type) for node in proto.graph.node}


def assert_standard_onnx(path) -> None:
    operators = onnx_operators(path)
    custom = sorted(op for op in operators if op[0] not in ("", "ai.onnx"))
    assert not custom, f"operators outside the default ONNX domain: {custom}"


def run_onnx(path, args: tuple) -> torch.Tensor:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {spec.name: arg.numpy() for spec, arg in zip(session.get_inputs(), args)}
    return torch.from_numpy(session.run(None, feeds)[0])


def assert_close_relative(got: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """Max error within tol of the largest magnitude of the expected output."""
    assert got.shape == expected.shape and got.dtype == expected.dtype
    err, scale = (got - expected).abs().max().item(), expected.abs().max().item()
    assert scale > 0 and err <= tol * scale, f"max error {err:.3g} > {tol:g} x {scale:.3g}"


def check_onnx_export(model: nn.Module, args: tuple, path, se_count: int, **export_kwargs) -> None:
    """Export `model` to ONNX as a user would, and check the graph and onnxruntime's output."""
    expected = fused_forward(model, args, se_count)
    torch.onnx.export(model, args, str(path), **export_kwargs)
    assert_standard_onnx(path)
    assert_close_relative(run_onnx(path, args), expected)


# ---- ONNX: one SE layer, every option ---------------------------------------------------

# (residual, out_activation) by name: "plain", "residual", "relu", "residual-relu", ...
EPILOGUES = {"-".join(filter(None, ("residual" if residual else None, out))) or "plain":
             (residual, out) for out in CASE_OUT_ACTIVATIONS for residual in (False, True)}


def se_layer(activation="relu", gate="sigmoid", pool="avg", out_activation=None, bias=True,
             backend="auto", c=24, s=6) -> se_kernels.SqueezeExcitation:
    torch.manual_seed(0)
    layer = se_kernels.SqueezeExcitation(c, s, ACTIVATION_MODULES[activation], GATE_MODULES[gate],
                                         pool=pool, out_activation=out_activation, backend=backend)
    if not bias:
        layer.fc1.bias = layer.fc2.bias = None
    scale_weights(layer, seed=1)
    return layer.eval()


def layer_args(residual: bool, c: int = 24) -> tuple:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, c, 5, 7, generator=gen)
    return (x, torch.randn(x.shape, generator=gen)) if residual else (x,)


@pytest.mark.parametrize("activation, gate, pool", [
    pytest.param(a, g, p, id=f"{a}-{g}-{p}") for a, g, p in covering_cases(ACTIVATIONS, GATES, POOLS)])
def test_onnx_export_of_every_activation_gate_and_pool(activation, gate, pool, tmp_path):
    layer = se_layer(activation, gate, pool, out_activation="relu")
    check_onnx_export(layer, layer_args(residual=True), tmp_path / "se.onnx", se_count=1,
                      dynamo=True)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
def test_onnx_export_of_every_epilogue_with_and_without_biases(epilogue, bias, tmp_path):
    residual, out_activation = EPILOGUES[epilogue]
    layer = se_layer("silu", "sigmoid", "avgmax", out_activation, bias)
    check_onnx_export(layer, layer_args(residual), tmp_path / "se.onnx", se_count=1, dynamo=True)


def test_onnx_export_maps_the_options_to_onnx_operators(tmp_path):
    """Not vacuous: the graph holds the operators of the options asked for."""
    layer = se_layer("silu", "hardsigmoid", "avgmax", "relu")
    torch.onnx.export(layer, layer_args(residual=True), str(tmp_path / "se.onnx"), dynamo=True)
    operators = {op for _, op in onnx_operators(tmp_path / "se.onnx")}
    assert {"ReduceMean", "ReduceMax", "Sigmoid", "HardSigmoid", "Relu", "Add"} <= operators


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_onnx_export_of_a_layer_pinned_to_a_backend(how, monkeypatch, tmp_path):
    """A backend named by the layer or by SE_KERNELS_BACKEND runs the model, and the export
    still writes standard operators: ONNX has no fused SE operator to export to."""
    if how == "environment":
        monkeypatch.setenv("SE_KERNELS_BACKEND", "cpu")
    layer = se_layer(backend="cpu" if how == "argument" else "auto")
    check_onnx_export(layer, layer_args(residual=False), tmp_path / "se.onnx", se_count=1,
                      dynamo=True)


# The checks of the arguments compare traced sizes; squeeze_excitation keeps that quiet.
NO_TRACER_WARNINGS = pytest.mark.filterwarnings("error::torch.jit.TracerWarning")


@NO_TRACER_WARNINGS
@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("epilogue", ["plain", "residual-relu"])
def test_onnx_export_with_the_torchscript_exporter(pool, epilogue, tmp_path):
    residual, out_activation = EPILOGUES[epilogue]
    layer = se_layer("silu", "hardsigmoid", pool, out_activation)
    check_onnx_export(layer, layer_args(residual), tmp_path / "se.onnx", se_count=1, dynamo=False)


# ---- ONNX: whole models ------------------------------------------------------------------

# One model per SE class that convert_se_modules serves (the smallest; test_convert.py
# checks the conversion of the others).
ONNX_MODELS = [
    ("torchvision", "mobilenet_v3_large", 16),  # torchvision.ops.SqueezeExcitation in act tails
                                                # (BatchNorm -> act -> SE): 2 stream ops each
    ("timm", "seresnet18", 16),                # timm SEModule in fused block tails: 2 stream ops each
    ("timm", "efficientnet_b0", 32),           # timm SqueezeExcite in act tails
    ("timm", "legacy_seresnet18", 8),          # timm senet.SEModule
    ("timm", "rexnet_100", 13),                # timm SEModule with a BatchNorm between the FCs,
                                               # which eval folds into the first FC
]


@pytest.mark.parametrize("library, name, count", ONNX_MODELS,
                         ids=[f"{library}-{name}" for library, name, _ in ONNX_MODELS])
def test_onnx_export_of_converted_models(library, name, count, tmp_path):
    # backend "cpu", the auto choice here, named so that the 64x64 images' act tails run
    # fused (auto keeps act tails under 56x56 SE-only on CPU: blocks.ACT_TAIL_MIN_PIXELS_CPU)
    model = convert_se_modules(build(library, name), backend="cpu")
    check_onnx_export(model, (image(),), tmp_path / "model.onnx", se_count=count, dynamo=True)


# Staged forms whose excitation is linear: in inference each SE module runs one op
# (linear_form_forward); the export emits the torch backend's composition.
ONNX_STAGED_MODELS = [
    ("ese_vovnet19b_dw", 4, "Gemm"),                    # one FC: no hidden layer
    ("eca_resnext26ts", 8, "Conv"),                     # ECA
]


@pytest.mark.parametrize("name, count, operator", ONNX_STAGED_MODELS,
                         ids=[name for name, _, _ in ONNX_STAGED_MODELS])
def test_onnx_export_of_converted_staged_models(name, count, operator, tmp_path):
    model = convert_se_modules(build("timm", name))
    path = tmp_path / "model.onnx"
    check_onnx_export(model, (image(),), path, se_count=count, dynamo=True)
    assert ("", operator) in onnx_operators(path)


def test_onnx_export_of_circular_eca(tmp_path):
    from timm.layers.eca import CecaModule
    model = nn.Sequential(nn.Conv2d(3, 24, 3), CecaModule(24, act_layer=nn.ReLU)).eval()
    scale_weights(model, seed=0)
    model = convert_se_modules(model)
    check_onnx_export(model, (image(size=16),), tmp_path / "model.onnx", se_count=1, dynamo=True)


def se_resnet(depth: int) -> nn.Module:
    """A random SE-ResNet with small residual branches, as trained ones have (and as the
    zero-initialised last BN of each branch starts them): with branches as large as the
    identity, the activations grow with depth, and fp32 rounding with them, which differs
    between any two implementations of the convolutions by more than 1e-5 at depth 101."""
    torch.manual_seed(0)
    model = getattr(se_kernels.models, f"se_resnet{depth}")(num_classes=10)
    randomize_norms(model, seed=0)
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, se_kernels.models.SEBottleneck):
                block.bn3.weight.mul_(0.2)
                block.bn3.bias.mul_(0.2)
    return model.eval()


@pytest.mark.parametrize("depth", [50, pytest.param(101, marks=pytest.mark.slow),
                                   pytest.param(152, marks=pytest.mark.slow)])
def test_onnx_export_of_se_resnet(depth, tmp_path):
    blocks = {50: 16, 101: 33, 152: 50}[depth]
    check_onnx_export(se_resnet(depth), (image(size=32),), tmp_path / "model.onnx",
                      se_count=blocks, dynamo=True)


@NO_TRACER_WARNINGS
def test_onnx_export_of_a_converted_model_with_the_torchscript_exporter(tmp_path):
    model = convert_se_modules(build("torchvision", "mobilenet_v3_large"), backend="cpu")
    check_onnx_export(model, (image(),), tmp_path / "model.onnx", se_count=16, dynamo=False)
