"""The fused block tail (DESIGN.md §1.5): BatchNorm -> SE -> drop path -> + shortcut -> ReLU
on every backend's stream ops against the float64 composition, whole timm blocks against
their eager selves (outputs, every gradient, running statistics, in train and eval), the
conversion at block level, SyncBatchNorm over 2 gloo processes; the forward alone for calls
autograd will not record, the argument checks, the FLOP count."""

import copy
import functools
import logging

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from helpers import (assert_compiled_matches_eager, forward_backward, needs_gloo, randomize_norms,
                     run_on_gloo)
from se_kernels import convert_se_modules, restore_se_modules, tail
from se_kernels.blocks import FusedBlock
from se_kernels.convert import ConvertedSqueezeExcitation
from se_kernels.excitation import ChannelConv, Fc, Mlp
from stream_backends import reference_backend, staged_backend  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("one_thread")
timm = pytest.importorskip("timm", reason="timm is a test extra: pip install .[test]")


def tail_inputs(shape, dtype, gen, *, affine=True, keep=True, layout="nchw"):
    n, c = shape[:2]
    f64 = dict(generator=gen, dtype=torch.float64)
    x = torch.randn(shape, **f64) * 1.5 + 0.3
    residual = torch.randn(shape, **f64)
    grad = torch.randn(shape, **f64)
    norm = ((torch.rand(c, **f64) + 0.5) if affine else None, torch.randn(c, **f64) * 0.3 if affine else None,
            torch.randn(c, **f64) * 0.2, torch.rand(c, **f64) + 0.5)
    keep_vector = (torch.tensor([0.0, 2.0] * n, dtype=torch.float64)[:n] if keep else None)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return (x.to(dtype).contiguous(memory_format=fmt), residual.to(dtype).contiguous(memory_format=fmt),
            grad.to(dtype).contiguous(memory_format=fmt), tuple(map(cast, norm)), cast(keep_vector))


FORMS = {
    "mlp": (Mlp("relu", 0.01), lambda c, g: (torch.randn(3, c, 1, 1, generator=g) / c ** 0.5,
                                             torch.randn(3, generator=g), torch.randn(c, 3, 1, 1, generator=g),
                                             torch.randn(c, generator=g), *(None,) * 4)),
    "fc": (Fc(), lambda c, g: (torch.randn(c, c, generator=g) / c ** 0.5, torch.randn(c, generator=g))),
    "eca": (ChannelConv(3), lambda c, g: (torch.randn(1, 1, 3, generator=g), None)),
}


def run_tail(backend, x, residual, grad, norm, keep, form, params, *, batch_stats, gate="sigmoid",
             out_activation="relu"):
    x = x.detach().clone().requires_grad_()
    residual = residual.detach().clone().requires_grad_()
    weight, bias = (None if t is None else t.detach().clone().requires_grad_() for t in norm[:2])
    params = [None if p is None else p.detach().clone().requires_grad_() for p in params]
    out, stats = tail.block_tail(x, (weight, bias, norm[2], norm[3]), form, params, gate=gate,
                                 batch_stats=batch_stats, eps=1e-5, residual=residual, keep=keep,
                                 out_activation=out_activation, backend=backend)
    inputs = [t for t in (x, residual, weight, bias, *params) if t is not None]
    return [out, *torch.autograd.grad(out, inputs, grad)], stats


def assert_close(got, expected, tol):
    floor = max(e.double().abs().max().item() for e in expected) * 1e-2
    for i, (g, e) in enumerate(zip(got, expected)):
        err = (g.double().cpu() - e.double()).abs().max().item()
        scale = max(e.double().abs().max().item(), floor)
        assert err <= tol * scale, f"tensor {i}: max error {err:.3g} > {tol:g} x {scale:.3g}"


