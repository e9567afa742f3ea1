import os

import torch

# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter, which is
# read when kernels are defined: set it before se_kernels' Triton module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
