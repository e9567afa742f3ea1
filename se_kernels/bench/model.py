"""The model suite: what SE costs in a whole network, plain vs SE, eager SE vs ours.

Pairs (each SE model is compared with its plain model, of its own family):
  torchvision resnet50          vs  se_kernels.models.se_resnet50(reduction=16), once per
                                    se_kernels backend usable here ("torch" runs the SE as
                                    plain PyTorch ops, i.e. eager)
  timm resnet50                 vs  timm seresnet50, and
  timm resnext50_32x4d          vs  timm seresnext50_32x4d, each three ways:
                                      <model>                     as timm builds it (eager)
                                      <model>+convert-se-only     convert_se_modules(
                                                                  fuse_blocks=False): the SE
                                                                  modules on the fused op
                                      <model>+convert             convert_se_modules: the
                                                                  block tails fused as well
                                    (backend "auto" for both conversions)

--families and --models (names or shell-style patterns of the model column) pick a subset;
an SE model always brings its plain model along, which its ratio needs.

Tasks: a training step (forward, cross-entropy, backward, SGD with momentum) and inference
(forward under torch.inference_mode). On a GPU both run under autocast bf16 with
channels_last weights and images; on the CPU in fp32, NCHW. Reported: time per step, images
per second, and SE/plain two ways: time ratio (the paper's 209 ms / 190 ms = 1.10 for a
forward+backward of SE-ResNet-50 vs ResNet-50) and throughput ratio (timm's benchmark:
0.864 eager, 0.779 compiled for seresnet50 vs resnet50 inference).
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .timing import Timing, cuda_peak_mib, synchronize, time_cpu_calls_interleaved, time_cuda

PAPER_TRAIN_TIME_RATIO = 209 / 190
TIMM_THROUGHPUT_RATIO = {"eager": 0.864, "compiled": 0.779}
TASKS = ("train", "infer")
FAMILIES = ("torchvision", "timm")
# timm's (plain, SE) pairs.
TIMM_PAIRS = (("resnet50", "seresnet50"), ("resnext50_32x4d", "seresnext50_32x4d"))
MODEL_COLUMNS = [
    "family", "model", "se", "backend", "compiled", "task", "batch", "image", "precision",
    "layout", "median_ms", "p20_ms", "p80_ms", "images_per_s", "time_vs_plain",
    "throughput_vs_plain", "reference_ratio", "peak_mib", "compile_s",
]


@dataclass(frozen=True)
class Variant:
    family: str  # "torchvision" | "timm"
    model: str
    se: bool
    backend: str  # se_kernels backend of its SE modules, "" for none/eager
    build: Callable[[], nn.Module]
    plain: str = ""  # an SE model's plain model, of the same family, that its ratio is to

    @property
    def label(self) -> str:
        return f"{self.family} {self.model}" + (f" [{self.backend}]" if self.backend else "")


def _usable_backends(device: torch.device) -> list[str]:
    from se_kernels import dispatch
    from se_kernels.call import make_call

    x = torch.randn(1, 64, 2, 2, device=device)
    call = make_call(x, torch.randn(4, 64, device=device), None, torch.randn(64, 4, device=device), None)
    explained = dispatch.explain(call)
    return [name for name in dispatch.preference(call) if not explained.get(name, ["absent"])]


def variants(device: torch.device, backends: list[str] | None) -> list[Variant]:
    import torchvision

    from se_kernels.models import se_resnet50

    chosen = backends or _usable_backends(device)
    found = [Variant("torchvision", "resnet50", False, "", torchvision.models.resnet50)]
    for name in chosen:
        found.append(Variant("torchvision", "se_resnet50", True, name,
                             lambda name=name: se_resnet50(reduction=16, backend=name),
                             plain="resnet50"))
    try:
        import timm  # noqa: F401 - the timm pairs' builders import it when called
    except ImportError:
        print("model suite: timm is not installed, skipping the timm pairs "
              "(pip install 'se-kernels[bench]')", file=sys.stderr)
        return found
    for plain, se in TIMM_PAIRS:
        found += [Variant("timm", plain, False, "", functools.partial(_timm_model, plain)),
                  Variant("timm", se, True, "", functools.partial(_timm_model, se), plain=plain),
                  Variant("timm", f"{se}+convert-se-only", True, "auto",
                          functools.partial(_timm_model, se, convert=True, fuse_blocks=False),
                          plain=plain),
                  Variant("timm", f"{se}+convert", True, "auto",
                          functools.partial(_timm_model, se, convert=True), plain=plain)]
    return found


def _timm_model(name: str, *, convert: bool = False, fuse_blocks: bool = True) -> nn.Module:
    """timm's `name`, as timm builds it or converted by convert_se_modules (backend auto)."""
    import timm

    from se_kernels.convert import convert_se_modules

    model = timm.create_model(name, pretrained=False)
    return convert_se_modules(model, backend="auto", fuse_blocks=fuse_blocks) if convert else model


