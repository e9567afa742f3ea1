"""The act tail (DESIGN.md §1.5): BatchNorm -> activation -> SE. Its four stream ops' CPU
kernels against _stream_ops.reference in float64 (every dtype and activation, odd shapes,
layouts), opcheck and argument errors; the tail on the cpu and torch backends and on the
reference ops against a float64 composition of nn modules (BatchNorm2d, the activation
module, the SE) in training and eval: output, every gradient, the running statistics;
dispatch's refusal of a backend without the act ops; torch.compile against eager."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torchvision
from torch import nn

from helpers import (assert_compiled_matches_eager, backend_device, covering_cases,
                     forward_backward, randomize_norms, require_backend)
from se_kernels import _stream_ops, convert_se_modules, dispatch, restore_se_modules, tail
from se_kernels._ops import accumulate_dtype, kernel_memory_format
from se_kernels.backends import native
from se_kernels.backends.torch_backend import TorchBackend
from se_kernels.blocks import FusedActBlock, FusedBlock
from se_kernels.convert import ConvertedSqueezeExcitation
from se_kernels.excitation import Mlp
from se_kernels.options import ACTIVATION_MODULES, ACTIVATIONS
from se_kernels.staged import update_running_stats
from stream_backends import emulator_backend, reference_backend

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# C = 3, H·W = 1, N = 1, N = 0, odd H·W (vector tails), C past a channels-last block.
SHAPES = ((2, 3, 5, 7), (3, 4, 1, 1), (1, 5, 6, 6), (0, 3, 2, 2), (2, 130, 3, 3))
LAYOUTS = ("nchw", "channels_last", "strided")
OPS = {name: getattr(torch.ops.se_kernels, name).default for name in _stream_ops.ACT_SCHEMAS}
needs_kernels = pytest.mark.skipif(not native.has_act_stream_kernel("cpu"),
                                   reason="se_kernels._C was built without the act stream ops")


def layout_of(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor
        wide = t.new_ones(*t.shape[:3], 2 * t.shape[3])
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def op_args(name, shape, dtype, layout, activation, seed, statistics=True, optional=True):
    """The op's arguments: x and grad_out in dtype and layout, the prologue's [C] vectors and
    the [N, C] coefficients in the accumulation dtype."""
    gen = torch.Generator().manual_seed(seed)
    acc = accumulate_dtype(dtype)
    n, c = shape[:2]

    def rand(*size, scale=1.0, shift=0.0):
        return (torch.randn(*size, generator=gen, dtype=torch.float64) * scale + shift)

    x = layout_of((rand(*shape, scale=1.5, shift=0.2)).to(dtype), layout)
    prologue = (x, rand(c, scale=0.5, shift=1.0).to(acc), rand(c).to(acc), activation)
    if name == "stream_act_reduce":
        return prologue
    if name == "stream_act_map":
        return (*prologue, rand(n, c).to(acc))
    grad_out = layout_of(rand(*shape).to(dtype), layout)
    if name == "stream_act_grad_reduce":
        return (grad_out, *prologue, statistics)
    vectors = [rand(n, c).to(acc) for _ in range(4)]
    if not optional:
        vectors[2:] = None, None
    return (grad_out, *prologue, *vectors)


def as64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)


def magnitude(args, name):
    """Per element, a bound on the magnitudes the op's rounding errors scale with: |x·a|,
    |b|, the activation's value, times the dy and x that weigh a sum."""
    if name.startswith("stream_act_grad"):
        grad_out, x, a, b = (t.double() if isinstance(t, torch.Tensor) else t for t in args[:4])
    else:
        grad_out = None
        x, a, b = (t.double() for t in args[:3])
    xa = x.abs() * a.abs()[:, None, None]
    m = 2 * (1 + xa + b.abs()[:, None, None]) * (1 + x.abs())
    return m if grad_out is None else m * (1 + grad_out.abs())


def check(name, got, expected, bound, dtype):
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == expected.shape, f"{name}: shape {list(got.shape)}"
    err = (got.double() - expected).abs()
    bad = err > bound
    assert not bad.any(), f"{name}: {int(bad.sum())} of {err.numel()} outside the bound, worst {err.max():.3g}"


