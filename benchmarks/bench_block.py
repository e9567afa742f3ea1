"""SE block benchmark: `se-kernels bench` over the SE layers of real networks.

With no --suite it runs the full block suite of the device: `--suite cpu` on a CPU-only
machine (the cpu backend against eager torchvision SE and torch.compile of it, fp32, fwd
and fwd+bwd, ResNet-50 stages and MobileNetV3/EfficientNet-B0 shapes at batch 8),
`--suite blocks` on a GPU. Every other `se-kernels bench` flag is passed on:

    python benchmarks/bench_block.py                          # --suite cpu on CPU
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
