"""The block suite: every peer on the same SE inputs, case by case.

A case is one SE shape of a network at one batch, dtype, layout and mode:
  fwd      inference: the forward under torch.no_grad
  bwd      the backward alone, replayed on a graph kept from one forward (retain_graph)
  fwd+bwd  a training step's share: forward, then the gradients of x and the four weights
Gradients are taken with torch.autograd.grad, so no peer pays for accumulating into .grad.

Each case draws fresh random inputs (never zeros) and, when one set would fit in the cache,
cycles through enough sets to make twice its size. Every peer is checked against eager
before it is timed; the error is reported next to its time.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
import time
from dataclasses import dataclass

import torch

from . import peers as peers_mod
from .shapes import SEShape
from .timing import Step, cuda_peak_mib, rotation, synchronize, time_steps

MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
# Relative error against eager above which a row is flagged: fp32 peers differ only in
# summation order; half-precision eager rounds its pooled vector to the input dtype.
CHECK_TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 2e-2}


@dataclass(frozen=True)
class Case:
    shape: SEShape
    batch: int
    dtype: str
    layout: str
    mode: str

    @property
    def label(self) -> str:
        return f"{self.shape.label} N{self.batch} {self.dtype} {self.layout} {self.mode}"


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


def make_inputs(case: Case, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    s = case.shape
    shape = (case.batch, s.channels, s.height, s.width)
    dtype, layout = DTYPES[case.dtype], LAYOUTS[case.layout]
    per_set = math.prod(shape) * dtype.itemsize * (1 if case.mode == "fwd" else 2)
    sets = []
    for _ in range(rotation(per_set, device)):
        x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout)
        dout = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout)
        sets.append((x.requires_grad_(case.mode != "fwd"), dout))
    return sets


def make_step(module, params: list[torch.Tensor], inputs, mode: str) -> Step:
    """A call that runs `mode` once on the next input set. fwd returns out; fwd+bwd returns
    (out, dx, dparams...); bwd returns (dx, dparams...)."""
    order = itertools.cycle(range(len(inputs)))
    if mode == "fwd":
        def step():
            x, _ = inputs[next(order)]
            with torch.no_grad():
                return (module(x),)
    elif mode == "fwd+bwd":
        def step():
            x, dout = inputs[next(order)]
            out = module(x)
            return (out.detach(), *torch.autograd.grad(out, [x, *params], dout))
    elif mode == "bwd":
        outs = [module(x) for x, _ in inputs]

        def step():
            i = next(order)
            x, dout = inputs[i]
            return torch.autograd.grad(outs[i], [x, *params], dout, retain_graph=True)
    else:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return step


def relative_error(results: tuple, reference: tuple) -> float:
    """max over the returned tensors of ||a - b|| / ||b||, in fp64."""
    worst = 0.0
    for a, b in zip(results, reference):
        a, b = a.double(), b.double()
        worst = max(worst, ((a - b).norm() / b.norm().clamp_min(1e-30)).item())
    return worst


def run_case(case: Case, requested: list[str], device: torch.device, *, quick: bool,
             copy_gbps: float, refused: dict[str, set[str]]) -> list[dict]:
    torch._dynamo.reset()  # fresh compiled code per case, never a dynamic-shape recompile
    torch.manual_seed(0)
    eager = peers_mod.eager_module(case.shape, device, DTYPES[case.dtype])
    inputs = make_inputs(case, device)
    x0 = inputs[0][0]
    if requested:
        names = [peers_mod.EAGER] + [n for n in requested if n != peers_mod.EAGER]
    else:
        names = [*peers_mod.BASELINES, *peers_mod.default_backends(x0, eager)]

    steps: dict[str, Step] = {}
    compile_s: dict[str, float] = {}
    errors: dict[str, float] = {}
    peaks: dict[str, float] = {}
    reference = None
    for name in names:
        if name not in peers_mod.BASELINES:
            reasons = peers_mod.backend_refusals(name, x0, eager)
            if reasons:
                refused.setdefault(name, set()).update(reasons)
                continue
        module = peers_mod.build_peer(name, eager, case.shape)
        params = list(eager.parameters() if name in peers_mod.BASELINES else module.parameters())
        context = (peers_mod.replayable_backward(name) if case.mode == "bwd"
                   else contextlib.nullcontext())
        with context:
            synchronize(device)
            start = time.perf_counter()
            step = make_step(module, params, inputs, case.mode)
            first = step()
            synchronize(device)
            if name in peers_mod.COMPILE_MODES:
                compile_s[name] = time.perf_counter() - start
        if reference is None:
            reference = first
        errors[name] = relative_error(first, reference)
        del first
        if device.type == "cuda":
            peaks[name] = cuda_peak_mib(step, device)
        steps[name] = step

    timings = time_steps(steps, device, quick=quick)
    floor = floor_bytes(case)
    eager_us = timings[peers_mod.EAGER].median_us
    compile_us = timings["compile"].median_us if "compile" in timings else math.nan
    rows = []
    s = case.shape
    for name, timing in timings.items():
        gbps = floor / (timing.median_us * 1e-6) / 1e9
        rows.append({
            "network": s.network, "layer": s.layer, "count": s.count, "batch": case.batch,
            "channels": s.channels, "squeeze": s.squeeze, "height": s.height, "width": s.width,
            "activation": s.activation, "gate": s.gate, "dtype": case.dtype,
            "layout": case.layout, "mode": case.mode, "peer": name,
            "median_us": timing.median_us, "p20_us": timing.p20_us, "p80_us": timing.p80_us,
            "samples": timing.samples, "floor_bytes": floor, "gbps": gbps,
            "pct_copy_bw": 100 * gbps / copy_gbps if copy_gbps > 0 else math.nan,
            "x_eager": eager_us / timing.median_us, "x_compile": compile_us / timing.median_us,
            "peak_mib": peaks.get(name, math.nan), "compile_s": compile_s.get(name, math.nan),
            "max_rel_err": errors[name],
            "check": "ok" if errors[name] <= CHECK_TOLERANCE[case.dtype] else "MISMATCH",
            "input_sets": len(inputs),
        })
    return rows


def cases(shapes: list[SEShape], batches: list[int], dtypes: list[str], layouts: list[str],
          modes: list[str]) -> list[Case]:
    return [Case(*combo) for combo in itertools.product(shapes, batches, dtypes, layouts, modes)]


def run(all_cases: list[Case], requested: list[str], device: torch.device, *, quick: bool,
        copy_gbps: float) -> tuple[list[dict], dict[str, set[str]]]:
    """Rows of every case (one per peer), and the reasons backends refused."""
    from tqdm import tqdm

    rows: list[dict] = []
    refused: dict[str, set[str]] = {}
    with tqdm(all_cases, desc="SE blocks", unit="case", file=sys.stderr, dynamic_ncols=True) as bar:
        for case in bar:
            bar.set_postfix_str(case.label, refresh=True)
            rows.extend(run_case(case, requested, device, quick=quick, copy_gbps=copy_gbps,
                                 refused=refused))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows, refused