CASES = [  # form, batch statistics, affine norm, drop path keep, gate, out activation
    ("mlp", True, True, True, "sigmoid", "relu"), ("mlp", False, True, False, "hardsigmoid", "relu"),
    ("fc", True, False, False, "tanh", None), ("eca", True, True, True, "sigmoid", "relu"),
    ("eca", False, False, True, "relu", None)]


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_fp64_matches_the_composition(staged_backend, case):
    name, device = staged_backend
    form_id, batch_stats, affine, keep, gate, out_activation = case
    gen = torch.Generator().manual_seed(len(form_id) * 7 + batch_stats)
    x, residual, grad, norm, keep_vector = tail_inputs((3, 8, 5, 6), torch.float64, gen,
                                                       affine=affine, keep=keep)
    form, make = FORMS[form_id]
    params = [None if p is None else p.double() for p in make(8, gen)]
    expected, expected_stats = run_tail("torch", x, residual, grad, norm, keep_vector, form, params,
                                        batch_stats=batch_stats, gate=gate, out_activation=out_activation)
    to = functools.partial(lambda t: None if t is None else t.to(device))
    got, stats = run_tail(name, to(x), to(residual), to(grad), tuple(map(to, norm)), to(keep_vector),
                          form, [to(p) for p in params], batch_stats=batch_stats, gate=gate,
                          out_activation=out_activation)
    assert_close(got, expected, 1e-10)
    assert (stats is None) == (expected_stats is None)
    if stats is not None:
        mean, var, count = stats
        assert_close([mean, var], list(expected_stats[:2]), 1e-12)
        assert count == expected_stats[2] == x.numel() // x.shape[1]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2),
                                        (torch.float16, 4e-3)], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_low_precision_with_fp32_statistics(staged_backend, dtype, tol, layout):
    name, device = staged_backend
    gen = torch.Generator().manual_seed(3)
    x, residual, grad, norm, keep = tail_inputs((4, 16, 7, 7), dtype, gen, layout=layout)
    form, make = FORMS["mlp"]
    params = [None if p is None else p.to(dtype) for p in make(16, gen)]
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    expected, _ = run_tail("torch", f64(x), f64(residual), f64(grad), tuple(map(f64, norm)), f64(keep),
                           form, [f64(p) for p in params], batch_stats=True)
    to = functools.partial(lambda t: None if t is None else t.to(device))
    got, _ = run_tail(name, to(x), to(residual), to(grad), tuple(map(to, norm)), to(keep), form,
                      [to(p) for p in params], batch_stats=True)
    assert got[0].dtype == dtype
    if layout == "channels_last":
        assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert_close(got, expected, tol)


def test_one_value_per_channel_in_training_fails_as_batch_norm_does():
    form, make = FORMS["fc"]
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        tail.block_tail(torch.randn(1, 4, 1, 1), (None, None, None, None), form,
                        make(4, torch.Generator()), gate="sigmoid", batch_stats=True)


@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch-stats", "running-stats"])
def test_a_call_autograd_will_not_record_runs_the_forward_alone(batch_stats, monkeypatch):
    """Under no_grad, or with grad mode on and no tensor requiring grad, the tail computes its
    forward directly, not through the autograd.Function: the same output and statistics."""
    form, make = FORMS["mlp"]
    gen = torch.Generator().manual_seed(5)
    x, residual, _, norm, keep = tail_inputs((3, 8, 5, 6), torch.float64, gen)
    params = [None if p is None else p.double() for p in make(8, gen)]
    weight, bias = (t.clone().requires_grad_() for t in norm[:2])

    def call():
        return tail.block_tail(x, (weight, bias, *norm[2:]), form, params, gate="sigmoid",
                               batch_stats=batch_stats, residual=residual, keep=keep,
                               backend=reference_backend())

    expected, expected_stats = call()
    assert expected.grad_fn is not None
    monkeypatch.setattr(tail._TailFunction, "apply",
                        lambda *args: pytest.fail("the call went through the autograd.Function"))
    with torch.no_grad():
        no_grad = call()
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    nothing_requires_grad = call()
    for out, stats in (no_grad, nothing_requires_grad):
        assert out.grad_fn is None
        torch.testing.assert_close(out, expected.detach(), rtol=0, atol=0)
        assert (stats is None) == (expected_stats is None) == (not batch_stats)
        if stats is not None:
            for got, e in zip(stats, expected_stats):
                torch.testing.assert_close(got, e, rtol=0, atol=0)


