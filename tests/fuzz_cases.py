"""Random SE cases for the fuzz tests (tests/test_fuzz_*.py), which check every backend's
kernels against the float64 oracle (tests/oracle.py) on them.

A case is drawn from its own generator, seeded by the base seed, the backend family and the
case's index: case k is the same whatever the number of cases, and its test id (`case<k>-`
then the shape, dtype, layouts and options) names everything it draws. What it draws:

- the shape: N (0 and 1 included), C (1, primes, up to a few hundred), S (1, primes, S not
  dividing C, S > C), H x W (1x1, single rows and columns, long rows), the biases;
- the dtype (fp16, bf16, fp32, fp64) and the data: Gaussian, or small integers, whose
  repeated maxima exercise max pooling's tie sharing;
- the options, from se_kernels.options: activation, gate, pool, out_activation, and a
  residual or none;
- the layout of x, of the residual and of grad_out, each independently: dense NCHW, dense
  channels-last, or a view (every other column, every other channel, H and W transposed),
  and a storage offset per tensor, so that a tensor starts off a 16-byte boundary;
- for the CUDA kernels on the emulator, instead of the layouts the kernels never see (the
  op copies them): NCHW or channels-last, the buffers that start one element off 16-byte
  alignment, the schedule (SE_KERNELS_CUDA_SCHEDULE), the L2 group budget
  (SE_KERNELS_CUDA_GROUP_BYTES, from one sample per group to the whole batch in one), the
  SM count (a few small ones, and the emulated device's), and the emulator's thread and
  CTA order (its Mode, tools/cuda_emulator/build.py).

The pipelined schedule's lag has no override of its own: se_plan.h derives it, and the
group size, from the budget. A case asks for lag 0, 1 or 2 (or the default budget) and
`cuda_group_budget` finds a budget that gives it from the byte counts in the plan's own
trace, then checks the lag in the trace of that budget (`pipeline_shape`), so the cases
keep covering every lag whatever the plan's byte counts become.

Environment:
  SE_KERNELS_FUZZ_SEED   base seed (default 0, so that CI runs the same cases every time;
                         a soak sets another)
  SE_KERNELS_FUZZ_CASES  cases per fuzz test file (default: each file's CI budget)

To rerun one case: the same seed, and `-k case<k>-`; the case's description (and, for the
emulator, the budget it resolved to) is printed by the test, which pytest shows on failure.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import dataclass

import torch

from se_kernels.options import ACTIVATIONS, GATES, NONE, OUT_ACTIVATIONS, POOLS

from cuda_emulator.build import EMULATED_DEVICE
from helpers import Case, grad_output, make_inputs

SEED_ENV = "SE_KERNELS_FUZZ_SEED"
CASES_ENV = "SE_KERNELS_FUZZ_CASES"
DEFAULT_SEED = 0

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# How x, the residual and grad_out are laid out: dense NCHW, dense channels-last, and views
# the kernels cannot read in place (every other column, every other channel; H and W
# transposed, which is dense but neither of the two layouts).
LAYOUTS = ("nchw", "channels_last", "strided", "channel_slice", "hw_transposed")
KERNEL_LAYOUTS = ("nchw", "channels_last")
PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 97, 131)
TENSORS = ("x", "residual", "grad", "w1", "b1", "w2", "b2")

# The emulator: buffers that can start one element off 16-byte alignment ("all": every
# buffer the kernels get, workspace and saved statistics included).
MISALIGNABLE = ("x", "residual", "out", "grad_out", "dx", "dresidual", "w1", "w2", "b1", "b2")
SCHEDULES = ("pipelined", "grouped")
SM_COUNTS = (1, 2, 7, EMULATED_DEVICE[0])


def base_seed() -> int:
    return int(os.environ.get(SEED_ENV) or DEFAULT_SEED)


def case_count(default: int) -> int:
    return int(os.environ.get(CASES_ENV) or default)


@dataclass(frozen=True)
class FuzzCase:
    index: int
    seed: int                       # the base seed
    case: Case                      # shape, dtype, options; layout: x's
    data_seed: int
    integers: bool = False          # x holds small integers (tied maxima)
    residual_layout: str = "nchw"
    grad_layout: str = "nchw"
    weights_transposed: bool = False  # w1 and w2 as transposed views of [C, S] and [S, C]
    offsets: tuple[tuple[str, int], ...] = ()  # (tensor, storage offset in elements), nonzero
    # Triton: heuristics.DeviceProfile fields of a small-tile profile, or () for the device's
    profile: tuple[tuple[str, object], ...] = ()
    # the emulator
    misalign: tuple[str, ...] = ()
    schedule: str = "pipelined"
    budget: tuple = ("default",)    # ("default",) | ("lag", lag, u, backward) | ("groups", u)
    mode: object = None             # cuda_emulator.build.Mode
    sm_count: int = EMULATED_DEVICE[0]

    def __str__(self) -> str:
        parts = [f"case{self.index}", str(self.case)]
        if self.integers:
            parts.append("integers")
        if self.case.residual and self.residual_layout != self.case.layout:
            parts.append(f"res:{self.residual_layout}")
        if self.grad_layout != "nchw":
            parts.append(f"grad:{self.grad_layout}")
        if self.weights_transposed:
            parts.append("wT")
        if self.offsets:
            parts.append("off:" + ",".join(f"{name}+{k}" for name, k in self.offsets))
        if self.profile:
            parts.append("small-tiles")
        if self.mode is not None:
            kind, *rest = self.budget
            if kind == "lag":
                lag, u, backward = rest
                budget = f"lag{lag}@{u:.3f}{'bwd' if backward else 'fwd'}"
            else:
                budget = kind + "".join(f"@{u:.3f}" for u in rest)
            parts += [self.schedule, f"budget:{budget}", f"sm{self.sm_count}", str(self.mode)]
            if self.misalign:
                parts.append("misalign:" + ",".join(self.misalign))
        return "-".join(parts)

    def describe(self, test_file: str) -> str:
        """The case, its profile, and the command that reruns it alone."""
        profile = f"\nprofile: {dict(self.profile)}" if self.profile else ""
        path = os.path.relpath(test_file)
        return (f"{SEED_ENV}={self.seed} case {self.index}: {self}{profile}\n"
                f"rerun: {SEED_ENV}={self.seed} python -m pytest {path} -k 'case{self.index}-'")


def _rng(seed: int, family: str, index: int) -> random.Random:
    return random.Random(f"se_kernels-fuzz/{seed}/{family}/{index}")


def _draw_shape(r: random.Random, max_elements: int,
                max_weights: int) -> tuple[int, int, int, int, int]:
    while True:
        n = r.choices((0, 1, 2, 3, 4, 5, 7, 9), weights=(1, 10, 7, 5, 3, 2, 2, 1))[0]
        c = r.choice((
            lambda: r.randint(1, 4),
            lambda: r.choice(PRIMES),
            lambda: r.randint(1, 96),
            lambda: r.choice((8, 16, 24, 32, 48, 64)),
            lambda: r.randint(97, 300),
        ))()
        s = r.choice((
            lambda: 1,
            lambda: r.choice([p for p in PRIMES if p <= max(c, 2)]),
            lambda: r.randint(1, max(1, c // 2)),
            lambda: r.randint(1, max(1, c // 4)),
            lambda: c + r.randint(0, 3),  # as many hidden units as channels, or more
        ))()
        h, w = r.choice((
            lambda: (1, 1),
            lambda: (r.randint(1, 8), r.randint(1, 8)),
            lambda: (r.randint(2, 16), r.randint(2, 16)),
            lambda: (1, r.randint(2, 80)),
            lambda: (r.randint(2, 80), 1),
            lambda: r.choice(((7, 7), (14, 14), (28, 28), (32, 40), (3, 3), (5, 5))),
        ))()
        if max(n, 1) * c * h * w <= max_elements and c * s <= max_weights:
            return n, c, h, w, s


def _draw_common(r: random.Random, index: int, seed: int, max_elements: int,
                 layouts: tuple[str, ...], max_weights: int | None = None) -> FuzzCase:
    n, c, h, w, s = _draw_shape(r, max_elements, max_weights or max_elements)
    out_activation = r.choice(OUT_ACTIVATIONS)
    case = Case(n=n, c=c, h=h, w=w, s=s, dtype=r.choice(DTYPES), layout=r.choice(layouts),
                activation=r.choice(ACTIVATIONS), gate=r.choice(GATES), pool=r.choice(POOLS),
                residual=r.random() < 0.5,
                out_activation=None if out_activation == NONE else out_activation,
                bias=r.random() < 0.8)
    return FuzzCase(index=index, seed=seed, case=case, data_seed=r.randrange(2 ** 31),
                    integers=r.random() < 0.15)


def _draw_offsets(r: random.Random, case: Case) -> tuple[tuple[str, int], ...]:
    if r.random() < 0.4:
        return ()
    per_vector = 16 // case.dtype.itemsize  # elements in 16 bytes
    present = {"residual": case.residual, "b1": case.bias, "b2": case.bias}
    offsets = []
    for name in TENSORS:
        if r.random() < 0.6 and present.get(name, True):
            offsets.append((name, r.randrange(1, per_vector)))
    return tuple(offsets)


def draw_case(family: str, index: int, seed: int, max_elements: int,
              max_weights: int | None = None) -> FuzzCase:
    """Case `index` for the cpu or triton backend: layouts, views and storage offsets;
    at most `max_elements` in x and `max_weights` in w1."""
    r = _rng(seed, family, index)
    fc = _draw_common(r, index, seed, max_elements, LAYOUTS, max_weights)
    return FuzzCase(**{**fc.__dict__,
                       "residual_layout": r.choice(LAYOUTS) if r.random() < 0.5 else fc.case.layout,
                       "grad_layout": r.choice(LAYOUTS),
                       "weights_transposed": r.random() < 0.2,
                       "offsets": _draw_offsets(r, fc.case)})


# Triton: small-tile device profiles (heuristics.DeviceProfile), under which even small
# shapes take several channel blocks, loops over H*W, H*W split into pieces, several MLP
# blocks, and map passes that walk backwards. The interpreter's own profile runs one
# program per launch; a GPU's, the shapes here in a few. The MLP blocks stay at 4 or more
# (and the weights small): the interpreter pays ~2.5 ms per program and loop iteration,
# and MLP programs of one output each would cost minutes a case.
SMALL_PROFILE_CHOICES = {
    "sm_count": (1, 2, 3, 4, 8),
    "tile_bytes": (128, 256, 512, 1024, 4096),
    "elems_per_thread": (1, 2, 4, 8),
    "contiguous_max": (2, 4, 8, 16, 64),
    "programs_per_sm": (1, 2, 4),
    "min_tiles_per_piece": (1, 2),
    "mlp_tile": (64, 256, 1024),
    "mlp_block_max": (4, 8, 16),
    "mlp_inner_max": (4, 8, 16, 32),
    "max_warps": (1, 2, 4),
    "min_row_bytes": (16, 128, 1 << 20),
    "partial_share": (1 / 32, 0.25, 1.0),
    "l2_bytes": (1 << 12, 1 << 15, 50 * 2 ** 20),
}


def draw_triton_case(index: int, seed: int, max_elements: int, small_max_elements: int,
                     small_max_weights: int) -> FuzzCase:
    """draw_case for the triton backend, with a small-tile profile for most cases (on fewer
    elements and weights: the interpreter's cost is per program)."""
    r = _rng(seed, "triton-profile", index)
    if r.random() < 0.3:
        return draw_case("triton", index, seed, max_elements)
    fc = draw_case("triton", index, seed, small_max_elements, small_max_weights)
    profile = tuple((name, r.choice(values)) for name, values in SMALL_PROFILE_CHOICES.items())
    return FuzzCase(**{**fc.__dict__, "profile": profile})


def draw_emulator_case(index: int, seed: int, max_elements: int, modes: list) -> FuzzCase:
    """Case `index` for the CUDA kernels on the emulator: schedule, budget, SMs, mode and
    misaligned buffers."""
    r = _rng(seed, "cuda", index)
    fc = _draw_common(r, index, seed, max_elements, KERNEL_LAYOUTS)
    schedule = r.choice(SCHEDULES)
    pick = r.random()
    if pick < 0.2:
        budget = ("default",)
    elif schedule == "pipelined":
        budget = ("lag", r.choice((0, 1, 2)), round(r.random(), 3), r.random() < 0.5)
    elif pick < 0.35:
        budget = ("groups", 0.0)  # one sample per group
    else:
        budget = ("groups", round(r.random(), 3))
    pick = r.random()
    misalign = (() if pick < 0.5 else ("all",) if pick < 0.65
                else tuple(name for name in MISALIGNABLE if r.random() < 0.3))
    return FuzzCase(**{**fc.__dict__, "residual_layout": fc.case.layout,
                       "misalign": misalign, "schedule": schedule,
                       "budget": budget, "mode": r.choice(modes),
                       "sm_count": r.choice(SM_COUNTS)})


def cases(family: str, default_count: int, max_elements: int) -> list[FuzzCase]:
    seed = base_seed()
    return [draw_case(family, i, seed, max_elements) for i in range(case_count(default_count))]


def triton_cases(default_count: int, max_elements: int, small_max_elements: int,
                 small_max_weights: int) -> list[FuzzCase]:
    seed = base_seed()
    return [draw_triton_case(i, seed, max_elements, small_max_elements, small_max_weights)
            for i in range(case_count(default_count))]


def emulator_cases(default_count: int, max_elements: int, modes: list) -> list[FuzzCase]:
    seed = base_seed()
    return [draw_emulator_case(i, seed, max_elements, modes)
            for i in range(case_count(default_count))]


# ---- tensors --------------------------------------------------------------------------

def _nan_base(numel: int, like: torch.Tensor) -> torch.Tensor:
    """Storage for a view, NaN between and around its elements: a kernel that reads outside
    the view brings NaN into its results."""
    return torch.full((numel,), float("nan"), dtype=like.dtype, device=like.device)


def _extent(shape, strides) -> int:
    if any(size == 0 for size in shape):
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(shape, strides))


