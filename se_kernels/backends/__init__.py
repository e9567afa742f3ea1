"""The backends; importing this package registers them with se_kernels.dispatch."""

from . import native, torch_ref, triton  # noqa: F401