CASES = [pytest.param(shape, layout, dtype, act, seed, id=f"{shape}-{layout}-{str(dtype)[6:]}-{act}")
         for seed, (shape, layout, dtype, act) in enumerate(
             covering_cases(SHAPES, LAYOUTS, DTYPES, ACTIVATIONS))]


@needs_kernels
@pytest.mark.parametrize("shape,layout,dtype,activation,seed", CASES)
def test_cpu_ops_match_reference(shape, layout, dtype, activation, seed):
    acc = accumulate_dtype(dtype)
    u_acc = torch.finfo(acc).eps / 2
    p = shape[2] * shape[3]
    for name, extra in (("stream_act_reduce", {}), ("stream_act_map", {}),
                        ("stream_act_grad_reduce", {"statistics": True}),
                        ("stream_act_grad_reduce", {"statistics": False}),
                        ("stream_act_grad_map", {"optional": True}),
                        ("stream_act_grad_map", {"optional": False})):
        args = op_args(name, shape, dtype, layout, activation, seed, **extra)
        got = OPS[name](*args)
        expected = _stream_ops.reference(name, *as64(args))
        mag = magnitude(args, name)
        if isinstance(got, torch.Tensor) and got.dim() == 4:  # x-sized: one rounding to dtype
            if name == "stream_act_map":
                mag = mag * (1 + args[4].double().abs()[:, :, None, None])
            else:
                mag = mag * (1 + sum(v.double().abs() for v in args[5:] if v is not None)[:, :, None, None])
            bound = 32 * u_acc * mag + torch.finfo(dtype).eps * expected.abs()
            check(name, got, expected, bound, dtype)
            x = args[0 if name == "stream_act_map" else 1]
            assert got.is_contiguous(memory_format=kernel_memory_format(x)), f"{name}: layout"
            continue
        got = got if isinstance(got, tuple) else (got,)
        expected = expected if isinstance(expected, tuple) else (expected,)
        for i, (g, e) in enumerate(zip(got, expected)):
            if e.shape == (0,):  # not asked for
                assert g.shape == (0,) and g.dtype == acc, f"{name}[{i}] should be empty"
                continue
            bound = 32 * (p + 1) * u_acc * mag.sum(dim=(2, 3))
            check(f"{name}[{i}]", g, e, bound, acc)


@needs_kernels
@pytest.mark.parametrize("dtype,layout", [(torch.float32, "nchw"), (torch.bfloat16, "channels_last")])
def test_cpu_opcheck(dtype, layout):
    for name in OPS:
        torch.library.opcheck(OPS[name], op_args(name, (2, 6, 5, 3), dtype, layout, "silu", 3))


def test_argument_errors_name_each_argument():
    x = torch.randn(2, 3, 4, 5)
    a, b, v = torch.ones(3), torch.zeros(3), torch.ones(2, 3)
    bad = [
        (r"in_scale must have shape \[3\], got \[2\]", "stream_act_reduce", (x, a[:2], b, "silu")),
        (r"in_shift must have dtype (torch\.float32|Float), got (torch\.float64|Double)",
         "stream_act_reduce", (x, a, b.double(), "silu")),
        (r"activation must be one of 'relu', .*got 'tanh'", "stream_act_reduce", (x, a, b, "tanh")),
        (r"scale must have shape \[2, 3\]", "stream_act_map", (x, a, b, "relu", v[:1])),
        (r"grad_out must have shape \[2, 3, 4, 5\]", "stream_act_grad_reduce", (x[:1], x, a, b, "gelu", True)),
        (r"act_shift must have shape \[2, 3\]",
         "stream_act_grad_map", (x, x, a, b, "gelu", v, v.t(), None, None)),
        (r"x_scale must have dtype (torch\.float32|Float), got (torch\.float16|Half)",
         "stream_act_grad_map", (x, x, a, b, "gelu", v, v, v.half(), None)),
        (r"x must be a 4-D tensor", "stream_act_reduce", (x[0], a, b, "silu")),
    ]
    for message, name, args in bad:
        with pytest.raises(ValueError if "shape" in message or "one of" in message or "4-D" in message
                           else TypeError, match=message):
            _stream_ops.reference(name, *args)
        if native.has_act_stream_kernel("cpu"):
            with pytest.raises(RuntimeError, match=message):
                OPS[name](*args)


