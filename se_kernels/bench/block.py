"""The block suite: every peer on the same SE inputs, case by case.

A case is one SE shape of a network at one batch, dtype, layout and mode:
  fwd      inference: the forward under torch.no_grad
  bwd      the backward alone, replayed on a graph kept from one forward (retain_graph)
  fwd+bwd  a training step's share: forward, then the gradients of x and the four weights
Gradients are taken with torch.autograd.grad, so no peer pays for accumulating into .grad.

Each case draws fresh random inputs (never zeros) and, when one set would fit in the cache,
cycles through enough sets to make twice its size. On the CPU each peer also keeps its
results alive for as many calls as there are sets, so that no call writes its output into
the memory the call before it wrote and freed (still in cache, and reused by the
allocator): a network's SE layer never finds its destination warm from its own previous
call, and a back-to-back loop would flatter whichever peer's writes happen to find it
there. (The GPU timer flushes L2 before every call instead.) Every peer's output (and, with a
backward, its gradients) is checked against eager's before it is timed: a peer that
disagrees, or fails, is not timed and gets no speed-up; its row shows the error instead, and
the run ends with a non-zero exit (see runner.main).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import peers as peers_mod
from .shapes import SEShape
from .timing import Step, Timing, cuda_peak_mib, rotation, synchronize, time_steps, time_steps_wall

MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
# Relative error against eager above which a peer's answer is refused: fp32 peers differ
# only in summation order; half-precision eager rounds its pooled vector to the input dtype.
CHECK_TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 2e-2}


@dataclass(frozen=True)
class Case:
    shape: SEShape
    batch: int
    dtype: str
    layout: str
    mode: str
    threads: int | None = None  # CPU threads for torch; None keeps the process's setting

    @property
    def label(self) -> str:
        threads = f" {self.threads}T" if self.threads else ""
        return f"{self.shape.label} N{self.batch} {self.dtype} {self.layout} {self.mode}{threads}"


def floor_bytes(case: Case) -> int:
    """The fewest bytes the case must move (DESIGN.md section 2): the forward reads x and
    writes out once; the backward reads dout and x and writes dx once; the weights are read
    once by each direction and their gradients written once."""
    s = case.shape
    size = DTYPES[case.dtype].itemsize
    activation = case.batch * s.channels * s.height * s.width * size
    weights = (2 * s.channels * s.squeeze + s.channels + s.squeeze) * size
    forward = 2 * activation + weights
    backward = 3 * activation + 2 * weights
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[case.mode]


def make_inputs(case: Case, device: torch.device, *,
                arguments: int = 1) -> list[tuple[torch.Tensor, ...]]:
    """Input sets (*arguments, dout) of x-shaped random tensors: x (and, for a block tail,
    the shortcut), which require gradients outside fwd, and the output's gradient."""
    s = case.shape
    shape = (case.batch, s.channels, s.height, s.width)
    dtype, layout = DTYPES[case.dtype], LAYOUTS[case.layout]
    per_set = math.prod(shape) * dtype.itemsize * (arguments + (case.mode != "fwd"))
    sets = []
    for _ in range(rotation(per_set, device)):
        tensors = [torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout)
                   for _ in range(arguments + 1)]
        *leading, dout = tensors
        sets.append((*(t.requires_grad_(case.mode != "fwd") for t in leading), dout))
    return sets


def _differentiated(arguments) -> list[torch.Tensor]:
    return [a for a in arguments if a.requires_grad]


