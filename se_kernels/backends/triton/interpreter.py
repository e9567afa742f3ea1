"""Everything about running the Triton kernels through Triton's interpreter.

With TRITON_INTERPRET=1 set before the kernels are defined, triton.jit makes interpreted
functions that run on CPU tensors, one program after another (how the kernels are tested
without a GPU). That needs, all here:
  - the probes: was the interpreter asked for, and were the kernels defined for it;
  - launches that skip fake tensors and the GPU-only launch options (launch);
  - torch.compile keeping the ops opaque, since interpreted kernels cannot be traced
    (keep_opaque_under_interpreter);
  - a fix that lets Triton 3.6's interpreter take scalars as loop bounds under numpy 2.5
    (squeeze_loop_bounds).
Importing this module does not import triton.
"""

from __future__ import annotations

import os

import torch

from ... import _compat, dispatch


@dispatch.constant_under_compile
def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@dispatch.constant_under_compile
def kernels_interpreted() -> bool:
    """Whether the kernels were defined for the interpreter (TRITON_INTERPRET=1 when they
    were first imported). Imports them."""
    from triton.runtime.jit import JITFunction

    from . import kernels
    return not isinstance(kernels._pool_kernel, JITFunction)


def launch(kernel, programs: int, *args, **meta) -> None:
    """Runs an interpreted kernel on real CPU tensors. Under fake tensors (shape
    propagation: torch.compile, opcheck) a launch only writes its outputs, so there is
    nothing to do: torch.compile keeps the op opaque here (keep_opaque_under_interpreter)."""
    if any(isinstance(a, torch.Tensor) and _compat.is_fake(a) for a in args):
        return
    meta.pop("num_warps", None)
    kernel[(programs,)](*args, **meta)


def keep_opaque_under_interpreter(op) -> None:
    """Under TRITON_INTERPRET=1 the kernels run on real CPU tensors and cannot be traced, so
    torch.compile must keep the op as one opaque node (run eagerly at runtime) instead of
    decomposing it into traced kernel launches. Elsewhere triton_op's own rule stays in
    charge."""
    _compat.keep_opaque_under_functionalization(op, kernels_interpreted)


def squeeze_loop_bounds() -> None:
    """Lets the interpreter take scalars as loop bounds under numpy 2.5 on Triton 3.6 too,
    so the kernels' data-dependent loops need no interpreter-only form."""
    _compat.squeeze_interpreter_loop_bounds()
