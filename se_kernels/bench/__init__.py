"""The engine behind `se-kernels bench` and `se-kernels flops` (needs `se-kernels[bench]`).

  shapes   SE layer shapes of ResNet-50, MobileNetV3-Large, EfficientNet-B0, RegNetY-400MF
           (and timm networks), and the block-tail shapes of SE-ResNet(X)t-50
  peers    the implementations timed: eager torchvision SE, torch.compile of it, our backends
  block    the SE block suite: cases, inputs, checks, floor bytes
  tail     the block-tail suite: BatchNorm -> SE -> + shortcut -> ReLU, eager, SE-only,
           compiled and fused
  timing   CUDA-event and torch.utils.benchmark timers, copy bandwidth, peak memory
  model    SE-ResNet(X)t-50 vs ResNet(X)t-50 training step and inference
  report   terminal table, CSV, markdown, PNG, comparison with an earlier CSV
  flops    the SE paper's FLOP and parameter tables through FlopCounterMode
  runner   the command line of `se-kernels bench`
"""
