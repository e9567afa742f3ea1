"""Timers: CUDA events on the GPU, torch.utils.benchmark on the CPU, and the copy bandwidth
that the measured bandwidths are compared with.

GPU: triton.testing.do_bench where Triton is installed (it records a pair of CUDA events
around every call and writes a 256 MB buffer between calls, so no call finds its inputs in
L2), else the same loop written here. CPU: torch.utils.benchmark Timers with all of torch's
threads, in blocks of calls as blocked_autorange times them, the peers interleaved in rounds
(each round in a rotated order), so that a noisy, shared machine slows every peer alike and
their ratios stay meaningful.

Every timer returns the median and the 20th/80th percentiles of the per-call times.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

Step = Callable[[], object]


@dataclass(frozen=True)
class Timing:
    median_us: float
    p20_us: float
    p80_us: float
    samples: int

    @classmethod
    def from_us(cls, times_us: list[float]) -> Timing:
        return cls(percentile(times_us, 50), percentile(times_us, 20), percentile(times_us, 80),
                   len(times_us))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation between the two nearest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_bytes(device: torch.device) -> int:
    """The last-level cache a repeated call could keep its inputs in: L2 on a GPU, the
    largest CPU cache listed in sysfs (32 MiB when it is not listed)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return max(sizes, default=32 * 2**20)


def rotation(bytes_per_set: int, device: torch.device, limit: int = 32) -> int:
    """How many input sets to cycle through so that together they are twice the cache."""
    return max(1, min(limit, math.ceil(2 * cache_bytes(device) / max(bytes_per_set, 1))))


# -- CPU ------------------------------------------------------------------------------------

def time_cpu_interleaved(steps: dict[str, Step], *, rounds: int,
                         min_run_time: float, block_s: float = 2e-3) -> dict[str, Timing]:
    """torch.utils.benchmark Timers in blocks of calls, each block >= block_s long (so the
    timer's own overhead vanishes), until a round has min_run_time per peer. This is
    blocked_autorange, with its block size measured once per peer instead of every round."""
    from torch.utils import benchmark

    threads = torch.get_num_threads()
    names = list(steps)
    timers = {name: benchmark.Timer(stmt="step()", globals={"step": steps[name]},
                                    num_threads=threads) for name in names}
    number = {name: max(1, int(block_s / max(timers[name].timeit(1).median, 1e-9)))
              for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            spent = 0.0
            while spent < min_run_time:
                per_call = timers[name].timeit(number[name]).median
                times[name].append(per_call * 1e6)
                spent += per_call * number[name]
    return {name: Timing.from_us(times[name]) for name in names}


def time_cpu_calls_interleaved(steps: dict[str, Step], *, rounds: int) -> dict[str, Timing]:
    """For calls of a second or more (a model's training step): every round calls each
    step once, in a rotated order, timed by the host clock."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            steps[name]()
            times[name].append((time.perf_counter() - start) * 1e6)
    return {name: Timing.from_us(times[name]) for name in names}


# -- GPU ------------------------------------------------------------------------------------

def time_cuda(step: Step, *, warmup_ms: float, rep_ms: float) -> Timing:
    try:
        from triton.testing import do_bench
    except ImportError:
        return _time_cuda_events(step, warmup_ms=warmup_ms, rep_ms=rep_ms)
    median, p20, p80 = do_bench(step, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    reps = max(1, int(rep_ms / max(median, 1e-6)))
    return Timing(median * 1e3, p20 * 1e3, p80 * 1e3, reps)


def _time_cuda_events(step: Step, *, warmup_ms: float, rep_ms: float) -> Timing:
    """do_bench's method without Triton: estimate the call's time, warm up, then time each
    call between its own pair of events with L2 overwritten before it."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        step()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        step()
    reps = max(1, int(rep_ms / estimate_ms))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush.zero_()
        starts[i].record()
        step()
        ends[i].record()
    torch.cuda.synchronize()
    return Timing.from_us([s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)])


def time_cuda_wall(step: Step, *, reps: int) -> float:
    """Microseconds per call of `reps` calls issued back to back, by the host clock, with one
    synchronize at the end: what a loop of small calls sees when launching them costs more
    than running them (the per-call host overhead), which CUDA events around each call,
    behind a cache flush that keeps the GPU busy, do not show."""
    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e6


def cuda_peak_mib(step: Step, device: torch.device) -> float:
    """Memory one call allocates at its peak beyond what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


# -- both -----------------------------------------------------------------------------------

def time_steps(steps: dict[str, Step], device: torch.device, *, quick: bool) -> dict[str, Timing]:
    if device.type == "cuda":
        warmup_ms, rep_ms = (10, 40) if quick else (25, 200)
        return {name: time_cuda(step, warmup_ms=warmup_ms, rep_ms=rep_ms)
                for name, step in steps.items()}
    rounds, min_run_time = (3, 0.05) if quick else (5, 0.2)
    return time_cpu_interleaved(steps, rounds=rounds, min_run_time=min_run_time)


def time_steps_wall(steps: dict[str, Step], device: torch.device, *, quick: bool) -> dict[str, float]:
    """On the GPU, each step's back-to-back wall time per call (time_cuda_wall), the median
    of a few interleaved rounds; on the CPU nothing (its timers already are wall clocks)."""
    if device.type != "cuda":
        return {}
    rounds, reps = (3, 20) if quick else (5, 50)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        names = list(steps)
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(time_cuda_wall(steps[name], reps=reps))
    return {name: percentile(values, 50) for name, values in times.items()}


def copy_bandwidth_gbps(device: torch.device, *, quick: bool) -> float:
    """Device-memory copy bandwidth: bytes read plus bytes written by a copy of a tensor
    much larger than the cache (random bytes, not zeros) into a preallocated one, over the
    median time. (A clone would also time the allocator: on the CPU, a fresh large block
    faults in every page.)"""
    size = 2**30 if device.type == "cuda" else min(max(4 * cache_bytes(device), 2**26), 2**30)
    chunk = torch.randint(0, 256, (2**20,), dtype=torch.uint8, device=device)
    source = chunk.repeat(size // chunk.numel())
    target = torch.empty_like(source)

    def copy():
        target.copy_(source)

    if device.type == "cuda":
        timing = time_cuda(copy, warmup_ms=25, rep_ms=100 if quick else 400)
    else:
        timing = time_cpu_interleaved({"copy": copy}, rounds=1,
                                      min_run_time=0.2 if quick else 1.0)["copy"]
    return 2 * size / (timing.median_us * 1e-6) / 1e9


def wall_time(step: Step, device: torch.device) -> float:
    """Seconds one call takes, start to finish (used for compile times)."""
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start
