"""The staged path (DESIGN.md §1.4): every excitation form on every backend's stream ops,
forward and the written-out backward, against the float64 composition that autograd
differentiates; the batch-norm form's running statistics against nn.BatchNorm2d."""

import copy
import functools

import pytest
import torch
from torch import nn

from se_kernels import convert_se_modules, dispatch, staged
from se_kernels.convert import StagedSpec
from se_kernels.excitation import ChannelConv, ChannelConvMlp, Fc, Mlp
from se_kernels.options import GATES, POOLS
from helpers import assert_compiled_matches_eager
from stream_backends import staged_backend  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("one_thread")


def form_cases(c: int):
    """(id, form, parameter shapes (None: absent), indices of non-trainable parameters)."""
    s, r = 3, 4
    return [
        ("mlp-gelu", Mlp("gelu", 0.01), [(s, c, 1, 1), (s,), (c, s, 1, 1), (c,)] + [None] * 4, ()),
        ("mlp-leaky-0.2-norm-batch", Mlp("leaky_relu", 0.2, norm=True, batch_stats=True),
         [(s, c), (s,), (c, s), None, (s,), (s,), None, None], ()),
        ("mlp-silu-norm-running", Mlp("silu", 0.01, norm=True),
         [(s, c), None, (c, s), (c,), (s,), (s,), (s,), (s,)], (6, 7)),
        ("mlp-hardswish-norm-no-affine", Mlp("hardswish", 0.01, norm=True, batch_stats=True),
         [(s, c), (s,), (c, s), (c,), None, None, None, None], ()),
        ("fc", Fc(), [(c, c, 1, 1), (c,)], ()),
        ("fc-no-bias", Fc(), [(c, c), None], ()),
        ("eca-3", ChannelConv(3), [(1, 1, 3), None], ()),
        ("ceca-5-bias", ChannelConv(5, circular=True), [(1, 1, 5), (1,)], ()),
        ("ceca-wide", ChannelConv(2 * c + 3, circular=True), [(2 * c + 3,), None], ()),
        ("eca-mlp", ChannelConvMlp(3, "relu", 0.01), [(r, 1, 1), (r,), (1, r, 3), (1,)], ()),
    ]


FORM_IDS = [case[0] for case in form_cases(6)]
OPTIONS = [  # gate, pool, residual, out_activation: each gate, pool and epilogue once
    ("sigmoid", "avg", False, None), ("hardsigmoid", "avgmax", True, "relu"),
    ("tanh", "max", False, "relu"), ("relu", "avg", True, None)]


def make_params(shapes, frozen, dtype, gen):
    params = []
    for i, shape in enumerate(shapes):
        if shape is None:
            params.append(None)
            continue
        # Fan-in scaled, so that gates and hidden units sit on both sides of their kinks
        # rather than saturate.
        fan_in = max(1, torch.Size(shape[1:]).numel())
        t = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 / fan_in ** 0.5
        if i in frozen:  # running statistics: a variance is positive
            t = t.abs() + 0.5 if i == 7 else t
        params.append(t.to(dtype).requires_grad_(i not in frozen))
    return params


