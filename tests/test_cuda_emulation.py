"""The CUDA kernels of csrc/cuda/, compiled as host code and run on a CPU emulator
(tools/cuda_emulator/), against the float64 oracle (tests/oracle.py): their index
arithmetic, vector and scalar paths, split-row partials, L2 groups, reductions and MLP
kernels, on a machine without a GPU. Every buffer sits between NaN guards, outputs, scratch
and shared memory start as NaN: unwritten outputs, out-of-bounds reads and out-of-bounds
writes all fail these tests. The emulator also checks what a GPU would get wrong silently
(barriers, shuffles, shared-memory races, 16-byte alignment, non-coherent loads; see
tools/cuda_emulator/README.md, and tests/test_cuda_emulator_checks.py for the checks
themselves), under schedules set by `Mode`. By default every case runs in the strictest
mode and a few cases run in every mode; SE_KERNELS_EMULATOR_ALL_MODES=1 runs every case in
every mode.

Needs the CUDA toolkit's headers (not a GPU, not nvcc); tools/cuda_emulator/build.py
builds the emulator once per change of its sources (a few minutes on 2 cores)."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

from cuda_emulator.build import (ALL_MODES, DEFAULT_MODE, EMULATED_DEVICE, STRICT, Mode,
                                 load_or_skip, load_se_kernels, set_mode)
from se_kernels.backends.torch_backend import ACTIVATIONS as TORCH_ACTIVATIONS
from helpers import (OPTION_CASES, SHAPE_CASES, Case, assert_all_differ, compare_with_oracle,
                     cuda_launches, grad_output, make_inputs)

GROUP_ENV = "SE_KERNELS_CUDA_GROUP_BYTES"
SCHEDULE_ENV = "SE_KERNELS_CUDA_SCHEDULE"
CTAS_PER_SM_ENV = "SE_KERNELS_CUDA_CTAS_PER_SM"
ALL_MODES_ENV = "SE_KERNELS_EMULATOR_ALL_MODES"
MODES = ALL_MODES if os.environ.get(ALL_MODES_ENV, "") not in ("", "0") else [STRICT]


@pytest.fixture(scope="module")
def emu():
    ops = load_or_skip(load_se_kernels)
    yield ops
    ops.set_device(*EMULATED_DEVICE)
    set_mode(ops, DEFAULT_MODE, 0)


def check_emulated(ops, case: Case, *, misalign: tuple[str, ...] = (), seed: int = 0,
                   modes: list[Mode] | None = None, inputs: dict | None = None,
                   grad: torch.Tensor | None = None) -> dict:
    """check_emulated_once in each of `modes` (default: MODES), each schedule seeded from
    the case; returns the last mode's results."""
    for i, mode in enumerate(MODES if modes is None else modes):
        set_mode(ops, mode, zlib.crc32(f"{case}/{misalign}/{seed}/{i}".encode()))
        got = check_emulated_once(ops, case, misalign=list(misalign), seed=seed, inputs=inputs,
                                  grad=grad)
    return got


def check_emulated_once(ops, case: Case, *, misalign: list[str], seed: int,
                        inputs: dict | None = None, grad: torch.Tensor | None = None) -> dict:
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
    h_ref = TORCH_ACTIVATIONS[case.activation](a_ref)
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
    for misalign in ((), ("all",)):  # 16-byte vectors, then every buffer one element off
        check_emulated(emu, case.with_(dtype=dtype, layout=layout), misalign=misalign)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("pointer", ["x", "residual", "out", "grad_out", "dx", "dresidual"])
def test_one_pointer_misaligned(emu, pointer, layout):
    """One x-shaped buffer one element off 16-byte alignment, the others aligned: the plans
    must fall back to the scalar path, or the emulator's alignment check fails the call."""
    check_emulated(emu, Case(n=2, c=16, h=4, w=8, s=4, layout=layout, residual=True,
                             out_activation="relu"), misalign=(pointer,))


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