# ---- the tail against nn modules -----------------------------------------------------------

def oracle_block(c, activation, seed):
    """BatchNorm2d -> the activation module -> torchvision's SqueezeExcitation in float64,
    with random affine parameters and running statistics."""
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(c, momentum=0.3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.3)
        bn.running_mean.normal_(0, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    se = torchvision.ops.SqueezeExcitation(c, 3).double()
    return nn.Sequential(bn, ACTIVATION_MODULES[activation](), se)


class ActTail(nn.Module):
    """The oracle's modules run as one act tail on `backend`."""

    def __init__(self, block, activation, backend):
        super().__init__()
        self.bn, self.se = block[0], block[2]
        self.activation, self.backend = activation, backend

    def forward(self, x):
        bn, se = self.bn, self.se
        params = (se.fc1.weight, se.fc1.bias, se.fc2.weight, se.fc2.bias, *(None,) * 4)
        out, stats = tail.block_tail(
            x, (bn.weight, bn.bias, bn.running_mean, bn.running_var), Mlp("relu", 0.01), params,
            gate="sigmoid", batch_stats=bn.training, eps=bn.eps, out_activation=None,
            activation=self.activation, backend=self.backend)
        if stats is not None:
            update_running_stats(bn, stats, stats[2])
        return out


def run(module, x, grad):
    x = x.detach().clone().requires_grad_()
    out = module(x)
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [x, *params], grad)
    bn = module[0] if isinstance(module, nn.Sequential) else module.bn
    return [out, *grads, bn.running_mean, bn.running_var, bn.num_batches_tracked]


TAIL_BACKENDS = ("cpu", "torch", "stream-reference")
TAIL_CASES = [pytest.param(backend, act, train, dtype, layout,
                           id=f"{backend}-{act}-{'train' if train else 'eval'}-{str(dtype)[6:]}-{layout}")
              for backend, act, train, dtype, layout in covering_cases(
                  TAIL_BACKENDS, ACTIVATIONS, (True, False),
                  (torch.float64, torch.float32, torch.bfloat16), ("nchw", "channels_last"))]
# bf16 x and dy: the tail's error is their rounding (2^-9) carried through the batch
# statistics and the SE, well inside 2e-2 of the largest value.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 2e-2}


def check_against_modules(backend, activation, train, dtype, layout, device="cpu"):
    """The act tail on `backend` (x, the parameters and the buffers on `device`) against the
    float64 nn modules: output, every gradient, the running statistics."""
    oracle = oracle_block(6, activation, seed=len(activation)).train(train)
    fused = ActTail(copy.deepcopy(oracle), activation, backend).train(train).to(device)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 6, 5, 4, generator=gen, dtype=torch.float64) * 1.3 + 0.2
    grad = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    if dtype == torch.bfloat16:  # the oracle on the rounded inputs
        x, grad = x.to(dtype).double(), grad.to(dtype).double()
    expected = run(oracle, x, grad)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    got = run(fused, x.to(device, dtype).contiguous(memory_format=fmt),
              grad.to(device, dtype).contiguous(memory_format=fmt))
    tol = TOLERANCES[dtype]
    for i, (g, e) in enumerate(zip(got, expected)):
        g = g.cpu()
        if g.is_floating_point():
            scale = max(e.abs().max().item(), 1e-3)
            err = (g.double() - e).abs().max().item()
            assert err <= tol * scale, f"tensor {i}: error {err:.3g} > {tol} x {scale:.3g}"
        else:
            assert torch.equal(g, e), f"tensor {i}: {g} != {e}"


@pytest.mark.parametrize("backend,activation,train,dtype,layout", TAIL_CASES)
def test_tail_matches_the_modules(backend, activation, train, dtype, layout):
    if backend == "stream-reference":
        backend = reference_backend()
    elif backend == "cpu" and not native.has_act_stream_kernel("cpu"):
        pytest.skip("se_kernels._C was built without the act stream ops")
    check_against_modules(backend, activation, train, dtype, layout)


