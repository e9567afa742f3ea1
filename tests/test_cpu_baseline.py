"""The baseline CPU kernels (built without AVX2, chosen with ATEN_CPU_CAPABILITY=default) run
the cpu backend's whole grid: a second pytest run of the cpu tests in a process where ATen,
and with it se_kernels, uses the baseline kernel table."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

import se_kernels
from helpers import run_python

TESTS = Path(__file__).resolve().parent
BASELINE = os.environ.get("ATEN_CPU_CAPABILITY") == "default"
# Every test with "cpu" in its id (the cpu backend's cases of the generic grids, the tie and
# split cases, the CPU-specific tests), the low-precision tests (cpu backend) and the bf16
# property test.
GRID = ["test_backends.py", "test_ties.py", "test_low_precision.py", "test_cpu.py",
        "test_properties.py", "test_cpu_baseline.py"]
SELECTION = "cpu or low_precision or bf16_error or baseline"


@pytest.mark.skipif(not BASELINE, reason="runs in the baseline process only")
def test_this_process_uses_the_baseline_kernels():
    assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"


@pytest.mark.skipif(BASELINE, reason="this is the baseline process")
def test_baseline_kernels_pass_the_cpu_grid():
    package_root = str(Path(se_kernels.__file__).resolve().parent.parent)
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", PYTHONPATH=os.pathsep.join(
        [package_root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    pytest = ("-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(TESTS.parent),
              "-c", str(TESTS.parent / "pyproject.toml"), "-k", SELECTION,
              *[str(TESTS / name) for name in GRID])
    result = run_python(*pytest, env=env, timeout=1800)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    # Not vacuous: every selected test ran, and all but the one that skips here passed.
    collected = run_python(*pytest, "--collect-only", env=env, timeout=600).stdout
    selected = int(re.search(r"(\d+)(?:/\d+)? tests? (?:collected|selected)", collected).group(1))
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|skipped)", summary)}
    assert selected > 100 and counts.get("passed", 0) == selected - 1, (summary, selected)
