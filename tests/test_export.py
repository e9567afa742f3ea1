"""Deploying models with se_kernels layers: ONNX export with either exporter (standard
operators only, checked with onnxruntime against the fused kernels), torch.export and
AOTInductor (which keep the fused op), and restore_se_modules (back to torchvision's and
timm's own modules)."""

import copy
import itertools
import pickle

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import se_kernels
from helpers import randomize_norms, run_python
from se_kernels.convert import ConvertedSqueezeExcitation, convert_se_modules, restore_se_modules
from test_convert import MODEL_IDS, MODELS, build, qualified_name, scale_weights, se_variants

onnx = pytest.importorskip("onnx", reason="onnx is a test extra: pip install .[test]")
pytest.importorskip("onnxscript", reason="onnxscript is a test extra: pip install .[test]")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a test extra: pip install .[test]")

# Whole models: one thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FUSED_OP = torch.ops.se_kernels.se_forward.default


class FusedOpCalls(TorchDispatchMode):
    """Counts the se_kernels ops a forward runs, to show which computation an export saw."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.namespace == "se_kernels"
        return func(*args, **(kwargs or {}))


def fused_forward(model: nn.Module, args: tuple, expected_calls: int) -> torch.Tensor:
    """model(*args) without autograd, checked to run the fused op `expected_calls` times, so
    that it is the kernels' output an export is compared with."""
    with torch.no_grad(), FusedOpCalls() as counter:
        out = model(*args)
    assert counter.calls == expected_calls
    return out


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


def image(n: int = 2, size: int = 64, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- ONNX: one SE layer, every option ---------------------------------------------------

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU}
GATES = {"sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid}
EPILOGUES = {"plain": (False, None), "residual": (True, None), "relu": (False, "relu"),
             "residual-relu": (True, "relu")}


def se_layer(activation="relu", gate="sigmoid", pool="avg", out_activation=None, bias=True,
             backend="auto", c=24, s=6) -> se_kernels.SqueezeExcitation:
    torch.manual_seed(0)
    layer = se_kernels.SqueezeExcitation(c, s, ACTIVATIONS[activation], GATES[gate], pool=pool,
                                         out_activation=out_activation, backend=backend)
    if not bias:
        layer.fc1.bias = layer.fc2.bias = None
    scale_weights(layer, seed=1)
    return layer.eval()


def layer_args(residual: bool, c: int = 24) -> tuple:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, c, 5, 7, generator=gen)
    return (x, torch.randn(x.shape, generator=gen)) if residual else (x,)


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax"])
@pytest.mark.parametrize("activation, gate", [pytest.param(a, g, id=f"{a}-{g}")
                                              for a, g in itertools.product(ACTIVATIONS, GATES)])
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


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax"])
@pytest.mark.parametrize("epilogue", ["plain", "residual-relu"])
def test_onnx_export_with_the_torchscript_exporter(pool, epilogue, tmp_path):
    residual, out_activation = EPILOGUES[epilogue]
    layer = se_layer("silu", "hardsigmoid", pool, out_activation)
    check_onnx_export(layer, layer_args(residual), tmp_path / "se.onnx", se_count=1, dynamo=False)


# ---- ONNX: whole models ------------------------------------------------------------------

@pytest.mark.parametrize("library, name, source, count", MODELS, ids=MODEL_IDS)
def test_onnx_export_of_converted_models(library, name, source, count, tmp_path):
    model = convert_se_modules(build(library, name))
    check_onnx_export(model, (image(),), tmp_path / "model.onnx", se_count=count, dynamo=True)


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


def test_onnx_export_of_a_converted_model_with_the_torchscript_exporter(tmp_path):
    model = convert_se_modules(build("torchvision", "mobilenet_v3_large"))
    check_onnx_export(model, (image(),), tmp_path / "model.onnx", se_count=8, dynamo=False)


# ---- torch.export and AOTInductor: the fused op stays ----------------------------------

def fused_op_nodes(program: torch.export.ExportedProgram) -> int:
    return sum(node.target == FUSED_OP for node in program.graph.nodes)


def test_torch_export_keeps_the_fused_op():
    model = convert_se_modules(build("timm", "legacy_seresnet18"))
    x = image(n=1)
    program = torch.export.export(model, (x,))
    assert fused_op_nodes(program) == 8
    assert fused_op_nodes(program.run_decompositions()) == 8
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)