@pytest.mark.parametrize("backend", ["triton", "cuda", "cuda-emulator"])
@pytest.mark.parametrize("activation,train,dtype,layout", [
    ("silu", True, torch.float32, "nchw"), ("hardswish", False, torch.float64, "channels_last"),
    ("gelu", True, torch.bfloat16, "channels_last"), ("relu", False, torch.float32, "nchw")])
def test_tail_on_the_gpu_kernels_matches_the_modules(backend, activation, train, dtype, layout):
    """The act tail on the Triton kernels (interpreted without a GPU), on the CUDA kernels
    (on a GPU) and on the CUDA kernels on the emulator, as on the CPU's."""
    device = "cpu"
    if backend == "cuda-emulator":
        backend = emulator_backend()
    else:
        device = backend_device(backend)
        require_backend(backend, device)
    check_against_modules(backend, activation, train, dtype, layout, device)


def test_eval_without_norm_gradients_and_batch_one():
    """In eval, N = 1, no gradient for the norm: the backward reduce sums Σdy·v alone."""
    oracle = oracle_block(4, "hardswish", seed=1).eval()
    for p in oracle[0].parameters():
        p.requires_grad_(False)
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    grad = torch.randn_like(x)
    expected = run(oracle, x, grad)
    for backend in ("cpu", reference_backend()):
        if backend == "cpu" and not native.has_act_stream_kernel("cpu"):
            continue
        got = run(ActTail(copy.deepcopy(oracle), "hardswish", backend), x, grad)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_batch_one_in_training_raises_batchnorm_error():
    x = torch.randn(1, 4, 1, 1, dtype=torch.float64)
    oracle = oracle_block(4, "silu", seed=0)
    message = "Expected more than 1 value per channel when training"
    with pytest.raises(ValueError, match=message):
        oracle(x)
    with pytest.raises(ValueError, match=message):
        ActTail(oracle, "silu", "torch")(x)


def test_act_tail_takes_no_shortcut():
    x = torch.randn(2, 3, 2, 2)
    params = (torch.randn(2, 3, 1, 1), None, torch.randn(3, 2, 1, 1), None, *(None,) * 4)
    with pytest.raises(ValueError, match="takes no residual, out_activation 'relu'"):
        tail.make_call(x, (None,) * 4, Mlp("relu", 0.01), params, gate="sigmoid",
                       batch_stats=True, residual=x, activation="silu")
    with pytest.raises(ValueError, match="activation must be one of"):
        tail.make_call(x, (None,) * 4, Mlp("relu", 0.01), params, gate="sigmoid",
                       batch_stats=True, out_activation=None, activation="sigmoid")


class FourOpsBackend(TorchBackend):
    """A backend with the four stream ops and not the act tail's, refusing as a native one."""

    name = "four-stream-ops"

    def stream_ops(self, device_type):
        return {name: getattr(torch.ops.se_kernels, name).default for name in _stream_ops.SCHEMAS}

    staged_refusals = dispatch.Backend.staged_refusals
    run_staged = dispatch.Backend.run_staged


def test_backends_without_the_act_ops_refuse(monkeypatch):
    monkeypatch.setitem(dispatch._REGISTRY, FourOpsBackend.name, FourOpsBackend())
    x = torch.randn(2, 3, 2, 2)
    params = (torch.randn(2, 3, 1, 1), None, torch.randn(3, 2, 1, 1), None, *(None,) * 4)
    norm = (None, None, torch.zeros(3), torch.ones(3))
    call = tail.make_call(x, norm, Mlp("relu", 0.01), params, gate="sigmoid", batch_stats=False,
                          out_activation=None, activation="gelu")
    with pytest.raises(dispatch.BackendUnavailableError,
                       match=r"'four-stream-ops' cannot run this call: no stream_act_reduce, "
                             r"stream_act_map, stream_act_grad_reduce, stream_act_grad_map kernels"):
        dispatch.select(call, "four-stream-ops")
    plain = tail.make_call(x, norm, Mlp("relu", 0.01), params, gate="sigmoid", batch_stats=False)
    assert dispatch.select(plain, "four-stream-ops").name == "four-stream-ops"
    # auto passes over a cpu backend without them
    cpu = dispatch.get_backend("cpu")
    monkeypatch.setattr(cpu, "stream_ops", lambda device: _stream_ops.NATIVE)
    explanation = dispatch.explain(call)
    assert explanation.auto == "torch"
    assert "stream_act_map" in " ".join(explanation["cpu"])