def relocated(t: torch.Tensor, offset: int) -> torch.Tensor:
    """t's values and strides in fresh NaN storage that starts `offset` elements before
    its first element."""
    base = _nan_base(offset + _extent(t.shape, t.stride()), t)
    view = base.as_strided(t.shape, t.stride(), offset)
    view.copy_(t)
    return view


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A [N, C, H, W] tensor with t's values in `layout` (LAYOUTS)."""
    n, c, h, w = t.shape
    if layout == "nchw":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor
        view = _nan_base(n * c * h * 2 * w, t).view(n, c, h, 2 * w)[..., ::2]
    elif layout == "channel_slice":  # every other channel of a wider tensor
        view = _nan_base(n * 2 * c * h * w, t).view(n, 2 * c, h, w)[:, 1::2]
    elif layout == "hw_transposed":  # dense, W's stride the larger
        view = _nan_base(n * c * h * w, t).view(n, c, w, h).transpose(2, 3)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    view.copy_(t)
    return view


def fuzz_inputs(fc: FuzzCase, device="cpu") -> tuple[dict, torch.Tensor]:
    """The case's inputs and grad_out on `device`, in their layouts and at their offsets."""
    case = fc.case
    inputs = make_inputs(case.with_(layout="nchw"), device, fc.data_seed)
    grad = grad_output(case, device, fc.data_seed + 1)
    if fc.integers:
        gen = torch.Generator().manual_seed(fc.data_seed + 2)
        x = torch.randint(-3, 4, inputs["x"].shape, generator=gen)
        inputs["x"] = x.to(device=device, dtype=case.dtype)
    layouts = {"x": case.layout, "residual": fc.residual_layout, "grad": fc.grad_layout}
    tensors = {**inputs, "grad": grad}
    for name, layout in layouts.items():
        if tensors[name] is not None:
            tensors[name] = laid_out(tensors[name], layout)
    if fc.weights_transposed:
        for name in ("w1", "w2"):
            tensors[name] = tensors[name].t().contiguous().t()
    for name, offset in fc.offsets:
        if tensors[name] is not None:
            tensors[name] = relocated(tensors[name], offset)
    grad = tensors.pop("grad")
    return tensors, grad