def select(found: list[Variant], families: list[str] | None,
           models: list[str] | None) -> list[Variant]:
    """The variants of `families` whose model name matches one of `models` (names or
    shell-style patterns; None: any), with the plain model of every SE model chosen, in
    `found`'s order."""
    wanted = {v.label for v in found
              if (families is None or v.family in families)
              and (models is None or any(fnmatchcase(v.model, p) for p in models))}
    plains = {(v.family, v.plain) for v in found if v.label in wanted and v.se}
    return [v for v in found if v.label in wanted or (not v.se and (v.family, v.model) in plains)]


def _precision(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16), "amp-bf16", torch.channels_last
    return contextlib.nullcontext(), "fp32", torch.contiguous_format


def make_step(model: nn.Module, task: str, device: torch.device, batch: int, image: int):
    """One training step or one inference forward of `model` (already on `device`)."""
    autocast, _, layout = _precision(device)
    images = torch.randn(batch, 3, image, image, device=device).contiguous(memory_format=layout)
    if task == "infer":
        model.eval()

        def step():
            with torch.inference_mode(), autocast:
                return model(images)
        return step
    labels = torch.randint(0, 1000, (batch,), device=device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        with autocast:
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def run(device: torch.device, *, batches: list[int], images: list[int], tasks: list[str],
        quick: bool, backends: list[str] | None, compile_models: bool,
        families: list[str] | None = None, models: list[str] | None = None,
        on_rows: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Rows of every variant chosen (select), for each batch, image size, task and
    compiled flag; on_rows, if given, gets each such job's rows as soon as they are timed
    (runner.main writes them)."""
    from tqdm import tqdm

    _, precision, layout = _precision(device)
    chosen = select(variants(device, backends), families, models)
    compiled_flags = [False, True] if compile_models else [False]
    rows = []
    jobs = [(batch, image, task, c) for batch in batches for image in images for task in tasks
            for c in compiled_flags]
    with tqdm(total=len(jobs) * len(chosen), desc="models", unit="model", file=sys.stderr,
              dynamic_ncols=True) as bar:
        for batch, image, task, compiled in jobs:
            steps, compile_s, peaks = {}, {}, {}
            for variant in chosen:
                bar.set_postfix_str(f"{task} N{batch} {image}px {variant.label}"
                                    f"{' compiled' if compiled else ''}")
                torch.manual_seed(0)
                model = variant.build().to(device=device, memory_format=layout)
                if compiled:
                    model = torch.compile(model)
                step = make_step(model, task, device, batch, image)
                synchronize(device)
                start = time.perf_counter()
                step()  # warm-up (and compilation)
                synchronize(device)
                compile_s[variant] = time.perf_counter() - start if compiled else math.nan
                if device.type == "cuda":
                    peaks[variant] = cuda_peak_mib(step, device)
                steps[variant] = step
                bar.update()
            timings = _time(steps, device, quick)
            done = _rows(chosen, timings, task, compiled, batch, image, precision, layout,
                         compile_s, peaks)
            rows += done
            if on_rows is not None:
                on_rows(done)
            del steps
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _time(steps: dict, device: torch.device, quick: bool) -> dict:
    if device.type == "cuda":
        rep_ms = 500 if quick else 2000
        return {v: time_cuda(s, warmup_ms=100, rep_ms=rep_ms) for v, s in steps.items()}
    # A CPU step takes ~0.1-10 s: single calls, the variants interleaved per round.
    by_name = time_cpu_calls_interleaved({v.label: s for v, s in steps.items()},
                                         rounds=3 if quick else 7)
    return {v: by_name[v.label] for v in steps}


def _rows(chosen, timings: dict[Variant, Timing], task, compiled, batch, image, precision,
          layout, compile_s, peaks) -> list[dict]:
    plain = {(v.family, v.model): timings[v].median_us for v in chosen if not v.se}
    if task == "train":
        reference = PAPER_TRAIN_TIME_RATIO
    else:
        reference = TIMM_THROUGHPUT_RATIO["compiled" if compiled else "eager"]
    rows = []
    for v in chosen:
        t = timings[v]
        base = plain.get((v.family, v.plain), math.nan)
        rows.append({
            "family": v.family, "model": v.model, "se": v.se, "backend": v.backend,
            "compiled": compiled, "task": task, "batch": batch, "image": image,
            "precision": precision,
            "layout": "channels_last" if layout == torch.channels_last else "nchw",
            "median_ms": t.median_us / 1e3, "p20_ms": t.p20_us / 1e3, "p80_ms": t.p80_us / 1e3,
            "images_per_s": batch / (t.median_us * 1e-6),
            "time_vs_plain": t.median_us / base if v.se else math.nan,
            "throughput_vs_plain": base / t.median_us if v.se else math.nan,
            "reference_ratio": reference if v.se else math.nan,
            "peak_mib": peaks.get(v, math.nan), "compile_s": compile_s.get(v, math.nan),
        })
    return rows