@needs_kernels
def test_cpu_compiled_matches_eager():
    block = oracle_block(5, "silu", seed=3).train()
    module = ActTail(block, "silu", "cpu").train()
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    assert_compiled_matches_eager(module, x, lambda m: (m.bn.weight.grad, m.se.fc1.weight.grad,
                                                        m.bn.running_var))


# ---- whole blocks: convert_se_modules -------------------------------------------------------

timm = pytest.importorskip("timm", reason="timm is a test extra: pip install .[test]")
# (library, model, act-tail blocks). 48x48 inputs leave 2x2 at the last stage: at 1x1 and
# N = 2 a training BatchNorm sees 2 values per channel, whose one-pass variance
# (DESIGN.md §1.5) loses digits that the eager two-pass one keeps.
ACT_MODELS = [("timm", "efficientnet_b0", 16), ("timm", "mobilenetv3_large_100", 8),
              ("timm", "regnety_002", 13), ("torchvision", "mobilenet_v3_small", 9),
              ("torchvision", "efficientnet_b0", 16), ("torchvision", "regnet_y_400mf", 16)]


def build_model(library, name):
    torch.manual_seed(0)
    model = (timm.create_model(name, pretrained=False) if library == "timm"
             else getattr(torchvision.models, name)())
    model = model.double()
    randomize_norms(model, seed=0)
    return model


@pytest.mark.parametrize("library,name,fused", ACT_MODELS, ids=[f"{lib}-{m}" for lib, m, _ in ACT_MODELS])
def test_act_blocks_match_eager(library, name, fused):
    original = build_model(library, name)
    # backend "cpu": the act tails at every size (auto keeps small ones SE-only on CPU)
    converted = convert_se_modules(copy.deepcopy(original), backend="cpu")
    assert sum(isinstance(m, FusedActBlock) for m in converted.modules()) == fused
    # MobileNetV3's hardsigmoid gate: eager's fp64 derivative multiplies by a float32 1/6.
    tol = 2e-7 if "mobilenet" in name else 1e-10
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for step, training in enumerate((True, False)):
        original.train(training)
        converted.train(training)
        expected, expected_state = forward_backward(original, x, seed=step)
        got, state = forward_backward(converted, x, seed=step)
        assert got.keys() == expected.keys()
        scale = max(t.abs().max().item() for t in expected.values())
        for key, e in expected.items():
            err = (got[key] - e).abs().max().item()
            assert err <= tol * max(e.abs().max().item(), 1e-3 * scale), (training, key, err)
        assert state.keys() == expected_state.keys()
        for key, e in expected_state.items():
            torch.testing.assert_close(state[key], e, rtol=1e-12, atol=1e-12, msg=key)


def test_act_block_conversion_keeps_parameters_and_restores():
    for library, name in (("timm", "regnety_002"), ("torchvision", "mobilenet_v3_small")):
        model = build_model(library, name)
        parameters, keys = [id(p) for p in model.parameters()], model.state_dict().keys()
        classes = [type(m) for m in model.modules()]
        converted = convert_se_modules(model)
        assert [id(p) for p in converted.parameters()] == parameters
        assert converted.state_dict().keys() == keys
        restored = restore_se_modules(converted)
        assert [type(m) for m in restored.modules()] == classes
        assert [id(p) for p in restored.parameters()] == parameters
        only_se = convert_se_modules(build_model(library, name), fuse_blocks=False)
        assert not any(isinstance(m, FusedBlock) for m in only_se.modules())
        assert any(isinstance(m, ConvertedSqueezeExcitation) for m in only_se.modules())


