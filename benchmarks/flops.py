"""The SE paper's Table 2 (ResNet/SE-ResNet-50/101/152 GFLOPs and params) and Table 10
(SE-ResNet-50 params by reduction ratio), recounted with FlopCounterMode:

    python benchmarks/flops.py                                  # = se-kernels flops
    python benchmarks/flops.py --markdown benchmarks/results/flops.md
"""

import sys

from se_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["flops", *sys.argv[1:]]))