def make_step(module, params: list[torch.Tensor], inputs, mode: str, *, hold: int = 0) -> Step:
    """A call that runs `mode` once on the next input set, each set being (*arguments,
    dout): module(*arguments), differentiated with respect to the arguments that require a
    gradient, then `params`. fwd returns out; fwd+bwd returns (out, dx..., dparams...); bwd
    returns (dx..., dparams...). With hold > 0 the step keeps the results of its last `hold`
    calls alive (see the module docstring)."""
    order = itertools.cycle(range(len(inputs)))
    if mode == "fwd":
        def run():
            *arguments, _ = inputs[next(order)]
            with torch.no_grad():
                return (module(*arguments),)
    elif mode == "fwd+bwd":
        def run():
            *arguments, dout = inputs[next(order)]
            out = module(*arguments)
            return (out.detach(),
                    *torch.autograd.grad(out, [*_differentiated(arguments), *params], dout))
    elif mode == "bwd":
        outs = [module(*arguments) for *arguments, _ in inputs]

        def run():
            i = next(order)
            *arguments, dout = inputs[i]
            return torch.autograd.grad(outs[i], [*_differentiated(arguments), *params], dout,
                                       retain_graph=True)
    else:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if hold <= 0:
        return run
    held = collections.deque(maxlen=hold)

    def step():
        results = run()
        held.append(results)
        return results
    return step


RESULT_NAMES = {"fwd": ("out",), "fwd+bwd": ("out", "dx", "dw1", "db1", "dw2", "db2"),
                "bwd": ("dx", "dw1", "db1", "dw2", "db2")}


def disagreement(results: tuple, reference: tuple, mode: str, dtype: str,
                 names: tuple[str, ...] | None = None) -> tuple[float, str | None]:
    """(worst relative error ||a - b|| / ||b|| in fp64 over the returned tensors, None) when
    every tensor agrees with eager's within CHECK_TOLERANCE; else (error, what is wrong).
    names: the returned tensors' names (default: an SE block's, RESULT_NAMES)."""
    if len(results) != len(reference):
        return math.inf, f"returned {len(results)} tensors, eager {len(reference)}"
    names = names or RESULT_NAMES[mode]
    if len(names) != len(results):  # a staged form's module: its own parameters, by position
        lead = [n for n in names if not n.startswith(("dw", "db"))]
        names = [*lead, *(f"d(parameter {i})" for i in range(len(results) - len(lead)))]
    # A gradient that is zero in exact arithmetic (a bias before a batch norm) is rounding
    # noise in both: its error counts against a thousandth of the largest tensor's norm.
    floor = 1e-3 * max(b.double().norm().item() for b in reference)
    worst, problem = 0.0, None
    for name, a, b in zip(names, results, reference):
        if a is None or tuple(a.shape) != tuple(b.shape):
            return math.inf, f"{name}: shape {None if a is None else list(a.shape)}, eager {list(b.shape)}"
        scale = max(b.double().norm().item(), floor, 1e-30)
        error = ((a.double() - b.double()).norm() / scale).item()
        if not math.isfinite(error):
            error = math.inf
        if error > CHECK_TOLERANCE[dtype] and problem is None:
            problem = f"{name} differs from eager by {error:.2g} (relative; tolerance {CHECK_TOLERANCE[dtype]:g})"
        worst = max(worst, error)
    return worst, problem


def runs_backend(name: str, x: torch.Tensor, eager, mode: str) -> str:
    """The se_kernels backend a peer runs in `mode` (dispatch's choice for auto, which may
    differ between inference and training); '' for baselines."""
    if name in peers_mod.BASELINES:
        return ""
    if name == peers_mod.AUTO:
        with torch.set_grad_enabled(mode != "fwd"):
            return peers_mod.auto_choice(x, eager)
    return name


def begin_case(case: Case, device: torch.device) -> None:
    """What every case starts from: no compiled code, its thread count, the same seed."""
    torch.compiler.reset()  # fresh compiled code per case, never a dynamic-shape recompile
    if case.threads is not None and device.type == "cpu":
        torch.set_num_threads(case.threads)
    torch.manual_seed(0)


@dataclass
class Checked:
    """A case's peers after their first call: the steps to time (those whose result agreed
    with eager's), each peer's error against eager's result, and why a peer is not timed."""

    steps: dict[str, Step]
    errors: dict[str, float]
    failures: dict[str, str]
    compile_s: dict[str, float]
    peaks: dict[str, float]


