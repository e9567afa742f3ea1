"""The block tail's per-channel algebra between its passes (DESIGN.md §1.5), as ops.

Between the tail's stream passes lies arithmetic on [C] and [N, C] vectors: the norm's
affine map and the squeeze from the reduce pass's sums, and in the backward the sums of
du and du·x, the norm's gradients and the input gradient's coefficients. As PyTorch code it
is twenty-odd small operations a direction, which on CPU cost as much as a small map's
passes; these ops do each stretch in one call. The all-reduce of a SyncBatchNorm falls
between them (`moments` below are batch means, all-reduced where there is a group).

    tail_norm_forward(moments, sums, weight, bias, eps, p, batch_stats)
            -> (stats, rstd, a, b, z)
        moments [2C]: [E x | E x²] over the batch when batch_stats, else [running_mean |
        running_var]; stats [2, C] = [mean; var], var = max(E x² - mean², 0) (biased) or the
        running one; rstd = 1/√(var + eps); u = a·x + b with a = weight·rstd,
        b = bias - a·mean (weight, bias None: 1, 0); z = a·sums/p + b [N, C], the squeeze of
        u from the per-(n, c) sums of x over p positions (empty without sums)
    tail_du_sums(dz, k, sdy, sd, sdyx, sdx, p) -> local [2C]
        [Σ_n (k·sdy + e·sd) | Σ_n (k·sdyx + e·sdx)] with e = dz/p: Σ du and Σ du·x per
        channel for du = d·(k·dy + e) summed over p by the grad reduce pass (sdy = Σ dy·d,
        sd = Σ d, ...); sd None is d = 1 (no activation: Σ_p e = dz)
    tail_norm_backward(local, means, stats, rstd, weight, bias, k, dz, p, batch_stats)
            -> (dweight, dbias, dy_scale, e_scale, x_scale, shift)
        from local (this process's sums) and means (the batch's mean(du), mean(du·x), used
        when batch_stats): dweight = Σ du·x̂, dbias = Σ du (empty without weight / bias);
        with gr = weight·rstd, dy_scale = gr·k and e_scale = gr·dz/p [N, C]; under batch
        statistics x_scale = -gr·rstd·mean(du·x̂) and shift = gr·(rstd·mean·mean(du·x̂) -
        mean(du)) [C] (empty without), so that dx = d·(dy_scale·dy + e_scale) +
        x_scale·x + shift

Every tensor is in one accumulation dtype (fp32, or fp64), contiguous, on one device.
Kernels: CPU in se_kernels._C; this module's PyTorch versions serve every other device
(and CPU where the extension is not built), and are what the tests hold the kernels to.
"""

from __future__ import annotations

import torch

from ._ops import runs_cpu_kernels_as_ops

_lib = torch.library.Library("se_kernels", "FRAGMENT")  # noqa: TOR901 - kept alive for the module's life
SCHEMAS = {
    "tail_norm_forward": (
        "(Tensor moments, Tensor? sums, Tensor? weight, Tensor? bias, float eps, int p, "
        "bool batch_stats) -> (Tensor stats, Tensor rstd, Tensor a, Tensor b, Tensor z)"),
    "tail_du_sums": (
        "(Tensor dz, Tensor k, Tensor sdy, Tensor? sd, Tensor sdyx, Tensor sdx, int p) "
        "-> Tensor"),
    "tail_norm_backward": (
        "(Tensor local, Tensor means, Tensor stats, Tensor rstd, Tensor? weight, Tensor? bias, "
        "Tensor k, Tensor dz, int p, bool batch_stats) -> (Tensor dweight, Tensor dbias, "
        "Tensor dy_scale, Tensor e_scale, Tensor x_scale, Tensor shift)"),
}
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)


def _check(name: str, t, shape: tuple, like: torch.Tensor, optional: bool = False) -> None:
    if t is None:
        if optional:
            return
        raise ValueError(f"{name} is required")
    if t.dtype != like.dtype or t.device != like.device:
        raise TypeError(f"{name} must be {like.dtype} on {like.device} like the other vectors, "
                        f"got {t.dtype} on {t.device}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def _check_rows(name: str, t: torch.Tensor, c: int, like: torch.Tensor) -> None:
    if t.dim() != 2 or t.shape[1] != c:
        raise ValueError(f"{name} must have shape [N, {c}], got {list(t.shape)}")
    _check(name, t, tuple(t.shape), like)


def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64 (the accumulation dtype), got "
                        f"{t.dtype}")


def _check_p(p: int) -> None:
    if p < 1:
        raise ValueError(f"p (positions per channel) must be at least 1, got {p}")


def check_norm_forward(moments, sums, weight, bias, eps, p, batch_stats) -> None:
    _check_dtype("moments", moments)
    if moments.dim() != 1 or moments.shape[0] % 2:
        raise ValueError(f"moments must have shape [2C], got {list(moments.shape)}")
    c = moments.shape[0] // 2
    if sums is not None:
        _check_rows("sums", sums, c, moments)
    _check("weight", weight, (c,), moments, optional=True)
    _check("bias", bias, (c,), moments, optional=True)
    _check_p(p)


def check_du_sums(dz, k, sdy, sd, sdyx, sdx, p) -> None:
    _check_dtype("dz", dz)
    if dz.dim() != 2:
        raise ValueError(f"dz must have shape [N, C], got {list(dz.shape)}")
    shape = tuple(dz.shape)
    for name, t in (("k", k), ("sdy", sdy), ("sdyx", sdyx), ("sdx", sdx)):
        _check(name, t, shape, dz)
    _check("sd", sd, shape, dz, optional=True)
    _check_p(p)


