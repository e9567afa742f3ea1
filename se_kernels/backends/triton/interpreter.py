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

from ... import dispatch


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
    if any(isinstance(a, torch.Tensor) and torch._subclasses.fake_tensor.is_fake(a)
           for a in args):
        return
    meta.pop("num_warps", None)
    kernel[(programs,)](*args, **meta)


def keep_opaque_under_interpreter(op) -> None:
    """Under TRITON_INTERPRET=1 the kernels run on real CPU tensors and cannot be traced, so
    torch.compile must keep the op as one opaque node (run eagerly at runtime) instead of
    decomposing it into traced kernel launches, which triton_op does for FunctionalTensorMode.
    Elsewhere triton_op's own rule stays in charge."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    rules = getattr(op, "_torch_dispatch_fns", None)
    decompose = None if rules is None else rules.get(FunctionalTensorMode)
    if decompose is None:  # a torch whose triton_op works differently: leave it alone
        return

    def functionalize(mode, func, types, args, kwargs):
        if kernels_interpreted():
            return mode.__torch_dispatch__(func, types, args, kwargs)
        return decompose(mode, func, types, args, kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, functionalize)


def squeeze_loop_bounds() -> None:
    """Let the interpreter turn scalars into loop bounds on every supported Triton.

    The interpreter holds a scalar as a 1-element array and gives it `__index__` for
    `range(lo, hi, step)`. Triton 3.6 does that with `int(array)`, which numpy 2.5 refuses
    for arrays that are not 0-d ("only 0-dimensional arrays can be converted to Python
    scalars"); Triton 3.8 squeezes first. Re-set `__index__` after the interpreter's own
    patching, the 3.8 way, so the kernels' data-dependent loops need no interpreter-only
    form. A Triton without this hook gets nothing changed; calling this twice changes
    nothing more.
    """
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "squeezes_loop_bounds", False):
        return

    def patch_tensor_squeezing(tensor, scope, *rest, **kwargs):
        patch_tensor(tensor, scope, *rest, **kwargs)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch_tensor_squeezing.squeezes_loop_bounds = True
    interpreter._patch_lang_tensor = patch_tensor_squeezing
