"""The six products of a staged MLP's training step (both FCs forward, their input and weight
gradients backward) through the fc_layer ops (se_kernels._fc_ops: the extension's CPU
kernels) against the same products in PyTorch (F.linear and matmuls: the BLAS torch is
built with), interleaved in rounds. Before every call the script writes --flush-mib of other
memory, as a training step's passes do between the excitations (0: the weights stay
cached), and times the six products back to back.

    python benchmarks/fc_layer.py                     # batch 8 and 32, C 2048, S 128
    python benchmarks/fc_layer.py --threads 2 --flush-mib 0
"""

import argparse
import statistics
import time

import torch

from se_kernels import _compat, _fc_ops
from se_kernels.bench.host_memory import keep_freed_memory


def six_products(fc: _fc_ops.FcLayer, z, w1, b1, h, w2, b2, dg, da) -> None:
    fc.forward(z, w1, b1)
    fc.forward(h, w2, b2)
    fc.backward(dg, h, w2, True)
    fc.backward(da, z, w1, True)


def median_us(step, flush: torch.Tensor, calls: int) -> float:
    times = []
    for _ in range(calls):
        if flush.numel():
            flush.fill_(1.0)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="8,32", help="comma list of batch sizes")
    parser.add_argument("--channels", type=int, default=2048)
    parser.add_argument("--squeeze", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--flush-mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not _compat.has_dispatch_kernel("se_kernels::fc_layer", "CPU"):
        raise SystemExit("se_kernels._C is not built with the fc_layer ops: nothing to compare")
    print(keep_freed_memory())
    torch.set_num_threads(args.threads)
    flush = torch.empty(args.flush_mib << 18)
    c, s = args.channels, args.squeeze
    print(f"C {c}, S {s}, {args.threads} thread(s), {args.flush_mib} MiB written before each "
          f"call; median us of the six products, {args.rounds} rounds interleaved")
    print(f"{'batch':>5}  {'pytorch':>8}  {'fc_layer':>8}  ratio")
    for n in (int(b) for b in args.batch.split(",")):
        gen = torch.Generator().manual_seed(n)
        shapes = [(n, c), (s, c), (s,), (n, s), (c, s), (c,), (n, c), (n, s)]
        operands = [torch.randn(*shape, generator=gen) for shape in shapes]
        times = {"pytorch": [], "fc_layer": []}
        for _ in range(args.rounds):
            for name, fc in (("pytorch", _fc_ops.TORCH), ("fc_layer", _fc_ops.KERNELS)):
                times[name].append(median_us(lambda fc=fc: six_products(fc, *operands), flush,
                                             calls=40))
        ours, theirs = statistics.median(times["fc_layer"]), statistics.median(times["pytorch"])
        print(f"{n:>5}  {theirs:>8.0f}  {ours:>8.0f}  {theirs / ours:.2f}")


if __name__ == "__main__":
    main()
