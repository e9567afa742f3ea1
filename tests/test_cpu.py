"""CPU-backend specifics: samples processed in several cache-sized groups, the MLP's
register tiles, both kernel tables (baseline and AVX2), determinism across thread counts."""

import os

import pytest
import torch

import se_kernels
from helpers import Case, check_against_reference, grad_output, make_inputs, run_python, run_se

# 2 MiB per sample against the ops' 4 MiB groups: these batches run in two or more
# groups, and the backward sums the weight gradients over groups.
MULTI_GROUP = [
    Case(n=3, c=32, h=128, w=128, s=4, residual=True, out_activation="relu", pool="avgmax"),
    Case(n=3, c=32, h=128, w=128, s=4, layout="channels_last", activation="silu", gate="hardsigmoid", pool="max"),
    Case(n=3, c=64, h=128, w=128, s=5, dtype=torch.bfloat16, residual=True),
]


@pytest.mark.parametrize("case", MULTI_GROUP, ids=str)
def test_batches_split_into_groups_match_reference(case):
    check_against_reference(case, "cpu", "cpu")


# The MLP's products work on register tiles chosen by batch (1, 2, 3 or more samples) with
# partial tiles for the last rows, samples and vectors of columns and a scalar tail past
# the last full vector: C and S here are neither multiples of the tiles nor of the vector
# width, N leaves a partial sample tile, and the large shape runs a full batch-1 tile.
MLP_TILE_CASES = [
    Case(n=1, c=67, h=2, w=3, s=19),
    Case(n=2, c=67, h=3, w=1, s=19, activation="silu", gate="hardsigmoid"),
    Case(n=5, c=67, h=2, w=2, s=19, pool="avgmax"),
    Case(n=7, c=203, h=1, w=1, s=50, residual=True, out_activation="relu"),
    Case(n=4, c=41, h=3, w=3, s=7, dtype=torch.float64),
    Case(n=3, c=67, h=2, w=3, s=19, dtype=torch.bfloat16, layout="channels_last"),
    Case(n=1, c=1024, h=2, w=2, s=64, bias=False),
]


@pytest.mark.parametrize("case", MLP_TILE_CASES, ids=str)
def test_mlp_tiles_and_tails_match_reference(case):
    check_against_reference(case, "cpu", "cpu")


@pytest.mark.parametrize("case", [
    Case(n=2, c=48, h=40, w=40, s=6, pool="avgmax", residual=True, out_activation="relu"),
    # MLPs large enough to be split over threads (over 2^18 multiply-adds per product).
    Case(n=3, c=1024, h=2, w=1, s=128),
    Case(n=1, c=2048, h=1, w=1, s=256, activation="silu"),
], ids=str)
def test_results_do_not_depend_on_thread_count(case):
    inputs, grad = make_inputs(case, "cpu"), grad_output(case, "cpu")
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run_se(case, inputs, grad, "cpu"))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for name, value in results[0].items():
            if value is not None:
                assert torch.equal(value, other[name]), f"{name} differs between thread counts"


def test_baseline_kernels_match_avx2_kernels():
    """ATEN_CPU_CAPABILITY=default makes the ops use the kernels built with baseline flags;
    they must agree with the default choice (AVX2 on x86-64 machines that have it)."""
    script = (
        "import torch, se_kernels; torch.manual_seed(0);"
        "x = torch.randn(3, 37, 9, 11).to(memory_format=torch.channels_last).requires_grad_();"
        "w1, w2 = torch.randn(5, 37), torch.randn(37, 5);"
        "y = se_kernels.squeeze_excitation(x, w1, None, w2, None, pool='avgmax', backend='cpu');"
        "y.backward(torch.ones_like(y)); y = torch.cat([y.flatten(), x.grad.flatten()]);"
        "torch.save(y, __import__('sys').argv[1])")
    outputs = []
    for capability in ("default", ""):
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"se_cpu_{capability or 'native'}_{os.getpid()}.pt")
        env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
        if not capability:
            env.pop("ATEN_CPU_CAPABILITY")
        result = run_python("-c", script, path, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(torch.load(path))
        os.remove(path)
    # Equal up to summation order (the vector widths differ).
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def test_reference_for_group_cases_is_not_trivial():
    """The outputs vary across samples and channels (a constant would not pass the above)."""
    case = MULTI_GROUP[0]
    out = se_kernels.squeeze_excitation(*[make_inputs(case, "cpu")[k] for k in ("x", "w1", "b1", "w2", "b2")],
                                        backend="cpu")
    assert out.std() > 0.1 and out[0].sub(out[1]).abs().max() > 0.1
