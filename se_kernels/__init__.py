"""Fused Squeeze-and-Excitation kernels for PyTorch."""

__version__ = "0.1.0"

from . import _ops  # noqa: F401 - defines the se_kernels:: ops
from . import _stream_ops  # noqa: F401 - defines the staged path's stream ops
from . import _form_ops  # noqa: F401 - defines the linear forms' inference op
from . import _tail_ops  # noqa: F401 - defines the block tail's algebra ops
from . import _fc_ops  # noqa: F401 - defines the staged MLPs' layer products
from . import backends  # noqa: F401 - registers the backends
from . import models  # noqa: F401 - SE-ResNet builders (torchvision imported on use)
from .convert import convert_se_modules, restore_se_modules
from .dispatch import BackendUnavailableError, backend_names, explain, select
from .functional import squeeze_excitation
from .modules import SqueezeExcitation

__all__ = [
    "BackendUnavailableError",
    "SqueezeExcitation",
    "backend_names",
    "convert_se_modules",
    "explain",
    "models",
    "restore_se_modules",
    "select",
    "squeeze_excitation",
]
