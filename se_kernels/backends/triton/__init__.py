"""The "triton" backend (DESIGN.md §3.2), split by concern:

  ops.py          the triton_op ops and the backend's declarations (imports no triton)
  stream.py       the staged path's stream ops as triton_op ops, and their drivers
  interpreter.py  everything about Triton's interpreter (TRITON_INTERPRET=1)
  driver.py       the drivers: allocate outputs, choose launch configs, launch
  heuristics.py   launch configs per shape and device
  kernels.py      the @triton.jit kernels

Importing this package registers the ops and the backend; triton itself is imported on the
first call (or when a refusal needs to know whether the kernels are interpreted).
"""

from . import ops  # noqa: F401 - registers the ops and the backend
from . import stream  # noqa: F401 - registers the stream ops