def tail_arguments():
    form, make = FORMS["fc"]
    c = 4
    norm = (torch.ones(c), torch.zeros(c), torch.zeros(c), torch.ones(c))
    return dict(x=torch.randn(2, c, 3, 3), norm=norm, form=form,
                params=make(c, torch.Generator().manual_seed(0)), gate="sigmoid", batch_stats=False,
                residual=torch.randn(2, c, 3, 3), keep=torch.ones(2))


def norm_with(i, t):
    return tuple(t if j == i else v for j, v in enumerate(tail_arguments()["norm"]))


BAD_ARGUMENTS = {  # id: (change, error, message)
    "weight-dtype": (dict(norm=norm_with(0, torch.ones(4, dtype=torch.int64))), TypeError,
                     "norm weight must be float16, bfloat16, float32 or float64, got torch.int64"),
    "bias-device": (dict(norm=norm_with(1, torch.zeros(4, device="meta"))), TypeError,
                    "norm bias must be on device cpu like x, got meta"),
    "mean-shape": (dict(norm=norm_with(2, torch.zeros(5))), ValueError,
                   r"running_mean must have shape \[4\], got \[5\]"),
    "var-device": (dict(norm=norm_with(3, torch.ones(4, device="meta"))), TypeError,
                   "running_var must be on device cpu like x, got meta"),
    "norm-items": (dict(norm=(None, None)), ValueError,
                   r"norm must be \(weight, bias, running_mean, running_var\), got 2 items"),
    "keep-dtype": (dict(keep=torch.ones(2, dtype=torch.bool)), TypeError,
                   "keep must be float16, bfloat16, float32 or float64, got torch.bool"),
    "keep-device": (dict(keep=torch.ones(2, device="meta")), TypeError,
                    "keep must be on device cpu like x, got meta"),
    "keep-shape": (dict(keep=torch.ones(2, 1)), ValueError, r"keep must have shape \[2\], got \[2, 1\]"),
    "residual-device": (dict(residual=torch.randn(2, 4, 3, 3, device="meta")), TypeError,
                        "residual must be on device cpu like x, got meta"),
    "residual-dtype": (dict(residual=torch.randn(2, 4, 3, 3, dtype=torch.float64)), TypeError,
                       "residual must have dtype torch.float32, got torch.float64"),
    "residual-shape": (dict(residual=torch.randn(2, 4, 3, 4)), ValueError,
                       r"residual must have shape \[2, 4, 3, 3\], got \[2, 4, 3, 4\]"),
    "param-device": (dict(params=[torch.randn(4, 4, device="meta"), None]), TypeError,
                     "Fc parameter 0 is on meta, x on cpu"),
}


@pytest.mark.parametrize("change, error, message", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_are_named(change, error, message):
    tail.make_call(**tail_arguments())  # the unchanged arguments are good
    with pytest.raises(error, match=message):
        tail.make_call(**(tail_arguments() | change))


def test_norm_tensors_may_keep_another_float_dtype_than_x():
    """As nn.BatchNorm2d under mixed precision: fp32 parameters and statistics for fp16 x."""
    args = tail_arguments()
    args["x"], args["residual"] = args["x"].half(), args["residual"].half()
    out, _ = tail.block_tail(**args, backend=reference_backend())
    expected, _ = tail.block_tail(**args, backend="torch")
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)


# ---- whole blocks ---------------------------------------------------------------------

BLOCK_MODELS = [  # timm model, blocks whose tail fuses
    ("seresnet18", 8),             # BasicBlock
    ("seresnext26d_32x4d", 8),     # Bottleneck, grouped
    ("legacy_seresnet50", 16),     # legacy SENet bottleneck
    ("ecaresnet26t", 8),           # Bottleneck with ECA
]


