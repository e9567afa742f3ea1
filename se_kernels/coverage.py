"""`se-kernels coverage`: which SE-style modules of the installed timm the fused op serves.

Builds timm's registered models on the meta device (no memory, no weights, no compute),
finds their SE-style modules with se_kernels.convert.find_se_modules, and prints per model
family (timm's module, e.g. "resnet", "efficientnet") how many modules convert_se_modules
would replace, and why the rest would stay eager.
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import sys
import time
from dataclasses import dataclass, field

import torch


@dataclass
class FamilyCoverage:
    family: str
    models: int = 0
    models_with_se: int = 0
    modules: int = 0
    served: int = 0
    # (class name, reason) -> how many modules stay eager for it
    eager: collections.Counter = field(default_factory=collections.Counter)
    unbuildable: list[str] = field(default_factory=list)  # "model: error"

    @property
    def fully_served(self) -> bool:
        return self.modules == self.served


def scan_model(name: str, coverage: FamilyCoverage) -> None:
    """Adds `name`'s SE-style modules to `coverage`; a model timm cannot build on the meta
    device is listed with its error instead."""
    import timm

    from .convert import find_se_modules

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception as error:  # any model's constructor may fail on meta tensors
        coverage.unbuildable.append(f"{name}: {type(error).__name__}: {str(error)[:120]}")
        return
    reports = find_se_modules(model)
    coverage.models += 1
    coverage.models_with_se += bool(reports)
    coverage.modules += len(reports)
    for report in reports:
        if report.servable:
            coverage.served += 1
        else:
            coverage.eager[(report.source.rsplit(".", 1)[-1], report.reason)] += 1


def scan(families: str = "*", models_per_family: int = 0, progress=None) -> list[FamilyCoverage]:
    """Coverage of every timm family whose name matches the glob `families` (models in
    registry order; the first `models_per_family` of each when that is positive)."""
    import timm

    result = []
    for family in sorted(timm.list_modules()):
        if not fnmatch.fnmatch(family, families):
            continue
        names = timm.list_models(module=family)
        if models_per_family > 0:
            names = names[:models_per_family]
        coverage = FamilyCoverage(family)
        for name in names:
            if progress:
                progress(name)
            scan_model(name, coverage)
        result.append(coverage)
    return result


def table(families: list[FamilyCoverage]) -> str:
    """A markdown table of the families with SE-style modules, and a summary line."""
    with_se = [f for f in families if f.modules]
    lines = ["| family | models with SE | SE modules | served | stays eager (modules: class: why) |",
             "|---|---|---|---|---|"]
    for f in with_se:
        eager = "; ".join(f"{count}: {cls}: {reason}" for (cls, reason), count in
                          sorted(f.eager.items(), key=lambda item: -item[1])) or "—"
        lines.append(f"| {f.family} | {f.models_with_se}/{f.models} | {f.modules} | {f.served} | "
                     f"{eager.replace('|', '/')} |")
    modules = sum(f.modules for f in with_se)
    served = sum(f.served for f in with_se)
    full = sum(f.fully_served for f in with_se)
    lines.append("")
    lines.append(f"{full} of {len(with_se)} families with SE-style modules fully served; "
                 f"{served} of {modules} modules.")
    unbuildable = [entry for f in families for entry in f.unbuildable]
    if unbuildable:
        lines.append(f"{len(unbuildable)} models could not be built on the meta device and are "
                     f"not counted: " + "; ".join(unbuildable[:5])
                     + (" ..." if len(unbuildable) > 5 else ""))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", default="*",
                        help="glob over timm's model families (its modules: resnet, "
                             "efficientnet, ...); default: all")
    parser.add_argument("--models-per-family", type=int, default=0, metavar="K",
                        help="scan only the first K models of each family (default: all)")


def main(args: argparse.Namespace) -> int:
    try:
        import timm
    except ImportError:
        print("se-kernels coverage needs timm: pip install timm", file=sys.stderr)
        return 2
    start = time.perf_counter()
    families = scan(args.family, args.models_per_family,
                    progress=lambda name: print(f"  {name}", file=sys.stderr, flush=True))
    if not families:
        print(f"no timm family matches {args.family!r}", file=sys.stderr)
        return 2
    print(f"timm {timm.__version__}: {sum(f.models for f in families)} models in "
          f"{len(families)} families, scanned in {time.perf_counter() - start:.0f} s")
    print(table(families))
    return 0