@pytest.mark.parametrize("schedule", ["pipelined", "grouped"])
@pytest.mark.parametrize("group_bytes", ["1", "20000", "60000"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_groups(emu, monkeypatch, group_bytes, layout, schedule):
    """Small L2 budgets: the batch of 7 in groups (1 sample each; several of 1-2 with a
    short last one), on both schedules. Pipelined, they give every lag (0: a group's
    stages back to back; 1; 2), and the CTAs of the strict mode interleave the stages of
    neighbouring groups and wait on each other's counters."""
    monkeypatch.setenv(GROUP_ENV, group_bytes)
    monkeypatch.setenv(SCHEDULE_ENV, schedule)
    for pool in ("avg", "avgmax"):
        check_emulated(emu, Case(n=7, c=24, h=5, w=5, s=6, layout=layout, pool=pool,
                                 residual=True, out_activation="relu"))


ODD_PLANE_CASES = [
    # C·H·W = 147: whole rows, avgmax (the backward's map also reads x)
    Case(n=7, c=3, h=7, w=7, s=2, pool="avgmax", residual=True, out_activation="relu"),
    # C·H·W = 6345: rows split into pieces (for every dtype), the pieces' ends peeled
    Case(n=3, c=3, h=45, w=47, s=2, residual=True, out_activation="relu"),
    # channels-last takes vectors only when the width divides C, so its groups start on
    # 16-byte boundaries whatever H·W is
    Case(n=7, c=8, h=7, w=7, s=2, pool="max", layout="channels_last", residual=True,
         out_activation="relu"),
]


@pytest.mark.parametrize("schedule", ["pipelined", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=str)
def test_groups_starting_off_16_byte_boundaries(emu, monkeypatch, dtype, schedule):
    """Sample groups after the first start n0·C·H·W elements into 16-byte-aligned tensors,
    which for an odd C·H·W is not a multiple of the vector width: the NCHW vector path must
    place its 16-byte accesses by the offset in the tensor, not in the group, in every
    pass (forward out; backward dresidual, dx), whole rows and split ones, one sample per
    group (every phase) and several; channels-last groups stay on 16-byte boundaries. The
    emulator fails any misaligned 16-byte access."""
    monkeypatch.setenv(SCHEDULE_ENV, schedule)
    for case in ODD_PLANE_CASES:
        case = case.with_(dtype=dtype)
        plane = case.c * case.h * case.w * case.dtype.itemsize
        for budget in (1, 6 * plane, 40 * plane):
            monkeypatch.setenv(GROUP_ENV, str(budget))
            starts = {access.offset % 16 for backward in (False, True)
                      for launch in cuda_launches(case, *EMULATED_DEVICE, backward)
                      for access in launch.accesses if access.tensor == "x"}
            if case.layout == "channels_last":
                assert starts == {0}, starts
            elif budget == 1:  # the plan does put groups off 16-byte boundaries
                assert starts - {0}, starts
            check_emulated(emu, case)
            assert emu.last_vector_accesses() > 0


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
        emu.set_device(*EMULATED_DEVICE)


PLAN_CASES = [
    Case(n=7, c=24, h=5, w=5, s=6, residual=True, out_activation="relu", pool="avgmax"),
    Case(n=3, c=16, h=7, w=7, s=4, dtype=torch.bfloat16),
    Case(n=1, c=16, h=32, w=40, s=4, dtype=torch.bfloat16, layout="channels_last",
         residual=True, out_activation="relu"),
    Case(n=40, c=3, h=1, w=1, s=1, pool="max"),
]


def planned_launches(case: Case, backward: bool) -> list[tuple[int, int]]:
    """(kernel code, CTAs) of every launch the plan lists for the emulated device."""
    from se_kernels.schedule import CUDA_TRACE_KERNELS

    return [(CUDA_TRACE_KERNELS.index(launch.kernel), launch.programs)
            for launch in cuda_launches(case, *EMULATED_DEVICE, backward)]


@pytest.mark.parametrize("ctas_per_sm", ["1", "2"])
@pytest.mark.parametrize("schedule", ["pipelined", "grouped"])
@pytest.mark.parametrize("group_bytes", ["", "1", "20000", "60000"])
@pytest.mark.parametrize("case", PLAN_CASES, ids=str)
def test_launches_match_the_plan(emu, monkeypatch, case, group_bytes, schedule, ctas_per_sm):
    """The kernels launched are those the plan (`se-kernels plan`'s source) lists, with the
    same CTA counts, forward and backward; the pipelined schedule makes at most 2 and 4, its
    persistent grid at most SE_KERNELS_CUDA_CTAS_PER_SM CTAs per SM (more than one per SM
    with 2 and enough tickets: the batch of 40 in 40 groups)."""
    monkeypatch.setenv(GROUP_ENV, group_bytes)
    monkeypatch.setenv(SCHEDULE_ENV, schedule)
    monkeypatch.setenv(CTAS_PER_SM_ENV, ctas_per_sm)
    set_mode(emu, STRICT, 0)
    inputs, grad = make_inputs(case, "cpu", 0), grad_output(case, "cpu", 1)
    options = (case.activation, case.gate, case.pool, case.out_activation or "none")
    channels_last = case.layout == "channels_last"
    out, z, zmax, a, g = emu.forward(inputs["x"], inputs["w1"], inputs["b1"], inputs["w2"],
                                     inputs["b2"], inputs["residual"], *options, channels_last, [])
    forward = emu.last_launches()
    relu = case.out_activation == "relu"
    emu.backward(grad, inputs["x"], out if relu else None, inputs["w1"], inputs["w2"], z, zmax,
                 a, g, *options, inputs["residual"] is not None, channels_last, [])
    backward = emu.last_launches()
    pairs = lambda flat: list(zip(flat[::2], flat[1::2]))  # noqa: E731
    assert pairs(forward) == planned_launches(case, backward=False)
    assert pairs(backward) == planned_launches(case, backward=True)
    if schedule == "pipelined":
        assert len(forward) // 2 == 2 and len(backward) // 2 <= 4
        grid = int(ctas_per_sm) * EMULATED_DEVICE[0]
        assert forward[3] <= grid and backward[3] <= grid
        if case.n == 40 and group_bytes == "1":  # 40 groups: more tickets than SMs
            fewest = min(forward[3], backward[3])
            assert fewest == grid if ctas_per_sm == "1" else fewest > EMULATED_DEVICE[0]


def test_bitwise_reproducible(emu, monkeypatch):
    """Pipelined with several groups: CTAs that start and interleave in any order (so items
    finish in any order, and any CTA may be the one that combines a group) give the same
    bits, forward and backward."""
    monkeypatch.setenv(GROUP_ENV, "60000")
    case = Case(n=7, c=24, h=5, w=5, s=6, residual=True, out_activation="relu", pool="avgmax",
                dtype=torch.bfloat16)
    inputs, grad = make_inputs(case, "cpu", 0), grad_output(case, "cpu", 1)
    results = []
    for i, mode in enumerate([Mode("forward", "forward", False), Mode("reverse", "reverse", False),
                              STRICT, Mode("forward", "random", True)]):
        results.append(check_emulated(emu, case, modes=[mode], inputs=inputs, grad=grad, seed=i))
    for other in results[1:]:
        for name, value in results[0].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other[name]), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nchw_vectors_with_peeled_ends(emu, dtype):
    """NCHW planes whose length is not a multiple of the vector width (7x7) still move in
    16-byte accesses between their unaligned ends; one misaligned buffer turns them off."""
    case = Case(n=3, c=5, h=7, w=7, s=2, dtype=dtype, residual=True, out_activation="relu")
    check_emulated(emu, case)
    assert emu.last_vector_accesses() > 0
    check_emulated(emu, case, misalign=("x",))
    assert emu.last_vector_accesses() == 0


def test_schedule_must_be_known(emu, monkeypatch):
    monkeypatch.setenv(SCHEDULE_ENV, "fastest")
    with pytest.raises(RuntimeError, match="SE_KERNELS_CUDA_SCHEDULE must be 'pipelined' or "
                                           "'grouped', got 'fastest'"):
        check_emulated(emu, Case())


@pytest.mark.parametrize("schedule", ["pipelined", "grouped"])
@pytest.mark.parametrize("value", ["0", "3", "one", " 1"])
def test_ctas_per_sm_must_be_1_or_2(emu, monkeypatch, schedule, value):
    monkeypatch.setenv(SCHEDULE_ENV, schedule)
    monkeypatch.setenv(CTAS_PER_SM_ENV, value)
    with pytest.raises(RuntimeError, match=f"SE_KERNELS_CUDA_CTAS_PER_SM must be '1' or '2', "
                                           f"got '{value}'"):
        check_emulated(emu, Case())


@pytest.mark.parametrize("case", [
    Case(n=7, c=24, h=5, w=5, s=6, residual=True, out_activation="relu", pool="avgmax"),
    Case(n=3, c=5, h=7, w=7, s=2, dtype=torch.bfloat16, pool="max", residual=True,
         out_activation="relu"),
    Case(n=2, c=16, h=32, w=40, s=4, dtype=torch.bfloat16, layout="channels_last",
         activation="silu", gate="hardsigmoid"),
], ids=str)
def test_pipeline_ctas_per_sm_variants(emu, monkeypatch, case):
    """Both variants of the persistent kernel (SE_KERNELS_CUDA_CTAS_PER_SM=1 and 2, unset
    meaning 2) on a 3-SM device, the batch in groups (budgets of 60000 bytes and of 1 byte):
    each launches the grid the plan lists (3 and 6 CTAs), matches the oracle, and gives the
    same bits as the other, as the grid only changes which CTA takes which ticket."""
    emu.set_device(3, 6 * 2 ** 20)
    try:
        for group_bytes in ("60000", "1"):
            monkeypatch.setenv(GROUP_ENV, group_bytes)
            results = []
            for ctas_per_sm in ("1", "2", ""):
                monkeypatch.setenv(CTAS_PER_SM_ENV, ctas_per_sm)
                results.append(check_emulated(emu, case, seed=1))
                launches = emu.last_launches()
                planned = cuda_launches(case, 3, 6 * 2 ** 20, backward=True)
                assert [launch.programs for launch in planned] == launches[1::2]
                assert launches[3] == 3 * int(ctas_per_sm or "2")
            for other in results[1:]:
                for name, value in results[0].items():
                    if isinstance(value, torch.Tensor):
                        assert torch.equal(value, other[name]), name
    finally:
        emu.set_device(*EMULATED_DEVICE)


def test_fresh_inputs_each_seed(emu):
    """Different seeds, different answers, each matching the oracle."""
    assert_all_differ([check_emulated(emu, Case(n=2, c=12, h=3, w=4, s=3, residual=True), seed=seed)
                       for seed in (3, 4, 5)])


SCHEDULE_CASES = [
    Case(n=2, c=3, h=4, w=5, s=1, residual=True, out_activation="relu"),
    Case(n=1, c=16, h=32, w=40, s=4, dtype=torch.bfloat16, layout="channels_last", pool="max"),
    Case(n=3, c=40, h=5, w=9, s=5, activation="silu", gate="hardsigmoid", pool="avgmax"),
]


@pytest.mark.parametrize("mode", ALL_MODES, ids=str)
@pytest.mark.parametrize("case", SCHEDULE_CASES, ids=str)
def test_schedules(emu, case, mode):
    """Every emulator mode on a few cases (split rows, partial warps, channels-last
    reductions): results must not depend on thread or CTA order."""
    check_emulated(emu, case, modes=[mode])
