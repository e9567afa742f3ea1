"""The se-kernels command (also python -m se_kernels).

  se-kernels info    version, build, devices, and which backends run here (and why not)
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch


def _probe_call(device: str, dtype: torch.dtype):
    from .options import make_call

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
        lines.append(f"extension se_kernels._C: built against torch {build['torch']}, "
                     f"CPU kernels, {cuda}")
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
        chosen = se_kernels.select(call).name
        lines.append(f"backends for {device} tensors (auto picks {chosen!r}):")
        for name, reasons in se_kernels.explain(call).items():
            lines.append(f"  {name:7s} " + ("usable" if not reasons else "no: " + "; ".join(reasons)))
    print("\n".join(lines))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="se-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="version, build and the backends usable here").set_defaults(func=info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
