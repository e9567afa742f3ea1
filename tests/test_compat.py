"""Each private torch/Triton API of se_kernels._compat still does what se_kernels relies
on, on the installed stack, and that stack is one the module records as checked."""

from __future__ import annotations

import pytest
import torch

from se_kernels import _compat
from se_kernels.backends import native


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


@pytest.mark.parametrize("package", sorted(_compat.CHECKED_ON))
def test_the_installed_stack_is_one_the_module_was_checked_on(package):
    module = pytest.importorskip(package)
    oldest, newest = (_minor(v) for v in _compat.CHECKED_ON[package])
    assert oldest <= _minor(module.__version__) <= newest, (
        f"{package} {module.__version__} is outside the checked range "
        f"{_compat.CHECKED_ON[package]}: run these tests on it and record it in CHECKED_ON")


def test_below_autograd_records_nothing():
    x = torch.randn(3, requires_grad=True)
    with _compat.below_autograd():
        y = torch.ops.aten.mul.Tensor(x, x)
    assert y.grad_fn is None
    assert (x * x).grad_fn is not None


def test_has_dispatch_kernel():
    assert _compat.has_dispatch_kernel("aten::mul.Tensor", "CPU")
    assert native.has_kernel("cpu") == (native.EXTENSION_ERROR is None)


def test_a_marked_function_is_a_constant_to_torch_compile():
    calls = []

    @_compat.mark_constant_under_compile
    def fact() -> int:
        calls.append(1)
        return 3

    compiled = torch.compile(lambda x: x * fact(), fullgraph=True, backend="eager")
    x = torch.randn(4)
    torch.testing.assert_close(compiled(x), x * 3)
    traced = len(calls)
    compiled(x)
    assert len(calls) == traced, "the compiled graph called the function again"


def test_fake_tensors():
    with _compat.fake_tensor_mode():
        fake = torch.empty(2, 3)
    assert _compat.is_fake(fake) and fake.shape == (2, 3)
    assert not _compat.is_fake(torch.empty(1))


def test_the_triton_ops_functionalization_rule_is_ours():
    """triton_op keeps its FunctionalTensorMode rule where _compat replaces it: the ops carry
    the replacement (which keeps them opaque under the interpreter)."""
    pytest.importorskip("triton")
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    from se_kernels.backends.triton import ops

    for op in (ops.se_forward_triton, ops.se_backward_triton):
        rule = op._torch_dispatch_fns[FunctionalTensorMode]
        assert rule.__qualname__.startswith("keep_opaque_under_functionalization."), rule


def test_interpreter_loop_bounds_hook():
    pytest.importorskip("triton")
    assert _compat.squeeze_interpreter_loop_bounds()
    assert _compat.squeeze_interpreter_loop_bounds()  # twice changes nothing more
    from triton.runtime import interpreter
    assert interpreter._patch_lang_tensor.squeezes_loop_bounds


def test_compiled_backward_replayable():
    assert hasattr(torch._functorch.config, "donated_buffer")
    with _compat.compiled_backward_replayable():
        assert torch._functorch.config.donated_buffer is False
