"""Every private torch and Triton API se_kernels uses, in one place.

Each function says what it relies on. All of them are checked on the versions in
CHECKED_ON, the two stacks CI runs (tests/test_compat.py exercises each one there); a new
torch or Triton release is supported once those tests pass on it. A private API that
disappears breaks here, with a message naming it, not somewhere in a kernel's path.
Importing this module imports neither triton nor torch._dynamo.
"""

from __future__ import annotations

import torch

CHECKED_ON = {"torch": ("2.11.0", "2.14.1"), "triton": ("3.6.0", "3.8.0")}


def below_autograd():
    """A context that runs ops below their autograd kernel, as an autograd kernel itself
    does (torch._C._AutoDispatchBelowAutograd): what an op call costs when nothing will be
    recorded, without the Python autograd wrapper of torch.library.register_autograd."""
    return torch._C._AutoDispatchBelowAutograd()


def has_dispatch_kernel(qualname: str, dispatch_key: str) -> bool:
    """Whether op `qualname` has a kernel registered for `dispatch_key` ("CPU", "CUDA")
    (torch._C._dispatch_has_kernel_for_dispatch_key)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key)


def mark_constant_under_compile(fn):
    """Marks `fn` as torch.compiler.assume_constant_result does: torch.compile calls it once
    while tracing and bakes in the result. The public decorator imports torch._dynamo,
    which would add seconds to `import se_kernels`, so this sets its marker attribute."""
    fn._dynamo_marked_constant = True
    return fn


def is_fake(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a FakeTensor (shape propagation: torch.compile, opcheck)."""
    from torch._subclasses.fake_tensor import is_fake as _is_fake
    return _is_fake(tensor)


def fake_tensor_mode():
    """A new FakeTensorMode: tensors with shapes, dtypes and devices but no memory."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    return FakeTensorMode()


def keep_opaque_under_functionalization(op, opaque) -> bool:
    """Makes torch.compile's functionalization keep `op` (a torch.library.triton_op) as one
    node while `opaque()` is true, instead of decomposing it into its traced kernel launches
    (triton_op's rule for FunctionalTensorMode, in op._torch_dispatch_fns); triton_op's own
    rule applies otherwise. Returns False, changing nothing, on a torch whose triton_op
    keeps no such rule."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    rules = getattr(op, "_torch_dispatch_fns", None)
    decompose = None if rules is None else rules.get(FunctionalTensorMode)
    if decompose is None:
        return False

    def functionalize(mode, func, types, args, kwargs):
        if opaque():
            return mode.__torch_dispatch__(func, types, args, kwargs)
        return decompose(mode, func, types, args, kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, functionalize)
    return True


def squeeze_interpreter_loop_bounds() -> bool:
    """Lets Triton's interpreter take scalars as loop bounds on every supported Triton.

    The interpreter holds a scalar as a 1-element array and gives it `__index__` for
    `range(lo, hi, step)` in triton.runtime.interpreter._patch_lang_tensor. Triton 3.6 does
    that with `int(array)`, which numpy 2.5 refuses for arrays that are not 0-d; Triton 3.8
    squeezes first. This re-sets `__index__` after the interpreter's own patching, the 3.8
    way. Returns whether the hook is in place; calling it twice changes nothing more."""
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None:
        return False
    if getattr(patch_tensor, "squeezes_loop_bounds", False):
        return True

    def patch_tensor_squeezing(tensor, scope, *rest, **kwargs):
        patch_tensor(tensor, scope, *rest, **kwargs)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch_tensor_squeezing.squeezes_loop_bounds = True
    interpreter._patch_lang_tensor = patch_tensor_squeezing
    return True


def compiled_backward_replayable():
    """A context under which a compiled function's backward may run again on the same graph:
    AOTAutograd's donated buffers (torch._functorch.config.donated_buffer) forbid
    retain_graph. A no-op on a torch without them."""
    import contextlib

    config = torch._functorch.config
    if hasattr(config, "donated_buffer"):
        return config.patch(donated_buffer=False)
    return contextlib.nullcontext()