def check_norm_backward(local, means, stats, rstd, weight, bias, k, dz, p, batch_stats) -> None:
    _check_dtype("local", local)
    if local.dim() != 1 or local.shape[0] % 2:
        raise ValueError(f"local must have shape [2C], got {list(local.shape)}")
    c = local.shape[0] // 2
    _check("means", means, (2 * c,), local)
    _check("stats", stats, (2, c), local)
    _check("rstd", rstd, (c,), local)
    _check("weight", weight, (c,), local, optional=True)
    _check("bias", bias, (c,), local, optional=True)
    _check_rows("k", k, c, local)
    _check("dz", dz, (k.shape[0], c), local)
    _check_p(p)


def norm_forward(moments, sums, weight, bias, eps, p, batch_stats):
    """tail_norm_forward in PyTorch operations."""
    check_norm_forward(moments, sums, weight, bias, eps, p, batch_stats)
    c = moments.shape[0] // 2
    mean = moments[:c]
    var = (torch.addcmul(moments[c:], mean, mean, value=-1).clamp_min_(0) if batch_stats
           else moments[c:])
    rstd = torch.rsqrt(var + eps)
    a = rstd if weight is None else weight * rstd
    b = -(a * mean) if bias is None else torch.addcmul(bias, a, mean, value=-1)
    z = torch.addcmul(b, a, sums, value=1 / p) if sums is not None else moments.new_empty((0,))
    return torch.stack([mean, var]), rstd, a, b, z


def du_sums(dz, k, sdy, sd, sdyx, sdx, p):
    """tail_du_sums in PyTorch operations."""
    check_du_sums(dz, k, sdy, sd, sdyx, sdx, p)
    e = dz / p
    first = torch.addcmul(dz, k, sdy) if sd is None else torch.addcmul(e * sd, k, sdy)
    return torch.cat([first, torch.addcmul(e * sdx, k, sdyx)], 1).sum(0)


def norm_backward(local, means, stats, rstd, weight, bias, k, dz, p, batch_stats):
    """tail_norm_backward in PyTorch operations."""
    check_norm_backward(local, means, stats, rstd, weight, bias, k, dz, p, batch_stats)
    c = rstd.shape[0]
    mean = stats[0]
    empty = local.new_empty((0,))
    dweight = (torch.addcmul(local[c:], mean, local[:c], value=-1).mul_(rstd)
               if weight is not None else empty)
    dbias = local[:c].clone() if bias is not None else empty
    gr = rstd if weight is None else weight * rstd
    dy_scale, e_scale = gr * k, gr * (dz / p)
    if not batch_stats:
        return dweight, dbias, dy_scale, e_scale, empty, empty
    mean_du = means[:c]
    mean_duxhat = torch.addcmul(means[c:], mean, mean_du, value=-1).mul_(rstd)
    x_scale = (gr * rstd).mul_(mean_duxhat).neg_()
    # gr·(rstd·mean·mean(du·x̂) - mean(du)): the first term is -x_scale·mean
    shift = torch.addcmul(gr * mean_du, x_scale, mean).neg_()
    return dweight, dbias, dy_scale, e_scale, x_scale, shift


REFERENCES = {"tail_norm_forward": norm_forward, "tail_du_sums": du_sums,
              "tail_norm_backward": norm_backward}


def _norm_forward_fake(moments, sums, weight, bias, eps, p, batch_stats):
    check_norm_forward(moments, sums, weight, bias, eps, p, batch_stats)
    c = moments.shape[0] // 2
    z = moments.new_empty(sums.shape) if sums is not None else moments.new_empty((0,))
    return (moments.new_empty((2, c)), moments.new_empty((c,)), moments.new_empty((c,)),
            moments.new_empty((c,)), z)


def _du_sums_fake(dz, k, sdy, sd, sdyx, sdx, p):
    check_du_sums(dz, k, sdy, sd, sdyx, sdx, p)
    return dz.new_empty((2 * dz.shape[1],))


def _norm_backward_fake(local, means, stats, rstd, weight, bias, k, dz, p, batch_stats):
    check_norm_backward(local, means, stats, rstd, weight, bias, k, dz, p, batch_stats)
    c = rstd.shape[0]
    per_channel = (c,) if batch_stats else (0,)
    return (local.new_empty((c,) if weight is not None else (0,)),
            local.new_empty((c,) if bias is not None else (0,)), k.new_empty(k.shape),
            k.new_empty(k.shape), local.new_empty(per_channel), local.new_empty(per_channel))


FAKES = {"tail_norm_forward": _norm_forward_fake, "tail_du_sums": _du_sums_fake,
         "tail_norm_backward": _norm_backward_fake}
OPS = {}
for _name in SCHEMAS:
    torch.library.register_fake(f"se_kernels::{_name}", FAKES[_name])
    torch.library.impl(f"se_kernels::{_name}", "CompositeExplicitAutograd")(REFERENCES[_name])
    OPS[_name] = getattr(torch.ops.se_kernels, _name).default


def for_device(device: torch.device) -> dict:
    """The three by name, as the tail calls them on `device` now: the ops in eager on CPU,
    where the extension's kernels do each in one loop; elsewhere the PyTorch versions
    themselves, which a GPU runs as the same kernels the op would, and which tracing,
    torch.compile and torch.export see through and differentiate (the ops have no
    autograd: the tail's autograd.Function is their backward in eager)."""
    return OPS if runs_cpu_kernels_as_ops(device) else REFERENCES
