"""A model whose block tails are fused (DESIGN.md §1.5) trains on 2 gloo processes on CPU as
the same model unconverted does: under DistributedDataParallel and under FSDP2 (fully_shard),
each process's outputs and loss, every parameter's gradient and every buffer agree step by
step. With SyncBatchNorm tails under FSDP2, the 2 processes train as one process on the
whole batch. One spawn runs every case; the tests read its results."""

import copy
import functools
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import GLOO_WORLD_SIZE, needs_gloo, randomize_norms, run_on_gloo
from se_kernels import convert_se_modules
from se_kernels.blocks import FusedActBlock, FusedBlock

timm = pytest.importorskip("timm", reason="timm is a test extra: pip install .[test]")
pytestmark = needs_gloo

STEPS = 2
BATCH = 4  # the global batch, 2 samples a process


def small_se_resnet(other_norms: str = "batch", drop_path: float = 0.2) -> nn.Module:
    """A stem and two SE BasicBlocks (the second strided, with a downsampling shortcut), in
    float64. The tails' norms (bn2) are BatchNorm2d; the other norms BatchNorm2d too, or with
    `other_norms="group"` GroupNorm, so that SyncBatchNorm conversion reaches the tails alone
    (an eager SyncBatchNorm runs on GPUs only)."""
    from timm.layers import DropPath
    from timm.models.resnet import BasicBlock

    torch.manual_seed(0)
    norm = nn.BatchNorm2d if other_norms == "batch" else functools.partial(nn.GroupNorm, 4)

    def block(cin, cout, stride):
        downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), norm(cout))
                      if stride > 1 else None)
        b = BasicBlock(cin, cout, stride=stride, downsample=downsample, attn_layer="se",
                       norm_layer=norm, drop_path=DropPath(drop_path) if drop_path else None)
        b.bn2 = nn.BatchNorm2d(cout)
        return b

    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), norm(16), nn.ReLU(),
                          block(16, 16, 1), block(16, 32, 2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))
    randomize_norms(model, seed=0)  # timm zero-initialises bn2's scale
    return model.double()


def small_act_net(sync: bool) -> nn.Module:
    """A stem and two timm DepthwiseSeparableConv blocks with an SE, whose BatchNormAct2d ->
    SiLU -> SE are act tails, in float64; the other norms GroupNorm. With `sync`, timm's
    convert_sync_batchnorm makes the tails' norms SyncBatchNormAct."""
    from timm.layers import convert_sync_batchnorm
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, SqueezeExcite

    torch.manual_seed(0)

    def block(c, stride):
        b = DepthwiseSeparableConv(c, c, stride=stride, act_layer=nn.SiLU, se_layer=SqueezeExcite,
                                   noskip=stride > 1)
        b.bn2 = nn.GroupNorm(4, c)
        return b

    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.GroupNorm(4, 16),
                          nn.SiLU(), block(16, 1), block(16, 2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    randomize_norms(model, seed=0)
    model = model.double()
    return convert_sync_batchnorm(model) if sync else model


def converted_act(model: nn.Module) -> nn.Module:
    """The act tails at every size (auto keeps small ones SE-only on CPU, and an eager
    SyncBatchNorm runs on GPUs only)."""
    model = convert_se_modules(copy.deepcopy(model), backend="cpu")
    assert [isinstance(model[i], FusedActBlock) for i in (3, 4)] == [True, True]
    return model


def converted(model: nn.Module) -> nn.Module:
    model = convert_se_modules(copy.deepcopy(model))
    assert [isinstance(model[i], FusedBlock) for i in (3, 4)] == [True, True]
    return model


def global_batch():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(BATCH, 3, 8, 8, generator=gen, dtype=torch.float64),
            torch.randint(0, 5, (BATCH,), generator=gen))


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's sharded parameters and gradients) gathered whole, else t."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def train(model: nn.Module, x, y, seed: int) -> list[dict]:
    """STEPS SGD steps on the cross-entropy of (x, y); after each forward and backward, the
    output, the loss, each parameter's gradient and each buffer."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    records = []
    for step in range(STEPS):
        torch.manual_seed(seed + step)  # the drop path's draws, the same for either model
        out = model(x)
        loss = F.cross_entropy(out, y)
        optimizer.zero_grad()
        loss.backward()
        records.append({"out": out.detach().clone(), "loss": loss.detach().clone()}
                       | {f"grad {n}": full(p.grad) for n, p in model.named_parameters()}
                       | {f"buffer {n}": b.clone() for n, b in model.named_buffers()})
        optimizer.step()
    return records


def fully_shard_function():
    """FSDP2's fully_shard from wherever this torch has it, or None."""
    for name in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp"):
        try:
            return importlib.import_module(name).fully_shard
        except (ImportError, AttributeError):
            continue
    return None


FSDP2_MISSING = ("FSDP2 is missing: neither torch.distributed.fsdp nor "
                 "torch.distributed._composable.fsdp has fully_shard")


