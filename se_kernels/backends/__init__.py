"""The backends; importing this package registers them with se_kernels.dispatch."""

from . import native, torch_backend, triton  # noqa: F401