@pytest.mark.parametrize("spoil, reason", [
    (lambda block: block.block[0][1].register_forward_hook(lambda *args: None),
     "block.0.1 has forward_hooks"),
    (lambda block: block.block[0].__setitem__(2, nn.LeakyReLU(0.2)),
     "block.0.2 is LeakyReLU, which the act tail does not compute"),
], ids=["hooked-norm", "other-slope"])
def test_an_act_block_that_cannot_fuse_keeps_the_se_only_conversion(spoil, reason, caplog):
    model = build_model("torchvision", "mobilenet_v3_small")
    block = model.features[1]
    spoil(block)
    with caplog.at_level(logging.INFO, logger="se_kernels.convert"):
        convert_se_modules(model)
    assert type(model.features[1]).__name__ == "InvertedResidual"
    assert isinstance(model.features[1].block[1], ConvertedSqueezeExcitation)
    assert sum(isinstance(m, FusedActBlock) for m in model.modules()) == 8
    assert (f"1 blocks keep their tail unfused, torchvision.models.mobilenetv3.InvertedResidual: "
            f"{reason}") in caplog.text


@pytest.mark.parametrize("library,name,fused", [ACT_MODELS[1], ACT_MODELS[3]],
                         ids=["timm-SyncBatchNormAct", "torchvision-SyncBatchNorm"])
def test_sync_batch_norm_act_blocks_fuse(library, name, fused, caplog):
    """Models whose norms were made SyncBatchNorm (timm's convert_sync_batchnorm: its
    SyncBatchNormAct; torch's in a Conv2dNormActivation) keep every act tail fused and, in
    eval, match eager (training across processes: tests/test_tail_distributed.py). A
    SyncBatchNormAct without its activation keeps the SE-only conversion."""
    from timm.layers import convert_sync_batchnorm
    make_sync = convert_sync_batchnorm if library == "timm" else nn.SyncBatchNorm.convert_sync_batchnorm
    original = make_sync(build_model(library, name)).eval()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in original.modules())
    converted = convert_se_modules(copy.deepcopy(original), backend="cpu")
    assert sum(isinstance(m, FusedActBlock) for m in converted.modules()) == fused
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(converted(x), original(x), rtol=1e-10, atol=1e-12)
    if library == "timm":  # the first InvertedResidual with an SE
        block = next(m for m in original.modules() if type(m).__name__ == "InvertedResidual"
                     and not isinstance(m.se, nn.Identity))
        del block.bn2.act
        with caplog.at_level(logging.INFO, logger="se_kernels.convert"):
            convert_se_modules(original)
        assert "InvertedResidual: bn2 has no activation" in caplog.text


def test_act_blocks_take_the_se_only_path_where_no_backend_has_the_act_ops(monkeypatch):
    """Where no kernel backend has the act ops, auto would give the act tail to the torch
    backend, so the block runs its norm and activation as they are and the SE on the SE
    op's own backend."""
    monkeypatch.setattr(dispatch.get_backend("cpu"), "stream_ops", lambda device: _stream_ops.NATIVE)
    original = build_model("torchvision", "mobilenet_v3_small").eval()
    converted = convert_se_modules(copy.deepcopy(original))
    x = torch.randn(1, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(converted(x), original(x), rtol=1e-7, atol=1e-12)
    blocks = [m for m in converted.modules() if isinstance(m, FusedActBlock)]
    assert blocks and all(isinstance(b.__dict__.get("se_only"), ConvertedSqueezeExcitation)
                          for b in blocks)


@pytest.mark.parametrize("image, training, act_tail",
                         [(112, True, True), (112, False, False), (56, True, False)])
def test_auto_on_cpu_runs_the_act_tail_in_training_from_56x56(image, training, act_tail,
                                                               monkeypatch):
    """backend="auto" on CPU: the act tail on batch statistics where its input has 56 x 56
    pixels or more (blocks.ACT_TAIL_MIN_PIXELS_CPU), the SE-only conversion in eval or
    below; both compute the block."""
    torch.manual_seed(0)
    block = torchvision.models.mobilenet_v3_small().features[1]  # its SE sees half the image
    randomize_norms(block, seed=0)
    converted = convert_se_modules(copy.deepcopy(block))
    assert isinstance(converted, FusedActBlock)
    se_only = []
    real = FusedActBlock._se_only
    monkeypatch.setattr(FusedActBlock, "_se_only",
                        lambda self, *args: se_only.append(1) or real(self, *args))
    x = torch.randn(2, 16, image, image, generator=torch.Generator().manual_seed(2))
    block.train(training)
    converted.train(training)
    torch.testing.assert_close(converted(x), block(x), rtol=1e-4, atol=1e-5)
    assert bool(se_only) != act_tail
