import os
import time

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter, which is
# read when kernels are defined: set it before se_kernels' Triton module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# `pytest -n auto` (pytest-xdist): one worker per core the process may run on, at most 8.
# More would gain little, the suite's few long tests (the CMake build, the ONNX exports)
# bounding its time, and on a GPU machine each worker opens a CUDA context of its own on
# the one device.
MAX_AUTO_WORKERS = 8


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    # sched_getaffinity: the cores a taskset or a container leaves us (Linux only)
    usable = getattr(os, "sched_getaffinity", None)
    cores = len(usable(0)) if usable else os.cpu_count() or 1
    return max(1, min(cores, MAX_AUTO_WORKERS))


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one thread: with the 2 cores shared (CI, other jobs), OpenMP
    barriers in the many small parallel regions of fp64 convolutions each wait out a
    scheduler slice, e.g. 40 s instead of 1 s for EfficientNet-B0's backward; one thread
    costs at most 2x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def driver():
    """The Triton backend's drivers (se_kernels.backends.triton.driver, which imports triton
    and the kernels), or a skip saying why the backend cannot run here."""
    from helpers import backend_device, require_backend
    from se_kernels.backends.triton import ops

    require_backend("triton", backend_device("triton"))
    return ops.driver()


# SE_KERNELS_TEST_LOG=FILE: a line appended to FILE when each test starts and when its result
# is in (outcome, seconds, node id), written at once. benchmarks/gpu_check.sh reads it: a run
# cut off by a time limit still names every test that finished, and the tests that started
# without a result are the ones it was stuck in. Under pytest-xdist the controller writes
# (the workers' reports reach it), so each line is written once.
_TEST_LOG = None if os.environ.get("PYTEST_XDIST_WORKER") else os.environ.get("SE_KERNELS_TEST_LOG")


def _log_test(outcome: str, nodeid: str, seconds: str = "") -> None:
    with open(_TEST_LOG, "a") as log:
        log.write(f"{time.strftime('%H:%M:%S')} {outcome:8s} {seconds:>8s} {nodeid}\n")


def pytest_runtest_logstart(nodeid, location):
    if _TEST_LOG:
        _log_test("started", nodeid)


def pytest_runtest_logreport(report):
    if not _TEST_LOG or (report.when != "call" and report.outcome == "passed"):
        return
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
    elif report.when in ("call", "setup"):
        outcome = report.outcome
    else:  # teardown, or a crashed xdist worker
        outcome = f"{report.outcome}:{report.when}"
    _log_test(outcome, report.nodeid, f"{report.duration:.2f}s")
