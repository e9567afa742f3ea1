"""Block-tail benchmark: BatchNorm -> SE -> + shortcut -> ReLU of SE-ResNet-50 /
SE-ResNeXt-50's four stages (shapes of a 224x224 and a 160x160 image), eager (timm's
SEModule), SE-only (the fused SE op after an eager BatchNorm), torch.compile of eager and
the fused tail, forward (inference) and forward+backward (training). Every other
`se-kernels bench` flag is passed on:

    python benchmarks/bench_tail.py                 # = se-kernels bench --suite tail
    python benchmarks/bench_tail.py --batch 32 --threads 1 --backends eager,se-only,fused
"""

import sys

from se_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--suite", "tail", *sys.argv[1:]]))
