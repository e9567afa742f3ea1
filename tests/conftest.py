import os

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter, which is
# read when kernels are defined: set it before se_kernels' Triton module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
