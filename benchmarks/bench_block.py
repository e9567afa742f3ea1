"""SE block benchmark: `se-kernels bench` over the SE layers of real networks.

With no --suite it runs the full block suite of the device: `--suite cpu` on a CPU-only
machine (every SE shape of ResNet-50, MobileNetV3, EfficientNet-B0 and RegNetY-400MF at
batch 1, 8 and 32, fp32, fwd and fwd+bwd, on 1 and 2 threads, against eager torchvision SE
and torch.compile of it), `--suite blocks` on a GPU. Every other `se-kernels bench` flag is
passed on:

    python benchmarks/bench_block.py                          # the CPU suite
    python benchmarks/bench_block.py --suite resnet50 --dtype bf16,fp16 --batch 1,32,256
"""

import sys

import torch

from se_kernels.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--suite" or a.startswith("--suite=") for a in argv):
        on_gpu = torch.cuda.is_available() and "--device=cpu" not in argv and \
            not any(a == "--device" and b == "cpu" for a, b in zip(argv, argv[1:]))
        argv = ["--suite", "blocks" if on_gpu else "cpu", *argv]
    sys.exit(main(["bench", *argv]))
