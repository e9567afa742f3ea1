"""Model benchmark: SE-ResNet-50 vs ResNet-50 (torchvision, with each se_kernels backend) and
timm's seresnet50 vs resnet50 and seresnext50_32x4d vs resnext50_32x4d (eager, with the SE
modules converted, and converted with the block tails fused): training step and inference,
SE/plain next to the paper's 209/190 ms and timm's 0.864/0.779.

    python benchmarks/bench_model.py                  # = se-kernels bench --suite model
    python benchmarks/bench_model.py --quick --model-batch 4 --image-size 160
    python benchmarks/bench_model.py --families timm --model-tasks train \
        --model-batch 8,32 --image-size 160,224      # the timm pairs' training step
    python benchmarks/bench_model.py --model-compile  # also torch.compile'd models
"""

import sys

from se_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--suite", "model", *sys.argv[1:]]))
