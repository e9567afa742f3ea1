"""benchmarks/gpu_check.sh rehearsed on the CPU (GPU_CHECK_DEVICE=cpu): the stages, the files
they leave in $OUT as they go, and the time budget, with a budget so short that the block
stage is stopped partway. The GPU runs only get one try each, so what can go wrong in the
script itself is caught here."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not all(shutil.which(t) for t in ("bash", "timeout", "tar")),
    reason="the GPU check is a bash script for Linux (coreutils timeout, tar)")


def rehearse(out: Path, budget: int, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """Runs the script on the CPU with kill and reserve margins sized for a short budget."""
    # Not an xdist worker's variables: the script's pytest would take itself for a worker
    # and leave the per-test log to a controller that does not exist (tests/conftest.py).
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    variables = {**inherited, "GPU_CHECK_DEVICE": "cpu", "OUT": str(out), "PYTHON": sys.executable,
                 "GPU_CHECK_BUDGET": str(budget), "GPU_CHECK_KILL_AFTER": "2",
                 "GPU_CHECK_RESERVE": "3", "GPU_CHECK_MIN_STAGE": "5", **env}
    started = time.monotonic()
    done = subprocess.run(["bash", str(SCRIPT)], env=variables, capture_output=True, text=True,
                          timeout=budget + 60)
    return done, time.monotonic() - started


def summary_lines(out: Path) -> dict[str, str]:
    """The summary's first line for each first word (a stage's name, total)."""
    found: dict[str, str] = {}
    for line in (out / "summary.txt").read_text().splitlines():
        if line.strip():
            found.setdefault(line.split()[0], line)
    return found


def test_a_stage_stopped_by_the_budget_keeps_its_rows_and_the_run_ends_in_time(tmp_path):
    """setup, info and a few CPU tests, then a block stage of 24 cases of at least 2 s each
    that the 50 s budget stops partway: its finished rows are in $OUT, the model stage is
    skipped, and the run ends within the budget."""
    budget = 50
    out = tmp_path / "out"
    done, seconds = rehearse(out, budget)
    report = done.stdout[-4000:] + done.stderr[-2000:]
    assert done.returncode == 1, report  # the stopped and the skipped stage
    assert seconds <= budget + 2, (seconds, report)

    lines = summary_lines(out)
    for name in ("setup", "info", "tests"):
        assert re.match(rf"{name} +ok ", lines[name]), lines[name]
    assert "3 passed, 0 failed, 0 skipped" in lines["tests"]
    block = re.match(r"block +timed out +\d+s +(\d+) rows in block\.csv$", lines["block"])
    assert block and int(block.group(1)) >= 2, lines["block"]
    assert re.match(r"model +skipped +the budget is spent", lines["model"]), lines["model"]
    total = re.match(rf"total (\d+)s of a {budget}s budget", lines["total"])
    assert total and int(total.group(1)) <= budget, lines["total"]
    assert done.stdout.rstrip().endswith(lines["total"])  # the summary is printed last

    assert sorted(p.name for p in out.iterdir()) == [
        "block.csv", "block.md", "env.txt", "logs.tar.gz", "summary.txt", "tests.txt"]
    # The rows the block stage finished before it was stopped, whole cases of both peers.
    with (out / "block.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == int(block.group(1)) and len(rows) % 2 == 0
    assert all(r["check"] == "ok" and float(r["median_us"]) > 0 for r in rows)
    assert [r["peer"] for r in rows[:2]] == ["eager", "torch"]
    markdown = (out / "block.md").read_text()
    assert f"- incomplete: {len(rows) // 2} of 24 block cases so far" in markdown
    assert markdown.count("| mobilenetv3 C") >= len(rows)
    # The test names, as each test finished.
    tests = (out / "tests.txt").read_text()
    assert "tests/test_plan.py::test_floor_and_prediction PASSED" in tests
    env = (out / "env.txt").read_text()
    assert "h100: 132 SMs, 50 MiB L2, 3 TB/s, 2.5 us per launch" in env
    assert "backends for cpu tensors" in env
    with tarfile.open(out / "logs.tar.gz") as archive:
        names = set(archive.getnames())
        assert {"./setup.log", "./info.log", "./tests.log", "./block.log"} <= names
        results = archive.extractfile("./tests.results").read().decode()
    assert len(re.findall(r" passed +\d+\.\d+s tests/test_plan\.py::", results)) == 3
    assert results.count(" started ") == 3


def test_a_budget_too_short_for_setup_skips_everything_in_time(tmp_path):
    out = tmp_path / "out"
    done, seconds = rehearse(out, budget=6, GPU_CHECK_STAGES="tests block memcheck")
    assert done.returncode == 1 and seconds < 6
    lines = summary_lines(out)
    assert re.match(r"setup +skipped +the budget is spent", lines["setup"]), lines
    assert re.match(r"tests +skipped +setup failed", lines["tests"]), lines
    assert re.match(r"memcheck +skipped +setup failed", lines["memcheck"]), lines
    assert re.match(r"total \ds of a 6s budget", lines["total"]), lines


def test_an_unknown_stage_is_refused_before_anything_runs(tmp_path):
    out = tmp_path / "out"
    done, _ = rehearse(out, budget=10, GPU_CHECK_STAGES="tests blok")
    assert done.returncode == 2
    assert "unknown stage 'blok'" in done.stderr and "ctas1" in done.stderr
    assert not (out / "env.txt").exists()
