"""The CUDA kernels on the CPU emulator (tests/test_cuda_emulation.py) on random cases
against the float64 oracle: shapes, dtypes, options, layouts, misaligned buffers, both
schedules, L2 group budgets that give every lag of the pipelined schedule, SM counts and
the emulator's thread and CTA orders, drawn by tests/fuzz_cases.py (its docstring: the
seed, the number of cases, rerunning one)."""

import pytest

from cuda_emulator.build import ALL_MODES, EMULATED_DEVICE, set_mode
from fuzz_cases import cuda_group_budget, cuda_groups, emulator_cases, fuzz_inputs
from test_cuda_emulation import (GROUP_ENV, SCHEDULE_ENV, check_emulated_once,
                                 emu)  # noqa: F401 (emu: the fixture)

CASES = emulator_cases(default_count=200, max_elements=6_000, modes=ALL_MODES)


@pytest.mark.parametrize("fc", CASES, ids=str)
def test_cuda_kernels_match_the_oracle(emu, monkeypatch, fc):
    print(fc.describe(__file__))
    l2_bytes = EMULATED_DEVICE[1]
    budget = cuda_group_budget(fc, l2_bytes)
    print(f"{SCHEDULE_ENV}={fc.schedule} {GROUP_ENV}={budget!r}: "
          f"{cuda_groups(fc, budget, l2_bytes)}")
    monkeypatch.setenv(SCHEDULE_ENV, fc.schedule)
    monkeypatch.setenv(GROUP_ENV, budget)
    emu.set_device(fc.sm_count, l2_bytes)
    try:
        set_mode(emu, fc.mode, fc.data_seed)
        inputs, grad = fuzz_inputs(fc)
        check_emulated_once(emu, fc.case, misalign=list(fc.misalign), seed=fc.data_seed,
                            inputs=inputs, grad=grad)
    finally:
        emu.set_device(*EMULATED_DEVICE)
