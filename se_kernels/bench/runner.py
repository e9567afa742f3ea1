"""se-kernels bench: turns the command line into suites, runs them, writes the results."""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import report
from .host_memory import keep_freed_memory
from .shapes import (IMAGE_SIZE, NETWORKS, act_tail_shapes, evenly_spaced, network_shapes,
                     tail_shapes)

SUITES = {
    **{name: (name,) for name in NETWORKS},
    # The CPU backends against eager and compiled torchvision SE, every network.
    "cpu": NETWORKS,
    "blocks": NETWORKS,
    "tail": (),
    "model": (),
    "all": NETWORKS,
}
WITH_MODEL = ("model", "all")
WITH_TAIL = ("tail",)
QUICK_SHAPES_PER_NETWORK = 2  # the first and the last distinct SE shape of each network

# Per device: (batches, dtypes, layouts, modes, torch threads) for a full suite, then for
# --quick. CPU: batch 1 (inference), 8 and 32, on one and two threads; threads None keeps
# torch's own choice.
DEFAULTS = {
    "cpu": ((1, 8, 32), ("fp32",), ("nchw",), ("fwd", "fwd+bwd"), (1, 2)),
    "cuda": ((1, 32, 256), ("bf16",), ("channels_last",), ("fwd", "bwd", "fwd+bwd"), (None,)),
}
QUICK_DEFAULTS = {
    "cpu": ((8,), ("fp32",), ("nchw",), ("fwd", "fwd+bwd"), (None,)),
    "cuda": ((256,), ("bf16",), ("channels_last",), ("fwd", "fwd+bwd"), (None,)),
}
# Model suite: (batch, image size) for a full and a quick run.
MODEL_DEFAULTS = {"cpu": ((8, 224), (2, 128)), "cuda": ((256, 224), (128, 224))}
# Tail suite: the batches of a full run (a quick run takes QUICK_DEFAULTS'), and the image
# sizes its shapes are traced at (a quick run: the first and last shape at 224).
TAIL_BATCHES = {"cpu": (8, 32), "cuda": (32, 256)}
TAIL_IMAGES = (224, 160)


def require(*modules: str, why: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"{why} needs {', '.join(missing)}, not installed: "
                         "pip install 'se-kernels[bench]'")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return device


def split(text: str | None, allowed: tuple[str, ...] | None, flag: str) -> list[str] | None:
    if text is None:
        return None
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if allowed is not None and v not in allowed]
    if bad or not values:
        raise SystemExit(f"{flag} takes a comma-separated list of {', '.join(allowed or ())}; "
                         f"got {text!r}")
    return values


def load_note() -> str:
    """The machine's load averages (1, 5, 15 minutes) over its cores, from /proc/loadavg."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average: not available"
    return (f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on "
            f"{os.cpu_count() or 1} cores")


def positive_ints(text: str | None, flag: str) -> list[int] | None:
    """A comma-separated list of integers >= 1; None when the flag was not given."""
    if text is None:
        return None
    try:
        values = [int(v) for v in split(text, None, flag)]
    except ValueError:
        raise SystemExit(f"{flag} takes comma-separated integers, got {text!r}") from None
    if min(values) < 1:
        raise SystemExit(f"{flag} values must be >= 1, got {text!r}")
    return values


def _busy_note(device: torch.device, own_threads: int = 0) -> str | None:
    """A warning when other work competes for the CPU that runs (or feeds) the benchmark.
    own_threads: how much of the load the run itself put there (its busiest thread count),
    not counted as other work."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if load - own_threads <= 0.75 * cores:
        return None
    hint = (f"; with {torch.get_num_threads()} torch threads each parallel op waits for the "
            "slowest thread's time slice: --threads 1 is steadier" if device.type == "cpu"
            and torch.get_num_threads() > 1 else "")
    own = f", {own_threads} of it this run's own threads" if own_threads else ""
    return (f"the machine was busy (1-minute load average {load:.1f} on {cores} cores{own}): "
            f"timings are noisy{hint}")


@dataclass
class Plan:
    suite: str
    quick: bool
    cases: list
    requested: list[str]  # peers named by --backends (empty: all usable)
    threads: list[int]  # CPU threads for torch, one pass of the block cases each (empty: as is)
    model: dict | None  # model.run keyword arguments, or None without the model suite
    tail_cases: list  # the tail suite's cases (block.Case of tail shapes), empty without it


