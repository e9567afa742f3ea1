"""What a batch-1 CPU call pays besides the kernel: SqueezeExcitation under no_grad against
eager torchvision.ops.SqueezeExcitation and against the se_forward op called below the
dispatcher (the kernel alone), interleaved in rounds, one thread, the same inputs every call.

    python benchmarks/call_overhead.py
"""

import statistics
import time

import torch
import torchvision

import se_kernels

SHAPES = [(8, 8, 1), (72, 24, 28), (960, 240, 7)]  # C, S, H = W


def medians(calls: dict, iters: int = 300, rounds: int = 21) -> dict:
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter_ns()
            for _ in range(iters):
                call()
            times[name].append((time.perf_counter_ns() - start) / iters / 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    torch.set_num_threads(1)
    below_dispatch = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    op = torch.ops.se_kernels.se_forward.default
    for c, s, h in SHAPES:
        eager = torchvision.ops.SqueezeExcitation(c, s)
        ours = se_kernels.SqueezeExcitation(c, s)
        ours.load_state_dict(eager.state_dict())
        x = torch.randn(1, c, h, h)
        args = (x, ours.fc1.weight.detach().flatten(1), ours.fc1.bias.detach(),
                ours.fc2.weight.detach().flatten(1), ours.fc2.bias.detach(), None, "relu",
                "sigmoid", "avg", "none")
        with torch.no_grad():
            t = medians({"eager": lambda: eager(x), "ours": lambda: ours(x),
                         "kernel": lambda: op.redispatch(below_dispatch, *args)})
        print(f"C={c} S={s} {h}x{h}: eager {t['eager']:.1f} us, SqueezeExcitation "
              f"{t['ours']:.1f} us ({t['eager'] / t['ours']:.2f}x eager), kernel "
              f"{t['kernel']:.1f} us, entry {t['ours'] - t['kernel']:.1f} us")


if __name__ == "__main__":
    main()