def run(backend_name, form, params, x, residual, gate, pool, out_activation, grad):
    x = x.detach().clone().requires_grad_()
    residual = None if residual is None else residual.detach().clone().requires_grad_()
    params = [None if p is None else p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    out, stats = staged.staged_squeeze_excitation(x, form, params, gate=gate, pool=pool,
                                                  residual=residual, out_activation=out_activation,
                                                  backend=backend_name)
    inputs = [t for t in (x, residual, *params) if t is not None and t.requires_grad]
    return [out, *torch.autograd.grad(out, inputs, grad)], stats


def assert_close_to(got, expected, tol):
    """Each tensor within tol of its own largest magnitude, or of a hundredth of the
    largest of all: a gradient that is zero in exact arithmetic (a bias before a batch
    norm) is a sum of rounding errors."""
    assert len(got) == len(expected)
    floor = max(e.double().abs().max().item() for e in expected) * 1e-2
    for i, (g, e) in enumerate(zip(got, expected)):
        err = (g.double() - e.double()).abs().max().item()
        scale = max(e.double().abs().max().item(), floor)
        assert err <= tol * scale, f"tensor {i}: max error {err:.3g} > {tol:g} x {scale:.3g}"


def inputs(shape, dtype, gen, layout="nchw", residual=False):
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    r = torch.randn(shape, generator=gen, dtype=torch.float64) if residual else None
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    convert = {"nchw": lambda t: t, "channels_last": lambda t: t.to(memory_format=torch.channels_last),
               "strided": lambda t: t.transpose(2, 3).contiguous().transpose(2, 3)}[layout]
    return [None if t is None else convert(t.to(dtype)) for t in (x, r, grad)]


def composition(form, params, x, residual, gate, pool, out_activation, grad):
    """The float64 composition that autograd differentiates: the reference."""
    params = [None if p is None else p.double() for p in params]
    return run("torch", form, params, x.double(), None if residual is None else residual.double(),
               gate, pool, out_activation, grad.double())


@pytest.mark.parametrize("option", OPTIONS, ids=["-".join(map(str, o)) for o in OPTIONS])
@pytest.mark.parametrize("form_id", FORM_IDS)
def test_fp64_matches_the_composition(staged_backend, form_id, option):
    name, device = staged_backend
    gate, pool, has_residual, out_activation = option
    gen = torch.Generator().manual_seed(hash((form_id, option)) % 2**31)
    shape = (4, 6, 5, 3)
    _, form, shapes, frozen = next(c for c in form_cases(shape[1]) if c[0] == form_id)
    params = make_params(shapes, frozen, torch.float64, gen)
    x, residual, grad = inputs(shape, torch.float64, gen, residual=has_residual)
    expected, expected_stats = composition(form, params, x, residual, gate, pool, out_activation, grad)
    to = functools.partial(lambda t: None if t is None else t.to(device))
    got, stats = run(name, form, [to(p) for p in params], to(x), to(residual), gate, pool,
                     out_activation, to(grad))
    assert_close_to([g.cpu() for g in got], expected, tol=1e-10)
    assert (stats is None) == (expected_stats is None)
    if stats is not None:
        assert_close_to([s.cpu() for s in stats], list(expected_stats), tol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2),
                                        (torch.float16, 4e-3)], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (1, 5, 7, 7), (3, 16, 13, 17)],
                         ids=["c3-p1", "n1", "odd"])
def test_low_precision_and_layouts(staged_backend, dtype, tol, layout, shape):
    name, device = staged_backend
    gen = torch.Generator().manual_seed(shape[1] * 7 + len(layout))
    # Batch statistics need 2 samples: N=1 takes the ECA form.
    form_id = "eca-mlp" if shape[0] == 1 else "mlp-leaky-0.2-norm-batch"
    _, form, shapes, frozen = next(c for c in form_cases(shape[1]) if c[0] == form_id)
    params = make_params(shapes, frozen, dtype, gen)
    x, residual, grad = inputs(shape, dtype, gen, layout, residual=True)
    expected, _ = composition(form, params, x, residual, "sigmoid", "avgmax", "relu", grad)
    to = functools.partial(lambda t: None if t is None else t.to(device))
    got, _ = run(name, form, [to(p) for p in params], to(x), to(residual), "sigmoid", "avgmax",
                 "relu", to(grad))
    assert got[0].dtype == dtype and got[0].shape == x.shape
    if layout == "channels_last" and min(shape[1], shape[2] * shape[3]) > 1:
        assert got[0].is_contiguous(memory_format=torch.channels_last)
    # Each gradient once rounded to dtype, of sums in fp32: relative to its own scale.
    assert_close_to([g.cpu() for g in got], expected, tol=tol)


def test_every_gate_and_pool_is_a_case():
    assert {o[0] for o in OPTIONS} == set(GATES) and {o[1] for o in OPTIONS} == set(POOLS)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_running_statistics_match_nn_batchnorm(momentum):
    timm = pytest.importorskip("timm")
    from timm.layers.squeeze_excite import SEModule
    torch.manual_seed(0)
    original = SEModule(16, rd_channels=5, norm_layer=functools.partial(nn.BatchNorm2d, momentum=momentum))
    original = original.double().train()
    converted = convert_se_modules(copy.deepcopy(original))
    assert isinstance(converted.spec, StagedSpec) and converted.spec.norm == "bn"
    for step in range(3):
        x = torch.randn(4, 16, 5, 5, dtype=torch.float64)
        a, b = original(x), converted(x)
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    for key, value in original.bn.state_dict().items():
        torch.testing.assert_close(converted.bn.state_dict()[key], value, rtol=1e-13, atol=1e-13)
    assert int(converted.bn.num_batches_tracked) == 3
    converted.eval()
    original.eval()
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(converted(x), original(x), rtol=1e-12, atol=1e-12)