def make_plan(args, device: torch.device) -> Plan:
    """Everything the flags decide, checked before anything runs."""
    from se_kernels import dispatch

    from . import block, peers, tail

    kind = device.type
    suite = args.suite or ("cpu" if kind == "cpu" else "blocks")
    quick = args.quick or args.suite is None
    batches, dtypes, layouts, modes, threads = (QUICK_DEFAULTS if quick else DEFAULTS)[kind]
    if suite in WITH_TAIL:
        require("timm", why="the tail suite")
        batches = batches if quick else TAIL_BATCHES[kind]
        modes = tuple(m for m in modes if m in tail.MODES)
    dtypes = split(args.dtype, tuple(block.DTYPES), "--dtype") or dtypes
    layouts = split(args.layout, tuple(block.LAYOUTS), "--layout") or layouts
    modes = split(args.modes, tail.MODES if suite in WITH_TAIL else block.MODES, "--modes") or modes
    batches = positive_ints(args.batch, "--batch") or batches
    threads = positive_ints(args.threads, "--threads") or threads
    if kind != "cpu":
        threads = (None,)
    peer_names = (tail.PEERS if suite in WITH_TAIL
                  else (*peers.BASELINES, peers.AUTO, *dispatch.backend_names()))
    requested = split(args.backends, peer_names, "--backends") or []
    if args.compare and not Path(args.compare).is_file():
        raise SystemExit(f"--compare: no such file {args.compare!r}")

    shapes = []
    for network in SUITES[suite]:
        found = network_shapes(network)
        shapes += evenly_spaced(found, QUICK_SHAPES_PER_NETWORK) if quick else found
    cases = block.cases(shapes, list(batches), list(dtypes), list(layouts), list(modes),
                        list(threads))

    tail_cases = []
    if suite in WITH_TAIL:
        images = positive_ints(args.image_size, "--image-size") or (
            (IMAGE_SIZE,) if quick else TAIL_IMAGES)
        # The bottleneck tails, then EfficientNet-B0's act tails: two row groups.
        groups = [tuple(shape for image in images for shape in shapes_of(image))
                  for shapes_of in (tail_shapes, act_tail_shapes)]
        found = [shape for group in groups
                 for shape in (evenly_spaced(group, QUICK_SHAPES_PER_NETWORK) if quick else group)]
        tail_cases = block.cases(found, list(batches), list(dtypes), list(layouts), list(modes),
                                 list(threads))

    model_kwargs = None
    if suite in WITH_MODEL:
        require("timm", why="the model suite")
        model_kwargs = model_plan(args, device, quick,
                                  [b for b in requested if b not in peers.BASELINES] or None)
    return Plan(suite, quick, cases, requested, [t for t in threads if t is not None],
                model_kwargs, tail_cases)


def model_plan(args, device: torch.device, quick: bool, backends: list[str] | None) -> dict:
    """model.run's keyword arguments from the model suite's flags, checked."""
    from . import model

    (batch, image), (quick_batch, quick_image) = MODEL_DEFAULTS[device.type]
    batches = positive_ints(args.model_batch, "--model-batch") or [quick_batch if quick else batch]
    images = positive_ints(args.image_size, "--image-size") or [quick_image if quick else image]
    tasks = split(args.model_tasks, model.TASKS, "--model-tasks") or list(model.TASKS)
    if "train" in tasks and min(batches) < 2:
        raise SystemExit("--model-batch must be >= 2: a training step's BatchNorm needs "
                         "more than one value per channel")
    families = split(args.families, model.FAMILIES, "--families")
    models = split(args.models, None, "--models")
    found = model.variants(device, backends)
    if not model.select(found, families, models):
        raise SystemExit(f"--families/--models select no model; the models are "
                         f"{', '.join(dict.fromkeys(v.model for v in found))}")
    return dict(batches=batches, images=images, tasks=tasks, quick=quick,
                compile_models=args.model_compile, backends=backends, families=families,
                models=models)