PeerBuilder = Callable[[], tuple[torch.nn.Module, list[torch.Tensor]]]


def check_peers(builders: dict[str, PeerBuilder], inputs, case: Case, device: torch.device, *,
                result_names: tuple[str, ...] | None = None) -> Checked:
    """Builds each peer (its module and the parameters to differentiate), makes its step and
    calls it once. The first peer, eager, gives the reference every other result is checked
    against; a peer that raises or disagrees is not timed (eager raising ends the run)."""
    checked = Checked({}, {}, {}, {}, {})
    reference = None
    for name, build in builders.items():
        try:
            module, params = build()
            context = (peers_mod.replayable_backward(name) if case.mode == "bwd"
                       else contextlib.nullcontext())
            with context:
                synchronize(device)
                start = time.perf_counter()
                step = make_step(module, params, inputs, case.mode,
                                 hold=len(inputs) if device.type == "cpu" else 0)
                first = step()
                synchronize(device)
                if name in peers_mod.COMPILE_MODES:
                    checked.compile_s[name] = time.perf_counter() - start
        except Exception as error:  # noqa: BLE001 - reported in the row, and fails the run
            if name == peers_mod.EAGER:
                raise
            checked.errors[name] = math.nan
            checked.failures[name] = f"ERROR {type(error).__name__}: {error}"
            continue
        if reference is None:
            reference = first
        checked.errors[name], problem = disagreement(first, reference, case.mode, case.dtype,
                                                     result_names)
        del first
        if problem is not None:
            checked.failures[name] = f"MISMATCH {problem}"
            continue  # a wrong answer is not timed
        if device.type == "cuda":
            checked.peaks[name] = cuda_peak_mib(step, device)
        checked.steps[name] = step
    return checked


def timed_rows(case: Case, names: list[str], checked: Checked, device: torch.device, *,
               quick: bool, floor: int, copy_gbps: float, input_sets: int) -> list[dict]:
    """Times the checked steps, interleaved, and gives one row per peer in `names` that was
    timed or refused: the case's settings and what was measured (the caller adds what the
    case is of)."""
    timings = time_steps(checked.steps, device, quick=quick)
    walls = time_steps_wall(checked.steps, device, quick=quick)
    eager_us = timings[peers_mod.EAGER].median_us
    eager_wall_us = walls.get(peers_mod.EAGER, math.nan)
    compile_us = timings["compile"].median_us if "compile" in timings else math.nan
    rows = []
    for name in [n for n in names if n in timings or n in checked.failures]:
        timing = timings.get(name, Timing(math.nan, math.nan, math.nan, 0))
        gbps = floor / (timing.median_us * 1e-6) / 1e9
        wall_us = walls.get(name, math.nan)
        rows.append({
            "batch": case.batch, "dtype": case.dtype, "layout": case.layout, "mode": case.mode,
            "threads": torch.get_num_threads(), "peer": name,
            "median_us": timing.median_us, "p20_us": timing.p20_us, "p80_us": timing.p80_us,
            "samples": timing.samples, "floor_bytes": floor, "gbps": gbps,
            "pct_copy_bw": 100 * gbps / copy_gbps if copy_gbps > 0 else math.nan,
            "x_eager": eager_us / timing.median_us, "x_compile": compile_us / timing.median_us,
            "wall_us": wall_us, "x_eager_wall": eager_wall_us / wall_us,
            "peak_mib": checked.peaks.get(name, math.nan),
            "compile_s": checked.compile_s.get(name, math.nan),
            "max_rel_err": checked.errors[name], "check": checked.failures.get(name, "ok"),
            "input_sets": input_sets,
        })
    return rows


