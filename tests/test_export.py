"""torch.export and AOTInductor keep the fused op: an exported program calls
se_kernels::se_forward, and a package compiled from it runs our kernels; fused block tails
export as their stream ops."""

import copy

import pytest
import torch
from torch import nn

import se_kernels
from helpers import fused_forward, image, randomize_norms
from se_kernels.convert import convert_se_modules

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FUSED_OP = torch.ops.se_kernels.se_forward.default


def fused_op_nodes(program: torch.export.ExportedProgram) -> int:
    return sum(node.target == FUSED_OP for node in program.graph.nodes)


def test_torch_export_keeps_the_fused_op():
    timm = pytest.importorskip("timm", reason="timm is a test extra: pip install .[test]")
    torch.manual_seed(0)
    model = convert_se_modules(timm.create_model("legacy_seresnet18")).eval()
    x = image(n=1)
    program = torch.export.export(model, (x,))
    assert fused_op_nodes(program) == 8
    assert fused_op_nodes(program.run_decompositions()) == 8
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)


STREAM_FORWARD_OPS = (torch.ops.se_kernels.stream_reduce.default, torch.ops.se_kernels.stream_map.default)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_torch_export_keeps_the_fused_tails_stream_ops(training):
    """A model with fused block tails exports with each tail's two forward passes as the
    stream ops (the excitation and the statistics between them as aten ops), before and after
    decomposition, and the program computes what eager does: the output and, in training,
    the running statistics, and every gradient of a backward through the program (export
    traces through the tail's autograd.Function; the program's backward is the stream ops'
    own autograd formulas)."""
    pytest.importorskip("timm", reason="timm is a test extra: pip install .[test]")
    from timm.models.resnet import BasicBlock, Bottleneck
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), BasicBlock(16, 16, attn_layer="se"),
                          Bottleneck(16, 4, attn_layer="se")).double()
    randomize_norms(model, seed=0)
    model = convert_se_modules(model).train(training)
    x = image(n=2, size=8).double()
    program = torch.export.export(copy.deepcopy(model), (x,))
    for graph in (program, program.run_decompositions()):
        assert [sum(node.target == op for node in graph.graph.nodes) for op in STREAM_FORWARD_OPS] == [2, 2]
    exported = program.module()
    # The same formulas, not the same roundings: in eager on CPU the norm's algebra between
    # the passes is the tail ops' C++ loops, in the program their PyTorch versions.
    rounding = {"rtol": 1e-13, "atol": 1e-15}
    torch.testing.assert_close(exported(x), model(x), **rounding)
    if training:  # the second call runs on the statistics the first updated
        torch.testing.assert_close(exported(x), model(x), **rounding)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[key], value, **rounding, msg=key)
    if training:
        xs = [x.clone().requires_grad_() for _ in range(2)]
        grad = torch.randn_like(model(x))
        exported(xs[0]).backward(grad)
        model(xs[1]).backward(grad)
        torch.testing.assert_close(xs[0].grad, xs[1].grad, msg="x")
        exported_params = dict(exported.named_parameters())
        for name, p in model.named_parameters():
            assert exported_params[name].grad is not None, name
            torch.testing.assert_close(exported_params[name].grad, p.grad, msg=name)


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
