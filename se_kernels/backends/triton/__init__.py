"""The "triton" backend (DESIGN.md §3.2), split by concern:

  ops.py          the triton_op ops and the backend's declarations (imports no triton)
  interpreter.py  everything about Triton's interpreter (TRITON_INTERPRET=1)
  driver.py       the drivers: allocate outputs, choose launch configs, launch
  heuristics.py   launch configs per shape and device
  kernels.py      the @triton.jit kernels

Importing this package registers the ops and the backend; triton itself is imported on the
first call (or when a refusal needs to know whether the kernels are interpreted).
"""

from . import ops  # noqa: F401 - registers the ops and the backend