def fsdp2_mesh(fully_shard):
    """(the CPU device mesh, None), or (None, why FSDP2 cannot train on these processes): a
    linear layer, sharded, through a forward and backward."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (GLOO_WORLD_SIZE,))
        layer = fully_shard(nn.Linear(4, 2).double(), mesh=mesh)
        layer(torch.ones(2, 4, dtype=torch.float64)).sum().backward()
        full(layer.weight.grad)
    except Exception as e:  # noqa: BLE001 - the reason becomes the skip's
        return None, f"FSDP2 does not train on CPU with gloo: {type(e).__name__}: {e}"
    return mesh, None


def sharded(model: nn.Module, fully_shard, mesh) -> nn.Module:
    for block in (model[3], model[4]):
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def worker(rank: int) -> dict:
    x, y = global_batch()
    shard = slice(rank * BATCH // GLOO_WORLD_SIZE, (rank + 1) * BATCH // GLOO_WORLD_SIZE)
    x, y = x[shard], y[shard]
    ddp = nn.parallel.DistributedDataParallel
    original = small_se_resnet()
    results = {"ddp": {"original": train(ddp(copy.deepcopy(original)), x, y, seed=10 * rank),
                       "converted": train(ddp(converted(original)), x, y, seed=10 * rank)}}
    fully_shard = fully_shard_function()
    mesh, problem = fsdp2_mesh(fully_shard) if fully_shard else (None, FSDP2_MISSING)
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(small_se_resnet("group", drop_path=0.0))
    results["fsdp2"] = problem or {
        kind: train(sharded(make(model), fully_shard, mesh), x, y, seed=10 * rank)
        for kind, make, model in (("original", copy.deepcopy, original),
                                  ("converted", converted, original), ("sync", converted, sync),
                                  ("act sync", converted_act, small_act_net(sync=True)))}
    return results


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> list[dict]:
    return run_on_gloo(worker, tmp_path_factory.mktemp("gloo"))


def assert_records_close(got: list[dict], expected: list[dict], tol: float, rank: int) -> None:
    """Step by step, the same keys, each tensor within tol of its own largest magnitude or
    of a thousandth of the step's largest (a gradient zero in exact arithmetic, as a conv
    bias's before a BatchNorm, is rounding)."""
    assert len(got) == len(expected) == STEPS
    for step, (g, e) in enumerate(zip(got, expected)):
        assert g.keys() == e.keys()
        scale = max(t.double().abs().max().item() for t in e.values())
        for key, value in e.items():
            err = (g[key].double() - value.double()).abs().max().item()
            bound = tol * max(value.double().abs().max().item(), 1e-3 * scale)
            assert err <= bound, f"rank {rank}, step {step}, {key}: error {err:.3g} > {bound:.3g}"


def test_ddp_of_a_converted_model_matches_the_original(trained):
    for rank, results in enumerate(trained):
        runs = results["ddp"]
        assert_records_close(runs["converted"], runs["original"], 1e-10, rank)
        # Not vacuous: the steps moved the tails' statistics and the two ranks' batches differ.
        first, second = runs["converted"]
        assert not torch.equal(first["buffer module.3.bn2.running_mean"],
                               second["buffer module.3.bn2.running_mean"])
    assert not torch.equal(trained[0]["ddp"]["converted"][0]["out"],
                           trained[1]["ddp"]["converted"][0]["out"])


def fsdp2_runs(trained) -> list[dict]:
    """Each rank's FSDP2 runs, or a skip saying what this torch lacks."""
    if fully_shard_function() is None:
        pytest.skip(f"{FSDP2_MISSING} (torch {torch.__version__})")
    runs = [results["fsdp2"] for results in trained]
    for r in runs:
        if isinstance(r, str):
            pytest.skip(r)
    return runs


def test_fsdp2_of_a_converted_model_matches_the_original(trained):
    for rank, (results, runs) in enumerate(zip(trained, fsdp2_runs(trained))):
        assert_records_close(runs["converted"], runs["original"], 1e-10, rank)
        # Sharded and gathered: the gradients are the DDP run's, the whole parameters'.
        ddp = results["ddp"]["converted"][0]
        for key, value in runs["converted"][0].items():
            if key.startswith("grad "):
                torch.testing.assert_close(value, ddp[key.replace("grad ", "grad module.")],
                                           rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["sync", "act sync"])
def test_sync_batch_norm_tails_under_fsdp2_train_as_one_process(trained, kind):
    """SyncBatchNorm converted before the SE (the SE-ResNet tail), or timm's SyncBatchNormAct
    before it (the act tail): the tails' statistics span the processes. The reference: one
    process, the whole batch, plain BatchNorm2d (BatchNormAct2d), eager SE; FSDP2 averages
    the processes' gradients of their mean losses, which is the whole batch's. (Under DDP
    this cannot run on CPU: DDP refuses any SyncBatchNorm in a CPU module.)"""
    runs = fsdp2_runs(trained)
    model = small_se_resnet("group", drop_path=0.0) if kind == "sync" else small_act_net(False)
    reference = train(model, *global_batch(), seed=0)
    half = BATCH // GLOO_WORLD_SIZE
    for rank, run in enumerate(runs):
        expected = [r | {"out": r["out"][rank * half:(rank + 1) * half]} for r in reference]
        got = [dict(r) for r in run[kind]]
        for step, record in enumerate(got):  # the whole batch's loss is the ranks' mean
            record["loss"] = sum(r[kind][step]["loss"] for r in runs) / GLOO_WORLD_SIZE
        assert_records_close(got, expected, 1e-10, rank)