def timing_notes(kind: str, copy_gbps: float) -> list[str]:
    """How the block and the tail suites time, and what their bandwidths are compared with."""
    return [
        f"copy bandwidth (copy_ of a large tensor into another, read + write): {copy_gbps:.1f} GB/s",
        "timing: " + ("CUDA events (triton.testing.do_bench where available), L2 flushed "
                      "before every call; median and p20/p80 of per-call times"
                      if kind == "cuda" else
                      "torch.utils.benchmark Timer in blocks of >= 2 ms, all peers interleaved "
                      "in rounds; median and p20/p80 of the per-call times of the blocks; "
                      "inputs rotated through sets twice the size of the last-level cache, and "
                      "each peer's results held for as many calls, so that no call finds its "
                      "inputs, or the memory its output goes to, in cache"),
        "% copy: GB/s on floor bytes as a share of the copy bandwidth; compile s: a compiled "
        "peer's first call, Dynamo and Inductor included (Inductor caches on disk across runs)",
        "peak MiB: " + ("torch.cuda.max_memory_allocated during one call, above what was "
                        "allocated before it" if kind == "cuda" else "not measured on CPU"),
    ]


BLOCK_NOTES = [
    "GB/s on floor bytes: fwd reads x and writes out once, bwd reads dout and x and writes "
    "dx once (plus the weights and their gradients)",
    "x eager / x compile: speed-up over eager torchvision SE / its torch.compile (mode "
    "default); compile-max is mode max-autotune-no-cudagraphs",
    "check: each peer's output (and gradients) against eager's on the same inputs",
]


class Results:
    """The run's files, written as it goes: each CSV row by row (appended and flushed after
    every block case and every model task), and the markdown rewritten with the rows so far,
    marked incomplete, so that a run stopped partway (a time limit, a crash, a kill) leaves
    every finished row behind in both. The plots and the final markdown come at the end."""

    def __init__(self, stem: Path, device: torch.device, argv: list[str], notes: list[str],
                 cases: int, model_tasks: int, tail_cases: int = 0):
        self.stem, self.device, self.argv, self.notes = stem, device, argv, notes
        self.model_stem = stem.with_name(stem.name + "-model")
        self.tail_stem = stem.with_name(stem.name + "-tail")
        self.cases, self.model_tasks, self.tail_cases = cases, model_tasks, tail_cases
        self.block_rows: list[dict] = []
        self.model_rows: list[dict] = []
        self.tail_rows: list[dict] = []
        self.cases_done = self.model_tasks_done = self.tail_cases_done = 0
        self._files: dict[str, report.CsvRows] = {}

    def _append(self, kind: str, path: Path, columns: list[str], rows: list[dict]) -> None:
        if kind not in self._files:
            self._files[kind] = report.CsvRows(path, columns)
        self._files[kind].add(rows)

    def add_block(self, rows: list[dict]) -> None:
        self._append("block", self.stem.with_suffix(".csv"), report.BLOCK_COLUMNS, rows)
        self.block_rows += rows
        self.cases_done += 1
        self.write_markdown(final=False)

    def add_tail(self, rows: list[dict]) -> None:
        from . import tail

        self._append("tail", self.tail_stem.with_suffix(".csv"), tail.TAIL_COLUMNS, rows)
        self.tail_rows += rows
        self.tail_cases_done += 1
        self.write_markdown(final=False)

    def add_model(self, rows: list[dict]) -> None:
        from . import model

        self._append("model", self.model_stem.with_suffix(".csv"), model.MODEL_COLUMNS, rows)
        self.model_rows += rows
        self.model_tasks_done += 1
        self.write_markdown(final=False)

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()

    def markdown(self, *, final: bool) -> list[str]:
        from . import model

        notes = list(self.notes)
        if not final:
            done = [f"{self.cases_done} of {self.cases} block cases"] if self.cases else []
            if self.tail_cases:
                done.append(f"{self.tail_cases_done} of {self.tail_cases} tail cases")
            if self.model_tasks:
                done.append(f"{self.model_tasks_done} of {self.model_tasks} model tasks")
            notes.insert(0, f"incomplete: {' and '.join(done)} so far (the run rewrites this "
                            "file after each one, and once more when it ends)")
        md = [report.header("SE benchmark", self.device, self.argv, notes)]
        if self.block_rows:
            md += ["## Speed-up over eager", "", *summaries(self.block_rows, markdown=True),
                   "## SE blocks", "", report.block_table(self.block_rows, markdown=True)]
            if final:
                md += ["", f"![speed-up over eager]({self.stem.with_suffix('.png').name})"]
        if self.tail_rows:
            md += ["## Block tail: speed-up over eager", "",
                   *summaries(self.tail_rows, markdown=True),
                   "## Block tail: speed-up over SE-only", "",
                   report.speedup_summary(self.tail_rows, "x_se_only", markdown=True,
                                          baseline="se-only"), "",
                   "## Block tails", "", tail_table(self.tail_rows, markdown=True)]
            if final:
                md += ["", f"![speed-up over eager]({self.tail_stem.with_suffix('.png').name})"]
        if self.model_rows:
            md += ["## Models", "",
                   "SE/plain: train rows give time(SE) / time(plain), the paper's 209/190 ms = "
                   f"{model.PAPER_TRAIN_TIME_RATIO:.2f}; infer rows give throughput(SE) / "
                   "throughput(plain), timm's 0.864 eager / 0.779 compiled (column reference). "
                   "+convert-se-only: convert_se_modules(fuse_blocks=False), the SE modules "
                   "on the fused op; +convert: convert_se_modules, the block tails fused too.",
                   "", report.model_table(self.model_rows, markdown=True)]
            if final:
                md += ["", f"![SE / plain]({self.model_stem.with_suffix('.png').name})"]
        return md

    def write_markdown(self, *, final: bool, extra: list[str] = ()) -> list[str]:
        md = self.markdown(final=final) + list(extra)
        report.write_text_atomically(self.stem.with_suffix(".md"), "\n".join(md) + "\n")
        return md


