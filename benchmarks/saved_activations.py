"""What a training step keeps for the backward: MiB of tensors autograd saves, per model.

Counts every tensor saved for the backward during one forward (torch.autograd.graph.
saved_tensors_hooks), each storage once (a view shares its base's memory; a parameter is
not an activation and is left out). No timing: the numbers do not depend on the machine's
load. Pairs: timm's resnet50 vs seresnet50 and resnext50_32x4d vs seresnext50_32x4d, the SE
models eager, with convert_se_modules(fuse_blocks=False) (SE modules only) and converted
(block tails fused).

    python benchmarks/saved_activations.py [--batch 4] [--image 224] [--markdown OUT.md]
"""

from __future__ import annotations

import argparse

import torch

PAIRS = [("resnet50", "seresnet50"), ("resnext50_32x4d", "seresnext50_32x4d")]


def saved_mib(model: torch.nn.Module, x: torch.Tensor) -> float:
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(seen.values()) / 2**20


def rows(batch: int, image: int) -> list[tuple[str, str, float, float]]:
    import timm

    import se_kernels

    x = torch.randn(batch, 3, image, image)
    out = []
    for plain, se in PAIRS:
        torch.manual_seed(0)
        base = saved_mib(timm.create_model(plain, pretrained=False).train(), x)
        variants = {
            "eager": lambda: timm.create_model(se, pretrained=False),
            "SE modules converted": lambda: se_kernels.convert_se_modules(
                timm.create_model(se, pretrained=False), fuse_blocks=False),
            "converted (tails fused)": lambda: se_kernels.convert_se_modules(
                timm.create_model(se, pretrained=False)),
        }
        out.append((plain, "", base, 1.0))
        for label, build in variants.items():
            mib = saved_mib(build().train(), x)
            out.append((se, label, mib, mib / base))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    lines = [f"Saved for the backward, fp32, N={args.batch}, {args.image}x{args.image} "
             f"(`python benchmarks/saved_activations.py --batch {args.batch} --image {args.image}`):",
             "", "| model | SE modules | saved MiB | vs its plain model |", "|---|---|---|---|"]
    for model, label, mib, ratio in rows(args.batch, args.image):
        lines.append(f"| {model} | {label or '—'} | {mib:.1f} | {ratio:.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