class ConvSE(nn.Module):
    """A small network around one SE with a residual and the output ReLU."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.se = se_kernels.SqueezeExcitation(16, 4, nn.SiLU, pool="avgmax",
                                               out_activation="relu", backend=backend)

    def forward(self, x):
        y = self.conv(x)
        return self.se(y, residual=y)


def aoti_round_trip(model: nn.Module, x: torch.Tensor, package) -> tuple[torch.Tensor, set[str]]:
    """Export, compile with AOTInductor, load, run: the output and the ops the run called."""
    program = torch.export.export(model, (x,))
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(package))
    runner = torch._inductor.aoti_load_package(path)
    with torch.profiler.profile() as profile:
        out = runner(x)
    return out, {event.name for event in profile.events()}


def test_aoti_runs_the_fused_op_on_cpu(tmp_path):
    model = ConvSE().eval()
    x = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(0))
    out, called = aoti_round_trip(model, x, tmp_path / "model.pt2")
    assert "se_kernels::se_forward" in called
    torch.testing.assert_close(out, fused_forward(model, (x,), 1), rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_aoti_runs_the_fused_kernels_on_cuda(backend, tmp_path):
    model = ConvSE(backend).cuda().eval()
    x = torch.randn(2, 3, 9, 11, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    out, called = aoti_round_trip(model, x, tmp_path / "model.pt2")
    # The CUDA op runs as an extern call; Triton's kernels are compiled into the package.
    ours = {"cuda": ("se_kernels::se_forward",), "triton": ("_pool_kernel", "_scale_kernel")}
    assert all(any(name in event for event in called) for name in ours[backend]), sorted(called)
    torch.testing.assert_close(out, fused_forward(model, (x,), 1), rtol=1e-5, atol=1e-5)


# ---- restore_se_modules -------------------------------------------------------------------

def module_classes(model: nn.Module) -> list[tuple[str, str]]:
    return [(name, qualified_name(module)) for name, module in model.named_modules()]


@pytest.mark.parametrize("library, name, source, count", MODELS, ids=MODEL_IDS)
def test_restore_undoes_the_conversion(library, name, source, count):
    model = build(library, name)
    classes, parameters = module_classes(model), [id(p) for p in model.parameters()]
    x = image(n=1, size=32)
    with torch.no_grad():
        expected = model(x)
    converted = convert_se_modules(model)
    assert sum(isinstance(m, ConvertedSqueezeExcitation) for m in converted.modules()) == count
    with torch.no_grad():  # trained values, set through the converted model, survive
        for p in converted.parameters():
            p.mul_(0.5)
    state = {key: value.clone() for key, value in converted.state_dict().items()}
    restored = restore_se_modules(converted)
    assert restored is model
    assert module_classes(restored) == classes
    assert [id(p) for p in restored.parameters()] == parameters
    assert restored.state_dict().keys() == state.keys()
    assert all(torch.equal(restored.state_dict()[key], value) for key, value in state.items())
    with torch.no_grad():
        for p in restored.parameters():
            p.mul_(2)
        torch.testing.assert_close(restored(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("variant", list(se_variants()))
def test_restore_of_every_served_variant(variant):
    make, _ = se_variants()[variant]
    original = make().train(False)
    converted = convert_se_modules(original)  # the root itself: a new module comes back
    assert isinstance(converted, ConvertedSqueezeExcitation)
    converted.train()
    restored = restore_se_modules(converted)
    assert restored is original and restored.training
    assert module_classes(restored) == module_classes(make())
    assert [id(p) for p in restored.parameters()] == [id(p) for p in converted.parameters()]


def test_restore_keeps_shared_modules_shared_and_leaves_own_modules():
    shared = torchvision_se()
    model = nn.Sequential(shared, nn.Sequential(shared), se_kernels.SqueezeExcitation(8, 2))
    convert_se_modules(model)
    assert model[0] is model[1][0] and isinstance(model[0], ConvertedSqueezeExcitation)
    restore_se_modules(model)
    assert model[0] is model[1][0] is shared
    assert type(model[2]) is se_kernels.SqueezeExcitation


def torchvision_se():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.ops.SqueezeExcitation(8, 2)


def test_restore_of_a_model_converted_twice_and_pickled():
    model = nn.Sequential(torchvision_se())
    convert_se_modules(model)
    convert_se_modules(model)  # nothing more to convert
    state = model.state_dict()
    model = pickle.loads(pickle.dumps(model))
    restore_se_modules(model)
    assert qualified_name(model[0]) == "torchvision.ops.misc.SqueezeExcitation"
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())
    x = torch.randn(2, 8, 3, 3)
    fc1, fc2 = model[0].fc1, model[0].fc2
    expected = x * torch.sigmoid(fc2(torch.relu(fc1(x.mean((2, 3), keepdim=True)))))
    torch.testing.assert_close(model(x), expected)


def test_restore_without_the_original_is_a_clear_error():
    converted = convert_se_modules(torchvision_se())
    del converted.__dict__["original"]  # as a module unpickled from before originals were kept
    with pytest.raises(ValueError, match="holds no original module"):
        restore_se_modules(nn.Sequential(converted))


def test_restored_model_runs_without_se_kernels(tmp_path):
    model = convert_se_modules(build("timm", "legacy_seresnet18"))
    x = image(n=1, size=32)
    with torch.no_grad():
        expected = model(x)
    torch.save({"model": restore_se_modules(copy.deepcopy(model)), "x": x, "expected": expected},
               tmp_path / "model.pt")
    script = (
        "import sys, torch\n"
        "sys.modules['se_kernels'] = None  # import se_kernels now fails\n"
        f"saved = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)\n"
        "with torch.no_grad():\n"
        "    torch.testing.assert_close(saved['model'](saved['x']), saved['expected'])\n"
        "assert not any(name.startswith('se_kernels') for name in sys.modules if sys.modules[name])\n"
        "print('ran without se_kernels')\n")
    result = run_python("-c", script)
    assert result.returncode == 0, result.stderr
    assert "ran without se_kernels" in result.stdout