def main(args, argv: list[str]) -> int:
    from . import block, model, tail

    require("tqdm", "matplotlib", "torchvision", why="se-kernels bench")
    device = resolve_device(args.device)
    plan = make_plan(args, device)
    if len(plan.threads) == 1:  # the model suite's too
        torch.set_num_threads(plan.threads[0])
    malloc_note = None
    if device.type == "cpu":
        malloc_note = ("host malloc: left as it is (--keep-malloc-defaults)"
                       if args.keep_malloc_defaults
                       else keep_freed_memory())
    load_at_start = load_note()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = report.output_stem(out_dir, device)
    name = report.device_name(device)
    busy = _busy_note(device)
    if busy:
        report.print_err(f"warning: {busy}")
    report.print_err(f"se-kernels bench: suite {plan.suite}{' (quick)' if plan.quick else ''} "
                     f"on {name}: {len(plan.cases)} block cases"
                     + (f", {len(plan.tail_cases)} tail cases" if plan.tail_cases else "")
                     + (", model suite" if plan.model else ""))

    # While rows come in, the markdown carries the notes known so far.
    early = [f"machine load: at the start {load_at_start}", *([malloc_note] if malloc_note else [])]
    model_tasks = 0
    if plan.model:
        model_tasks = (len(plan.model["tasks"]) * (1 + plan.model["compile_models"])
                       * len(plan.model["batches"]) * len(plan.model["images"]))
    results = Results(stem, device, argv, early, len(plan.cases), model_tasks,
                      len(plan.tail_cases))
    notes: list[str] = []
    try:
        if plan.cases or plan.tail_cases:
            from .timing import copy_bandwidth_gbps

            copy_gbps = copy_bandwidth_gbps(device, quick=plan.quick)
            notes += timing_notes(device.type, copy_gbps)
        if plan.cases:
            notes += BLOCK_NOTES
            results.notes = notes + early
            _, refused = block.run(plan.cases, plan.requested, device, quick=plan.quick,
                                   copy_gbps=copy_gbps, on_rows=results.add_block)
            notes += [f"backend {backend!r} not run: {'; '.join(sorted(reasons))}"
                      for backend, reasons in refused.items()]
            results.notes = notes + early
        if plan.tail_cases:
            notes += tail.NOTES
            results.notes = notes + early
            block.run(plan.tail_cases, plan.requested, device, quick=plan.quick,
                      copy_gbps=copy_gbps, on_rows=results.add_tail, case_runner=tail.run_case,
                      desc="block tails")
        if plan.model:
            model.run(device, **plan.model, on_rows=results.add_model)
    finally:
        results.close()
    block_rows, model_rows, tail_rows = results.block_rows, results.model_rows, results.tail_rows
    if plan.model:
        notes.append("models: " + ("CUDA events (triton.testing.do_bench where available) per "
                                   "step, after a warm-up step" if device.type == "cuda" else
                                   "each step timed by the host clock, the models interleaved "
                                   "in rounds after a warm-up step")
                     + "; train = forward, cross-entropy, backward, SGD step; infer = forward "
                       "under inference_mode")
    # By now the 1-minute load includes the run's own threads (one feeding a GPU).
    own_threads = max(plan.threads or [torch.get_num_threads()]) if device.type == "cpu" else 1
    busy = busy or _busy_note(device, own_threads)
    if busy:
        notes.append(busy)
    notes.append(f"machine load: at the start {load_at_start}; at the end {load_note()}")
    if malloc_note:
        notes.append(malloc_note)
    if device.type == "cpu":
        notes.append("torch threads: " + ", ".join(map(str, plan.threads or [torch.get_num_threads()])))
    results.notes = notes
    refusals = [r for r in block_rows + tail_rows if r["check"] != "ok"]

    outputs = []
    if block_rows:
        report.plot_blocks(block_rows, stem.with_suffix(".png"), name)
        outputs += [stem.with_suffix(".csv"), stem.with_suffix(".png")]
    if tail_rows:
        tail_stem = results.tail_stem
        report.plot_blocks(tail_rows, tail_stem.with_suffix(".png"), f"{name}, block tail")
        outputs += [tail_stem.with_suffix(".csv"), tail_stem.with_suffix(".png")]
    if model_rows:
        model_stem = results.model_stem
        report.plot_models(model_rows, model_stem.with_suffix(".png"), name)
        outputs += [model_stem.with_suffix(".csv"), model_stem.with_suffix(".png")]

    comparison, extra = None, []
    if args.compare:
        old_rows = report.read_csv(Path(args.compare))
        if old_rows and "task" in old_rows[0]:
            new_rows = model_rows
        else:
            new_rows = tail_rows if old_rows and "x_se_only" in old_rows[0] else block_rows
        comparison = report.compare(old_rows, new_rows, markdown=False)
        extra = ["", f"## Change against {Path(args.compare).name}", "",
                 report.compare(old_rows, new_rows, markdown=True)]

    md = results.write_markdown(final=True, extra=extra)
    outputs.insert(0, stem.with_suffix(".md"))

    print("\n".join(md[0].splitlines()[2:]))
    if block_rows:
        print("\n" + report.block_table(block_rows, markdown=False))
        print("\n" + "\n".join(summaries(block_rows, markdown=False)))
    if tail_rows:
        print("\n" + tail_table(tail_rows, markdown=False))
        print("\n" + "\n".join(summaries(tail_rows, markdown=False)))
        print(report.speedup_summary(tail_rows, "x_se_only", markdown=False, baseline="se-only"))
    if model_rows:
        print("\n" + report.model_table(model_rows, markdown=False))
    if comparison is not None:
        print(f"\nchange against {args.compare}:\n{comparison}")
    print("\nwrote " + ", ".join(str(p) for p in outputs))
    if refusals:
        report.print_err(f"error: {len(refusals)} peer results were refused (not timed):")
        for r in refusals:
            report.print_err(f"  {report.shape_label(r)} N{r['batch']} {r['dtype']} {r['layout']} "
                             f"{r['mode']} {r['threads']}T {report.peer_label(r)}: {r['check']}")
        return 1
    return 0


def summaries(rows: list[dict], *, markdown: bool) -> list[str]:
    """The speed-up summary over eager from the per-call timers and, on the GPU, from the
    back-to-back wall clock (host overhead included)."""
    columns = ["x_eager"] + (["x_eager_wall"] if any(
        isinstance(r.get("wall_us"), float) and math.isfinite(r["wall_us"]) for r in rows) else [])
    out = []
    for column in columns:
        out += [report.speedup_summary(rows, column, markdown=markdown), ""]
    return out


def tail_table(rows: list[dict], *, markdown: bool) -> str:
    """The block table of the tail suite's rows, with the speed-up over se-only."""
    return report.block_table(rows, markdown=markdown, extra=[("x se-only", "x_se_only")])