def shape_fields(shape: SEShape) -> dict:
    """A row's columns that say which layer it times."""
    return {"network": shape.network, "layer": shape.layer, "count": shape.count,
            "channels": shape.channels, "squeeze": shape.squeeze, "height": shape.height,
            "width": shape.width, "activation": shape.activation, "gate": shape.gate}


def run_case(case: Case, requested: list[str], device: torch.device, *, quick: bool,
             copy_gbps: float, refused: dict[str, set[str]]) -> list[dict]:
    begin_case(case, device)
    # Inference in eval mode, training in train mode: a batch norm inside an SE (RexNet)
    # uses its running statistics, or the batch's.
    eager = peers_mod.eager_module(case.shape, device, DTYPES[case.dtype]).train(case.mode != "fwd")
    inputs = make_inputs(case, device)
    x0 = inputs[0][0]
    if requested:
        names = [peers_mod.EAGER] + [n for n in requested if n != peers_mod.EAGER]
    else:
        names = [*peers_mod.BASELINES, *peers_mod.default_backends(x0, eager)]

    builders: dict[str, PeerBuilder] = {}
    for name in names:
        if name not in peers_mod.BASELINES:
            reasons = peers_mod.backend_refusals(name, x0, eager)
            if reasons:
                refused.setdefault(name, set()).update(reasons)
                continue
        builders[name] = functools.partial(_peer, name, eager, case.shape)
    checked = check_peers(builders, inputs, case, device)
    rows = timed_rows(case, names, checked, device, quick=quick, floor=floor_bytes(case),
                      copy_gbps=copy_gbps, input_sets=len(inputs))
    for row in rows:
        row.update(shape_fields(case.shape), runs=runs_backend(row["peer"], x0, eager, case.mode))
    return rows


def _peer(name: str, eager, shape: SEShape) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """A peer's module and the parameters its gradients are taken of: eager's own for the
    baselines (the compiled module shares them), the converted module's for ours."""
    module = peers_mod.build_peer(name, eager, shape)
    return module, list(eager.parameters() if name in peers_mod.BASELINES else module.parameters())


def cases(shapes: list[SEShape], batches: list[int], dtypes: list[str], layouts: list[str],
          modes: list[str], threads: list[int | None] = (None,)) -> list[Case]:
    """Every combination, thread count outermost (a run changes it as seldom as it can),
    except training a batch norm on one value a channel: a BatchNorm inside the SE (a "bn+"
    form) refuses batch 1 in training, as nn.BatchNorm2d does."""
    return [Case(shape, batch, dtype, layout, mode, n)
            for n, shape, batch, dtype, layout, mode
            in itertools.product(threads, shapes, batches, dtypes, layouts, modes)
            if not (batch == 1 and mode != "fwd" and shape.activation.startswith("bn+"))]


def run(all_cases: list[Case], requested: list[str], device: torch.device, *, quick: bool,
        copy_gbps: float, on_rows: Callable[[list[dict]], None] | None = None,
        case_runner=None, desc: str = "SE blocks") -> tuple[list[dict], dict[str, set[str]]]:
    """Rows of every case (one per peer), and the reasons backends refused. on_rows, if
    given, gets each case's rows as soon as the case is done (runner.main writes them).
    case_runner: what runs one case (default run_case; the tail suite passes its own)."""
    from tqdm import tqdm

    rows: list[dict] = []
    refused: dict[str, set[str]] = {}
    threads = torch.get_num_threads()
    run_one = case_runner or run_case
    try:
        with tqdm(all_cases, desc=desc, unit="case", file=sys.stderr,
                  dynamic_ncols=True) as bar:
            for case in bar:
                bar.set_postfix_str(case.label, refresh=True)
                done = run_one(case, requested, device, quick=quick, copy_gbps=copy_gbps,
                               refused=refused)
                rows.extend(done)
                if on_rows is not None:
                    on_rows(done)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        torch.set_num_threads(threads)
    return rows, refused