def test_batch_statistics_of_one_sample_fail_as_batch_norm_does():
    params = make_params([(3, 4), None, (4, 3), None, None, None, None, None], (), torch.float32,
                         torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        staged.staged_squeeze_excitation(torch.randn(1, 4, 2, 2), Mlp("relu", 0.01, norm=True,
                                                                      batch_stats=True),
                                         params, gate="sigmoid")


@pytest.mark.parametrize("form, params, message", [
    (ChannelConv(4), [torch.randn(4), None], "kernel must be odd"),
    (ChannelConv(3), [torch.randn(5), None], r"ChannelConv: w must have shape \[3\] or \[1, 1, 3\]"),
    (Fc(), [torch.randn(6, 5), None], r"Fc: w must have shape \[6, 6\] or \[6, 6, 1, 1\]"),
    (Fc(), [torch.randn(6, 6), torch.randn(5)], r"Fc: b must have shape \[6\]"),
    (Mlp("relu", 0.01), [torch.randn(2, 6), None, torch.randn(6, 3), None] + [None] * 4,
     r"Mlp: w2 must have shape \[6, 2\]"),
    (Mlp("relu", 0.01, norm=True), [torch.randn(2, 6), None, torch.randn(6, 2), None] + [None] * 4,
     "Mlp: running_mean is required"),
], ids=["even-kernel", "conv-weight", "fc-weight", "fc-bias", "mlp-w2", "running-mean"])
def test_bad_parameters_are_named(form, params, message):
    with pytest.raises(ValueError, match=message):
        staged.staged_squeeze_excitation(torch.randn(2, 6, 3, 3), form, params, gate="sigmoid")


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="gate must be one of"):
        staged.staged_squeeze_excitation(torch.randn(2, 6, 3, 3), Fc(), [torch.randn(6, 6), None],
                                         gate="softmax")


@pytest.mark.parametrize("residual, error, message", [
    (torch.randn(2, 6, 3, 4), ValueError, r"residual must have shape \[2, 6, 3, 3\], got \[2, 6, 3, 4\]"),
    (torch.randn(2, 6, 3, 3, dtype=torch.float64), TypeError,
     "residual must have dtype torch.float32, got torch.float64"),
    (torch.randn(2, 6, 3, 3, device="meta"), TypeError, "residual must be on device cpu like x, got meta"),
], ids=["shape", "dtype", "device"])
def test_a_bad_residual_is_named(residual, error, message):
    with pytest.raises(error, match=message):
        staged.staged_squeeze_excitation(torch.randn(2, 6, 3, 3), Fc(), [torch.randn(6, 6), None],
                                         gate="sigmoid", residual=residual)


def test_a_backend_without_stream_kernels_says_so():
    call = staged.make_call(torch.randn(2, 6, 3, 3), Fc(), [torch.randn(6, 6), None], gate="sigmoid")
    reasons = dispatch.not_supported_reasons(dispatch.get_backend("cuda"), call)
    assert reasons and "cuda" in reasons[0]


def test_converted_staged_module_compiles_whole_graph():
    timm = pytest.importorskip("timm")
    from timm.layers.eca import EcaModule
    torch.manual_seed(0)
    converted = convert_se_modules(EcaModule(32).double())
    assert_compiled_matches_eager(converted, torch.randn(4, 32, 6, 6, dtype=torch.float64),
                                  lambda m: m.conv.weight.grad)


def test_stream_ops_run_beneath_autograd_where_nothing_is_recorded(monkeypatch):
    """With grad mode off, a backend's stream ops skip the forward ops' autograd formula (a
    Python check per call) and give the same bits; with grad mode on, or under tracing, they
    are the ops themselves."""
    from se_kernels import _stream_ops
    cpu = dispatch.get_backend("cpu")
    if cpu.stream_ops("cpu") is None:
        pytest.skip("no CPU stream kernels in this build")
    ops = cpu.stream_ops("cpu")
    assert all(op is getattr(torch.ops.se_kernels, name).default for name, op in ops.items())
    x = torch.randn(2, 5, 3, 4)
    scale = torch.rand(2, 5)
    with torch.no_grad():
        beneath = cpu.stream_ops("cpu")
        assert beneath is not ops and set(beneath) == set(ops)
        assert cpu.stream_ops("cpu") is beneath  # made once per ops table
        formula = []
        real = torch._C._AutoDispatchBelowAutograd
        monkeypatch.setattr(_stream_ops, "_BENEATH_AUTOGRAD",
                            lambda: formula.append(1) or real())
        assert torch.equal(beneath["stream_map"](x, scale, None, None, "none"),
                           ops["stream_map"](x, scale, None, None, "none"))
        assert formula == [1]
        for a, b in zip(beneath["stream_reduce"](x, True, True, False),
                        ops["stream_reduce"](x, True, True, False)):
            assert torch.equal(a, b)
    with torch.no_grad():
        monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
        assert cpu.stream_ops("cpu") is ops