def build(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).double()
    randomize_norms(model, seed=0)  # timm zero-initialises bn3's scale
    return model


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name, fused", BLOCK_MODELS, ids=[m for m, _ in BLOCK_MODELS])
def test_fused_blocks_match_eager(name, fused, training):
    kwargs = {} if name.startswith("legacy") else {"drop_path_rate": 0.3}
    original = build(name, **kwargs).train(training)
    converted = convert_se_modules(copy.deepcopy(original))
    assert sum(isinstance(m, FusedBlock) for m in converted.modules()) == fused
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for step in range(2):  # the second step runs on the running statistics the first updated
        expected, expected_state = forward_backward(original, x, seed=step)
        got, state = forward_backward(converted, x, seed=step)
        assert got.keys() == expected.keys()
        scale = max(t.abs().max().item() for t in expected.values())
        for key, e in expected.items():
            err = (got[key] - e).abs().max().item()
            assert err <= 1e-10 * max(e.abs().max().item(), 1e-3 * scale), (key, err)
        assert state.keys() == expected_state.keys()
        for key, e in expected_state.items():
            torch.testing.assert_close(state[key], e, rtol=1e-12, atol=1e-12, msg=key)


def test_block_conversion_keeps_parameters_and_restores():
    model = build("seresnet18")
    parameters, keys = [id(p) for p in model.parameters()], model.state_dict().keys()
    classes = [type(m) for m in model.modules()]
    converted = convert_se_modules(model)
    assert [id(p) for p in converted.parameters()] == parameters
    assert converted.state_dict().keys() == keys
    restored = restore_se_modules(converted)
    assert [type(m) for m in restored.modules()] == classes
    assert [id(p) for p in restored.parameters()] == parameters


def test_fuse_blocks_false_converts_the_se_modules_only():
    model = convert_se_modules(build("seresnet18"), fuse_blocks=False)
    assert not any(isinstance(m, FusedBlock) for m in model.modules())
    assert sum(isinstance(m, ConvertedSqueezeExcitation) for m in model.modules()) == 8


@pytest.mark.parametrize("spoil, reason", [
    (lambda block: block.bn2.register_forward_hook(lambda *args: None), "bn2 has forward_hooks"),
    (lambda block: setattr(block, "act2", nn.SiLU()), "act2 is SiLU, not an nn.ReLU"),
], ids=["hooked-norm", "other-activation"])
def test_a_block_that_cannot_fuse_keeps_the_se_only_conversion(spoil, reason, caplog):
    model = build("seresnet18")
    spoil(model.layer1[0])
    with caplog.at_level(logging.INFO, logger="se_kernels.convert"):
        convert_se_modules(model)
    assert type(model.layer1[0]).__name__ == "BasicBlock"
    assert isinstance(model.layer1[0].se, ConvertedSqueezeExcitation)
    assert sum(isinstance(m, FusedBlock) for m in model.modules()) == 7
    assert f"1 blocks keep their tail unfused, timm.models.resnet.BasicBlock: {reason}" in caplog.text


def test_se_kernels_builder_blocks_fuse():
    pytest.importorskip("torchvision")
    from se_kernels.models import se_resnet50
    torch.manual_seed(0)
    model = se_resnet50(reduction=16, num_classes=10).double()
    randomize_norms(model, seed=0)
    converted = convert_se_modules(copy.deepcopy(model))
    assert sum(isinstance(m, FusedBlock) for m in converted.modules()) == 16
    # 64x64: the last stage's maps are 2x2, so its batch norms see 8 values a channel (with
    # 2 they would amplify any rounding difference by the inverse of a tiny spread).
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    expected, _ = forward_backward(model, x, seed=0)
    got, _ = forward_backward(converted, x, seed=0)
    for key, e in expected.items():
        torch.testing.assert_close(got[key], e, rtol=1e-9, atol=1e-9 * e.abs().max().item(), msg=key)


# ---- SyncBatchNorm over 2 processes ------------------------------------------------------

