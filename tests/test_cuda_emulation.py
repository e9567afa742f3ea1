"""The CUDA kernels of csrc/cuda/, compiled as host code and run on a CPU emulator
(tests/cuda_emulator/), against the float64 oracle (tests/oracle.py): their index
arithmetic, vector and scalar paths, split-row partials, L2 groups, reductions and MLP kernels, on a machine
without a GPU. Every buffer sits between NaN guards, outputs and scratch start as NaN:
unwritten outputs, out-of-bounds reads and out-of-bounds writes all fail these tests.

Needs the CUDA toolkit's headers (not a GPU, not nvcc); builds the emulator once per
session with torch.utils.cpp_extension (about a minute on 2 cores)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import (OPTION_CASES, SHAPE_CASES, Case, assert_all_differ, compare_with_oracle,
                     grad_output, make_inputs)

HERE = Path(__file__).resolve().parent
EMULATOR = HERE / "cuda_emulator"
GROUP_ENV = "SE_KERNELS_CUDA_GROUP_BYTES"


def cuda_include_dir() -> Path | None:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if torch.version.cuda:
        candidates.append(f"/usr/local/cuda-{torch.version.cuda}")
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if root and (Path(root) / "include" / "cuda_runtime.h").exists():
            return Path(root) / "include"
    return None


@pytest.fixture(scope="module")
def emu():
    include = cuda_include_dir()
    if include is None:
        pytest.skip("the CUDA emulator needs the CUDA toolkit's headers (set CUDA_HOME)")
    from torch.utils.cpp_extension import load

    load(name="se_kernels_cuda_emulator",
         sources=[str(EMULATOR / f) for f in
                  ("emulated_forward.cpp", "emulated_backward.cpp", "emulated_ops.cpp")],
         extra_include_paths=[str(include)],
         extra_cflags=["-O1", "-Wno-attributes", "-Wno-unknown-pragmas",
                       "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                       "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"],
         is_python_module=False)
    ops = torch.ops.se_kernels_emu
    ops.set_device(132, 50 * 2 ** 20)  # an H100's SM count and L2
    yield ops
    ops.set_device(132, 50 * 2 ** 20)


def check_emulated(ops, case: Case, *, misalign: int = 0, seed: int = 0, inputs: dict | None = None,
                   grad: torch.Tensor | None = None) -> dict:
    """Emulated forward and backward ops vs the oracle, within its error bounds (as
    helpers.check_against_reference), and their saved statistics. Inputs and grad are
    random (from `seed`) unless given."""
    inputs = make_inputs(case, "cpu", seed) if inputs is None else inputs
    grad = grad_output(case, "cpu", seed + 1) if grad is None else grad
    options = (case.activation, case.gate, case.pool, case.out_activation or "none")
    channels_last = case.layout == "channels_last"
    relu = case.out_activation == "relu"
    out, z, zmax, a, g = ops.forward(inputs["x"], inputs["w1"], inputs["b1"], inputs["w2"],
                                     inputs["b2"], inputs["residual"], *options, channels_last,
                                     misalign)
    dx, dw1, db1, dw2, db2, dres = ops.backward(
        grad, inputs["x"], out if relu else None, inputs["w1"], inputs["w2"], z, zmax, a, g,
        *options, inputs["residual"] is not None, channels_last, misalign)
    has = {name: inputs[name] is not None for name in ("b1", "b2", "residual")}
    # Without a bias the op's bias gradient is scratch that autograd drops; without the
    # output ReLU the residual's gradient is dout itself (the op writes none).
    got = {"out": out, "x": dx, "w1": dw1, "b1": db1 if has["b1"] else None, "w2": dw2,
           "b2": db2 if has["b2"] else None,
           "residual": (dres if relu else grad) if has["residual"] else None}
    compare_with_oracle(case, inputs, grad, got)

    # The saved statistics, in the accumulation dtype.
    x = inputs["x"].double()
    avg, mx = x.mean(dim=(2, 3)), x.amax(dim=(2, 3))
    z_ref = {"avg": avg, "max": mx, "avgmax": 0.5 * avg + 0.5 * mx}[case.pool]
    stats = {"z": (z, z_ref)}
    if case.pool != "avg":
        stats["zmax"] = (zmax, mx)
    a_ref = z_ref @ inputs["w1"].double().t()
    if inputs["b1"] is not None:
        a_ref = a_ref + inputs["b1"].double()
    stats["a"] = (a, a_ref)
    h_ref = torch.relu(a_ref) if case.activation == "relu" else torch.nn.functional.silu(a_ref)
    g_ref = h_ref @ inputs["w2"].double().t()
    if inputs["b2"] is not None:
        g_ref = g_ref + inputs["b2"].double()
    stats["g"] = (g, g_ref)
    rel = 1e-10 if case.dtype == torch.float64 else 1e-5
    for name, (actual, expected) in stats.items():
        if expected.numel():
            err = (actual.double() - expected).abs().max().item()
            assert err <= rel * (1 + expected.abs().max().item()), f"{name}: max error {err:.3g}"
    return got


@pytest.mark.parametrize("case", OPTION_CASES, ids=str)
def test_every_option(emu, case):
    check_emulated(emu, case.with_(dtype=torch.float64))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=str)
@pytest.mark.parametrize("case", [
    Case(n=2, c=24, h=7, w=8, s=6, residual=True, out_activation="relu"),
    Case(n=3, c=40, h=5, w=9, s=5, activation="silu", gate="hardsigmoid", pool="avgmax"),
], ids=str)
def test_dtypes_and_layouts(emu, case, dtype, layout):
    for misalign in (0, 1):  # 16-byte vectors, then every buffer one element off: scalar
        check_emulated(emu, case.with_(dtype=dtype, layout=layout), misalign=misalign)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", SHAPE_CASES, ids=str)
def test_odd_shapes(emu, case, layout):
    check_emulated(emu, case.with_(layout=layout))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_split_rows(emu, layout):
    """N=1 with long rows: rows split into pieces, partials combined by a second kernel
    (vector path: P and C multiples of 8)."""
    for dtype in (torch.float32, torch.bfloat16):
        for pool in ("avg", "max"):
            check_emulated(emu, Case(n=1, c=16, h=32, w=40, s=4, dtype=dtype, layout=layout,
                                     pool=pool, residual=True, out_activation="relu"))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_many_channel_blocks(emu, layout):
    """C past one CTA's channel block (channels-last: 2 blocks of 133 vectors, the last
    one short)."""
    check_emulated(emu, Case(n=2, c=2120, h=2, w=3, s=8, dtype=torch.bfloat16, layout=layout))


@pytest.mark.parametrize("group_bytes", ["1", "6000", "20000"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_groups(emu, monkeypatch, group_bytes, layout):
    """Small L2 budgets: the batch of 7 in groups (1 sample; 2+2+2+1), a short last group."""
    monkeypatch.setenv(GROUP_ENV, group_bytes)
    for pool in ("avg", "avgmax"):
        check_emulated(emu, Case(n=7, c=24, h=5, w=5, s=6, layout=layout, pool=pool,
                                 residual=True, out_activation="relu"))


@pytest.mark.parametrize("sm_count", [1, 7])
def test_device_sizes(emu, sm_count):
    """Other SM counts change how rows are split; results must not depend on it beyond
    rounding."""
    emu.set_device(sm_count, 6 * 2 ** 20)
    try:
        for layout in ("nchw", "channels_last"):
            check_emulated(emu, Case(n=1, c=16, h=32, w=40, s=4, layout=layout, pool="avgmax"))
            check_emulated(emu, Case(n=5, c=33, h=6, w=7, s=3, layout=layout, pool="max"))
    finally:
        emu.set_device(132, 50 * 2 ** 20)


def test_fresh_inputs_each_seed(emu):
    """Different seeds, different answers, each matching the oracle."""
    assert_all_differ([check_emulated(emu, Case(n=2, c=12, h=3, w=4, s=3, residual=True), seed=seed)
                       for seed in (3, 4, 5)])
