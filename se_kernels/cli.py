"""The se-kernels command (also python -m se_kernels).

  se-kernels info    version, build, devices, and which backends run here (and why not)
  se-kernels bench   time SE blocks of real networks (and whole models) against eager and
                     torch.compile; writes CSV, markdown and a plot (needs se-kernels[bench])
  se-kernels flops   the SE paper's FLOP and parameter tables, recounted
  se-kernels plan    one call's launches, modeled DRAM bytes and predicted time on a GPU,
                     from a GPU backend's own planning code (no GPU needed)
  se-kernels coverage  which SE-style modules of the installed timm convert_se_modules
                     replaces, per model family, and why the rest stay eager
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys

import torch


def _probe_call(device: str, dtype: torch.dtype):
    from .call import make_call

    x = torch.zeros(1, 8, 2, 2, device=device, dtype=dtype)
    return make_call(x, torch.zeros(2, 8, device=device, dtype=dtype), None,
                     torch.zeros(8, 2, device=device, dtype=dtype), None)


def info(args: argparse.Namespace) -> int:
    import se_kernels
    from .backends import native

    lines = [f"se_kernels {se_kernels.__version__}",
             f"python {platform.python_version()}, torch {torch.__version__}"
             f" (CUDA {torch.version.cuda or 'none'})"]
    try:
        import triton
        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")

    if native.EXTENSION_ERROR is None:
        build = native.BUILD
        cuda = (f"CUDA kernels for {', '.join(build['cuda_archs'])} (nvcc {build['nvcc']})"
                if build["cuda"] else "no CUDA kernels")
        # The AVX2 kernels run where ATen itself uses AVX2 or better (ATEN_CPU_CAPABILITY).
        cpu_table = ("AVX2" if build.get("cpu_avx2") and
                     torch.backends.cpu.get_cpu_capability() != "DEFAULT" else "baseline")
        lines.append(f"extension se_kernels._C: built against torch {build['torch']}, "
                     f"CPU kernels ({cpu_table} here), {cuda}")
        if build["torch"] and build["torch"] != torch.__version__:
            lines.append(f"  warning: built against torch {build['torch']}, running "
                         f"{torch.__version__}: rebuild if it fails to load")
    else:
        lines.append(f"extension se_kernels._C: not available: {native.EXTENSION_ERROR}")

    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            covered = native.cuda_arch_covered((major, minor), native.BUILD["cuda_archs"])
            lines.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{major}{minor}); "
                         f"compiled CUDA kernels {'cover' if covered else 'do NOT cover'} it")
        devices.append("cuda")
    else:
        lines.append("cuda: no GPU visible")

    for device in devices:
        call = _probe_call(device, torch.float32)
        explanation = se_kernels.explain(call)
        lines.append(f"backends for {device} tensors (auto picks {explanation.auto!r} for a "
                     f"{'x'.join(map(str, call.x.shape))} call: {explanation.why}):")
        for name, reasons in explanation.items():
            lines.append(f"  {name:7s} " + ("usable" if not reasons else "no: " + "; ".join(reasons)))
    print("\n".join(lines))
    return 0


def bench(args: argparse.Namespace) -> int:
    from .bench import runner

    return runner.main(args, args.argv)


def flops(args: argparse.Namespace) -> int:
    from .bench import flops as flops_tables

    return flops_tables.main(args)


# (subcommand = module of se_kernels, help, description)
MODULE_COMMANDS = (
    ("plan", "launches, modeled DRAM bytes and predicted time of one call on a GPU",
     "Runs a GPU backend's planning code for one SE call or block tail (no GPU needed) and "
     "models its DRAM traffic against the bandwidth floor."),
    ("coverage", "timm's SE-style modules the fused op serves, per model family",
     "Builds timm's models on the meta device and reports, per family, the SE-style modules "
     "convert_se_modules replaces and why the rest stay eager."),
)


def _add_module_command(commands, name: str, module: str, help: str, description: str) -> None:
    """A subcommand whose module (se_kernels.<module>) declares its arguments with
    add_arguments(parser) and runs them with main(args)."""
    parser = commands.add_parser(name, help=help, description=description)
    importlib.import_module(f".{module}", __package__).add_arguments(parser)
    parser.set_defaults(func=lambda args: importlib.import_module(f".{module}", __package__).main(args))


def _add_bench_parser(commands) -> None:
    parser = commands.add_parser(
        "bench", help="time SE blocks and models against eager and torch.compile",
        description="Times the SE layers of real networks (with --suite tail, SE-ResNet(X)t-50's "
                    "BatchNorm -> SE -> add -> ReLU block tails; with --suite model, whole "
                    "SE-ResNet(X)t-50s against their plain models) for every implementation "
                    "usable on the device, with the same inputs. With no --suite: a quick suite "
                    "for the best device present.")
    parser.add_argument("--device", default="auto", help="auto (default: cuda if present), cpu, cuda[:N]")
    from .bench.shapes import NETWORKS
    parser.add_argument("--suite", choices=[*NETWORKS, "cpu", "blocks", "tail", "model", "all"],
                        help="one network's SE shapes; cpu = every network at batch 1, 8 and 32, "
                             "fp32, on 1 and 2 threads; blocks = every network; tail = the "
                             "block tails of SE-ResNet-50 / SE-ResNeXt-50 (eager, se-only, "
                             "compile, fused); model = SE-ResNet(X)t-50 vs ResNet(X)t-50; "
                             "all = blocks + model")
    parser.add_argument("--dtype", help="comma list of fp32, bf16, fp16 (default: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--layout", help="comma list of nchw, channels_last "
                                         "(default: nchw on CPU, channels_last on GPU)")
    parser.add_argument("--modes",
                        help="comma list of fwd, bwd, fwd+bwd (the tail suite: fwd, fwd+bwd)")
    parser.add_argument("--batch", help="comma list of batch sizes for the SE blocks and the tails")
    parser.add_argument("--backends", help="comma list of peers: eager, compile, compile-max, auto "
                                           "and se_kernels backends (default: all usable here; "
                                           "eager always runs, as the baseline); the tail "
                                           "suite: eager, se-only, compile, compile-max, fused "
                                           "(default: all but compile-max)")
    parser.add_argument("--quick", action="store_true",
                        help="the first and last SE shape of each network (the tail suite: "
                             "the first and last tail shape at 224), shorter timing (GPU: "
                             "batch 256 only, no bwd-only mode); the default with no --suite")
    parser.add_argument("--out", default="benchmarks/results",
                        help="results folder (default: benchmarks/results)")
    parser.add_argument("--compare", metavar="OLD.csv", help="print the change against an earlier run's CSV")
    parser.add_argument("--threads",
                        help="comma list of CPU thread counts for torch, the block and tail "
                             "cases run once per count (default: 1,2 for a CPU suite without "
                             "--quick, else torch's own choice)")
    parser.add_argument("--model-batch", help="model suite: comma list of batch sizes")
    parser.add_argument("--image-size",
                        help="comma list of image sizes: the model suite's inputs; the tail "
                             "suite's shapes are traced at them (default 224,160)")
    parser.add_argument("--model-tasks",
                        help="model suite: comma list of train, infer (default both)")
    parser.add_argument("--families", help="model suite: comma list of torchvision, timm "
                                           "(default both)")
    parser.add_argument("--models",
                        help="model suite: comma list of model names or shell-style patterns "
                             "(seresnet50*, 'se*+convert'); an SE model brings its plain model "
                             "along (default: all)")
    parser.add_argument("--model-compile", action="store_true",
                        help="model suite: also time torch.compile'd models")
    parser.add_argument("--keep-malloc-defaults", action="store_true",
                        help="CPU: leave glibc's malloc as it is (by default the run fixes its "
                             "mmap and trim thresholds, so that large tensors reuse freed memory "
                             "instead of page-faulting it in on some calls; see "
                             "benchmarks/README.md)")
    parser.set_defaults(func=bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="se-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="version, build and the backends usable here").set_defaults(func=info)
    _add_bench_parser(commands)
    flops_parser = commands.add_parser("flops", help="the SE paper's FLOP/parameter tables, recounted")
    flops_parser.add_argument("--markdown", metavar="FILE", help="also write the tables to FILE")
    flops_parser.set_defaults(func=flops)
    for name, help, description in MODULE_COMMANDS:
        _add_module_command(commands, name, name, help=help, description=description)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # bench records the command
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