def sync_block(sync: bool) -> nn.Module:
    """A stem and an SE BasicBlock whose tail norm (bn2) is a BatchNorm2d, or with `sync` a
    SyncBatchNorm. The other norms are GroupNorm, per-sample, so that only the tail's
    statistics span processes (an eager SyncBatchNorm runs on GPUs only)."""
    torch.manual_seed(0)
    group_norm = lambda c, **_: nn.GroupNorm(4, c)  # noqa: E731
    block = timm.models.resnet.BasicBlock(16, 16, attn_layer="se", norm_layer=group_norm)
    block.bn2 = nn.BatchNorm2d(16)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), group_norm(16), nn.ReLU(), block)
    randomize_norms(model, seed=0)
    if sync:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.double()


def sync_batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 6, 6, generator=gen, dtype=torch.float64), \
        torch.randn(4, 16, 6, 6, generator=gen, dtype=torch.float64)


def sync_worker(rank: int) -> dict:
    model = convert_se_modules(sync_block(sync=True))
    assert isinstance(model[3], FusedBlock)
    x, grad = sync_batch()
    shard = slice(rank * 2, rank * 2 + 2)
    xs = x[shard].clone().requires_grad_()
    out = model(xs)
    out.backward(grad[shard])
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for g in grads.values():  # the whole batch's gradient is the sum of the shards'
        dist.all_reduce(g)
    return {"out": out.detach(), "x": xs.grad, "grads": grads, "state": model.state_dict()}


@needs_gloo
def test_sync_batch_norm_over_two_processes_matches_one_process(tmp_path):
    results = run_on_gloo(sync_worker, tmp_path)
    # One process, the whole batch, plain BatchNorm2d and eager SE: the reference.
    reference = sync_block(sync=False)
    x, grad = sync_batch()
    x = x.clone().requires_grad_()
    out = reference(x)
    out.backward(grad)
    for rank, got in enumerate(results):
        shard = slice(rank * 2, rank * 2 + 2)
        torch.testing.assert_close(got["out"], out.detach()[shard], rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(got["x"], x.grad[shard], rtol=1e-10, atol=1e-11)
        for name, p in reference.named_parameters():
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-10, atol=1e-11, msg=name)
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(got["state"][key], value, rtol=1e-12, atol=1e-12, msg=key)


def test_fused_block_compiles_whole_graph():
    block = timm.models.resnet.BasicBlock(16, 16, attn_layer="se").double()
    randomize_norms(block, seed=0)
    assert_compiled_matches_eager(convert_se_modules(block),
                                  torch.randn(4, 16, 6, 6, dtype=torch.float64),
                                  lambda m: m.bn2.running_var.clone())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_flop_counter_counts_the_tail_by_its_formula(training):
    """FlopCounterMode counts a fused tail's four passes by the stream ops' formulas, which
    sum to DESIGN.md §1.5's: with E = N·C·H·W, forward (4 + 2·train)·E, backward
    (5 + 2·train)·E. Everything else is what the eager block counts (the SE's FCs as
    fc_layer ops instead of 1x1 convolutions: the same FLOPs)."""
    block = timm.models.resnet.BasicBlock(16, 16, attn_layer="se").double().train(training)
    randomize_norms(block, seed=0)
    fused = convert_se_modules(copy.deepcopy(block), backend="cpu")
    x = torch.randn(4, 16, 6, 6, dtype=torch.float64, requires_grad=True)
    counts = []
    for module in (block, fused):
        with FlopCounterMode(display=False) as counter:
            module(x).sum().backward()
        counts.append({str(op): n for op, n in counter.get_flop_counts()["Global"].items()})
    eager, got = counts
    e = x.numel()
    tail_counts = {"se_kernels.stream_reduce": (1 + 2 * training) * e, "se_kernels.stream_map": 3 * e,
                   "se_kernels.stream_grad_reduce": 3 * e,
                   "se_kernels.stream_grad_map": (2 + 2 * training) * e}
    assert {op: n for op, n in got.items() if op.startswith("se_kernels.stream_")} == tail_counts
    forward = tail_counts["se_kernels.stream_reduce"] + tail_counts["se_kernels.stream_map"]
    assert forward == (4 + 2 * training) * e
    assert sum(tail_counts.values()) - forward == (5 + 2 * training) * e
    assert sum(got.values()) - sum(tail_counts.values()) == sum(eager.values())