# ---- the emulator's L2 group budget ---------------------------------------------------

@contextlib.contextmanager
def environment(**values: str | None):
    """Environment variables set (None: removed) for the duration."""
    def apply(settings: dict[str, str | None]) -> None:
        for key, value in settings.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    saved = {key: os.environ.get(key) for key in values}
    try:
        apply(values)
        yield
    finally:
        apply(saved)


STREAMS = ("x", "residual", "out", "grad_out", "dx", "dresidual")


def _pipeline(trace: list):
    return next(l for l in trace if l.kernel in ("forward_pipeline", "backward_pipeline"))


def pipeline_shape(trace: list) -> tuple[int, int]:
    """(lag, groups) of a pipelined plan, from its trace (se_kernels.plan): every group's
    reduce stage reads its own range of x, and the map stage of group 0 makes its first
    write `lag` steps after group 0's reduce. The lag shows only where there are more
    groups than it: the lag seen is at most groups - 1."""
    launch = _pipeline(trace)
    first_write = "out" if launch.kernel == "forward_pipeline" else "dx"
    x_reads = [a.offset for a in launch.accesses if a.tensor == "x" and not a.write]
    before = next(i for i, a in enumerate(launch.accesses) if a.tensor == first_write and a.write)
    seen = {a.offset for a in launch.accesses[:before] if a.tensor == "x" and not a.write}
    return len(seen) - 1, len(set(x_reads))


def pipeline_window_bytes(trace: list, n: int) -> tuple[int, int]:
    """(bytes per sample of the reduce and map stages, bytes of the weights per step), from
    the trace of a plan with the whole batch in one group."""
    launch = _pipeline(trace)
    streams = sum(a.nbytes for a in launch.accesses if a.tensor in STREAMS)
    weights = sum(a.nbytes for a in launch.accesses if a.tensor == "weights")
    assert streams % n == 0, (streams, n)
    return streams // n, weights


def grouped_groups(trace: list) -> int:
    return sum(l.kernel == "reduce" for l in trace)


def _cuda_plan(fc: FuzzCase, budget: str, l2_bytes: int, backward: bool) -> list:
    from helpers import cuda_launches

    with environment(SE_KERNELS_CUDA_GROUP_BYTES=budget, SE_KERNELS_CUDA_SCHEDULE=fc.schedule):
        return cuda_launches(fc.case, fc.sm_count, l2_bytes, backward)


def cuda_groups(fc: FuzzCase, budget: str, l2_bytes: int) -> str:
    """How the plan splits the case's batch with this budget, forward and backward."""
    if fc.case.n == 0:
        return "no groups (N = 0)"
    parts = []
    for backward in (False, True):
        trace = _cuda_plan(fc, budget, l2_bytes, backward)
        name = "backward" if backward else "forward"
        if fc.schedule == "pipelined":
            sample, weights = pipeline_window_bytes(_cuda_plan(fc, "0", l2_bytes, backward), fc.case.n)
            lag = pipeline_lag(int(budget) if budget else l2_bytes // 2, sample + weights)
            parts.append(f"{name}: lag {lag}, {pipeline_shape(trace)[1]} groups")
        else:
            parts.append(f"{name}: {grouped_groups(trace)} groups")
    return "; ".join(parts)


def pipeline_lag(budget: int, window: int) -> int:
    """The lag se_plan.h gives a budget: the longest (up to 2) whose lag + 1 steps of one
    sample's window fit it."""
    return max(0, min(2, budget // window - 1))


def cuda_group_budget(fc: FuzzCase, l2_bytes: int) -> str:
    """SE_KERNELS_CUDA_GROUP_BYTES for the case's budget request ("" for the default).

    Grouped: a fraction of the smallest budget that holds the batch in one group (0: one
    sample per group). Pipelined: se_plan.h takes the longest lag whose window, (lag + 1)
    steps of one sample's reduce and map bytes plus the weights, fits the budget, then the
    largest group; both byte counts are read from the plan's own trace. A budget in
    [(L + 1) K, (L + 2) K), K = sample + weights, gives lag L (lag 2: up to the budget that
    holds the whole batch in one group), and the trace confirms it where it shows."""
    kind = fc.budget[0]
    if kind == "default" or fc.case.n == 0:
        return ""

    def plan(budget: int, backward: bool) -> list:
        return _cuda_plan(fc, str(budget), l2_bytes, backward)

    if kind == "groups":  # grouped: from one sample per group (budget 1) to one group
        lo, hi = 1, 1
        while grouped_groups(plan(hi, False)) > 1:
            lo, hi = hi + 1, hi * 2
        while lo < hi:  # the smallest budget with one group
            mid = (lo + hi) // 2
            if grouped_groups(plan(mid, False)) == 1:
                hi = mid
            else:
                lo = mid + 1
        return str(max(1, round(fc.budget[1] * lo)))
    _, lag, u, backward = fc.budget
    n = fc.case.n
    sample, weights = pipeline_window_bytes(plan(0, backward), n)  # 0: one group
    window = sample + weights
    lo = (lag + 1) * window if lag else 1
    hi = (lag + 2) * window if lag < 2 else 3 * (n * sample + weights) + 1
    budget = lo + min(math.floor(u * (hi - lo)), hi - lo - 1)
    seen, groups = pipeline_shape(plan(budget, backward))
    assert seen == min(lag, groups - 1), (
        f"budget {budget} was to give lag {lag}; the plan has {groups} groups and lag {seen}")
    return str(budget)
