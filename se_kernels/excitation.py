"""The excitation forms of the staged path (DESIGN.md §1.4): z [N, C] -> g [N, C].

A form is a frozen description (hashable, a constant to torch.compile) of how g follows
from z and the form's parameters, with

  forward(z, params, fc=TORCH_FC) -> (g, saved, stats)
      in differentiable PyTorch operations: the staged path calls it with autograd off and
      keeps `saved`; the torch backend calls it with autograd on and lets autograd
      differentiate it (and ONNX export emit it);
  backward(dg, z, params, saved, fc=TORCH_FC) -> (dz, grads)
      the same function's vector-Jacobian product written out, one gradient per parameter
      (None where a parameter is None);
  fuses, fused_weights(params) -> (w1, b1, w2, b2)
      whether the fused op's two FCs can compute the same g, and those FCs (a converted
      module then runs the fused op, one kernel call instead of the staged path's passes);
  linear_form(params) -> (form, weight, bias) or None
      where g is a linear map of z, its name and tensors as se_kernels._form_ops' ops
      take them (the staged path then runs one op each way where the backend has them).

`params` are the module's own tensors in their own shapes (a conv weight [C, C, 1, 1],
ECA's [1, 1, k]) cast to the accumulation dtype; the gradients come back in those shapes.
`fc` is how the fully connected layers run (se_kernels._fc_ops.FcLayer): the staged path
passes the extension's ops on CPU, where they multiply without packing the weights; the
default is F.linear and its products, which autograd records.
`stats` is the batch mean and biased variance of a normalization that ran on batch
statistics (the caller updates the running ones), else None.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._fc_ops import TORCH as TORCH_FC
from .backends.torch_backend import activation_function, activation_gradient
from .options import LEAKY_RELU, LEAKY_RELU_SLOPE


def _expect(form: str, name: str, t, shapes: tuple[tuple[int, ...], ...], optional=False) -> None:
    """ValueError naming `form`'s parameter `name` unless it has one of `shapes`."""
    if t is None:
        if optional:
            return
        raise ValueError(f"{form}: {name} is required")
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{form}: {name} must be a floating-point tensor, got {t!r:.60}")
    if tuple(t.shape) not in shapes:
        raise ValueError(f"{form}: {name} must have shape "
                         f"{' or '.join(str(list(s)) for s in shapes)}, got {list(t.shape)}")


def _matrix(rows: int, cols: int) -> tuple[tuple[int, ...], ...]:
    """A linear layer's weight, or the 1x1 convolution's that is the same matrix."""
    return (rows, cols), (rows, cols, 1, 1)


def _sum0(t: torch.Tensor) -> torch.Tensor:
    return t.sum(0)


def _linear_backward(fc, dout: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor,
                     has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """d(input), d(weight) (weight's shape) and d(bias) of out = inp @ W.T + b, W the
    weight viewed as a matrix, through `fc`."""
    dinp, dw, db = fc.backward(dout, inp, weight.reshape(dout.shape[1], inp.shape[1]), has_bias)
    return dinp, dw.reshape(weight.shape), db if has_bias else None


@dataclass(frozen=True)
class Mlp:
    """g = W2·act(norm(W1·z + b1)) + b2. params: (w1, b1, w2, b2, norm_weight, norm_bias,
    running_mean, running_var); the last four are None without a norm, the running
    statistics None when `batch_stats` (the norm then normalizes with the batch's)."""

    activation: str
    negative_slope: float
    norm: bool = False
    batch_stats: bool = False
    eps: float = 1e-5

    def check(self, c: int, params) -> None:
        if len(params) != 8:
            raise ValueError(f"Mlp takes 8 parameters, got {len(params)}")
        w1, b1, w2, b2, nw, nb, rm, rv = params
        _expect("Mlp", "w1", w1, ((w1.shape[0], c), (w1.shape[0], c, 1, 1)) if
                isinstance(w1, torch.Tensor) and w1.dim() else ((0, c),))
        s = w1.shape[0]
        _expect("Mlp", "b1", b1, ((s,),), optional=True)
        _expect("Mlp", "w2", w2, _matrix(c, s))
        _expect("Mlp", "b2", b2, ((c,),), optional=True)
        for name, t in (("norm weight", nw), ("norm bias", nb)):
            _expect("Mlp", name, t, ((s,),), optional=True)
        if self.norm and not self.batch_stats:
            _expect("Mlp", "running_mean", rm, ((s,),))
            _expect("Mlp", "running_var", rv, ((s,),))

    @property
    def fuses(self) -> bool:
        """A norm on running statistics is a fixed affine map of W1·z + b1, so it folds into
        the first FC; batch statistics or a leaky_relu slope other than the op's have no
        two-FC form."""
        return not self.batch_stats and (self.activation != LEAKY_RELU
                                         or self.negative_slope == LEAKY_RELU_SLOPE)

    def fused_weights(self, params):
        """(w1, b1, w2, b2) of the fused op's two FCs computing this form, where it `fuses`;
        the norm's gradients flow back through the fold."""
        w1, b1, w2, b2, nw, nb, rm, rv = params
        if not self.norm:
            return w1, b1, w2, b2
        scale = torch.rsqrt(rv + self.eps)
        if nw is not None:
            scale = scale * nw
        shift = (b1 - rm if b1 is not None else -rm) * scale
        if nb is not None:
            shift = shift + nb
        return w1.reshape(w1.shape[0], -1) * scale[:, None], shift, w2, b2

    def linear_form(self, params):
        return None

    def _norm_forward(self, a, weight, bias, running_mean, running_var):
        if not self.batch_stats:
            # The running statistics: a fixed affine map, one BatchNormalization in export.
            return F.batch_norm(a, running_mean, running_var, weight, bias, False, 0.0,
                                self.eps), None
        if a.shape[0] < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got input "
                             f"size {list(a.shape) + [1, 1]}")
        mean = a.mean(0)
        var = (a - mean).square().mean(0)
        rstd = torch.rsqrt(var + self.eps)
        u = (a - mean) * rstd
        if weight is not None:
            u = u * weight
        if bias is not None:
            u = u + bias
        return u, (mean, var)

    def forward(self, z, params, fc=TORCH_FC):
        w1, b1, w2, b2, nw, nb, rm, rv = params
        s = w1.shape[0]
        a = fc.forward(z, w1.reshape(s, -1), b1)
        u, stats = self._norm_forward(a, nw, nb, rm, rv) if self.norm else (a, None)
        h = activation_function(self.activation, self.negative_slope)(u)
        g = fc.forward(h, w2.reshape(-1, s), b2)
        return g, (a,), stats

    def backward(self, dg, z, params, saved, fc=TORCH_FC):
        w1, b1, w2, b2, nw, nb, rm, rv = params
        (a,) = saved
        n = a.shape[0]
        if self.norm:
            if self.batch_stats:
                mean = a.mean(0)
                var = (a - mean).square().mean(0)
            else:
                mean, var = rm, rv
            rstd = torch.rsqrt(var + self.eps)
            xhat = (a - mean) * rstd
            u = xhat * nw if nw is not None else xhat
            if nb is not None:
                u = u + nb
        else:
            u = a
        h = activation_function(self.activation, self.negative_slope)(u)
        dh, dw2, db2 = _linear_backward(fc, dg, h, w2, b2 is not None)
        du = activation_gradient(self.activation, self.negative_slope)(u, dh)
        dnw = dnb = None
        if self.norm:
            dnw = _sum0(du * xhat) if nw is not None else None
            dnb = _sum0(du) if nb is not None else None
            dxhat = du * nw if nw is not None else du
            if self.batch_stats:
                da = rstd * (dxhat - _sum0(dxhat) / n - xhat * _sum0(dxhat * xhat) / n)
            else:
                da = dxhat * rstd
        else:
            da = du
        dz, dw1, db1 = _linear_backward(fc, da, z, w1, b1 is not None)
        return dz, (dw1, db1, dw2, db2, dnw, dnb, None, None)


@dataclass(frozen=True)
class Fc:
    """g = W·z + b, one FC C -> C (effective SE). params: (w, b)."""

    fuses = False

    def linear_form(self, params):
        w, b = params
        return "fc", w.reshape(w.shape[0], w.shape[1]), b

    def check(self, c: int, params) -> None:
        w, b = params
        _expect("Fc", "w", w, _matrix(c, c))
        _expect("Fc", "b", b, ((c,),), optional=True)

    def forward(self, z, params, fc=TORCH_FC):
        w, b = params
        return fc.forward(z, w.reshape(z.shape[1], z.shape[1]), b), (), None

    def backward(self, dg, z, params, saved, fc=TORCH_FC):
        w, b = params
        dz, dw, db = _linear_backward(fc, dg, z, w, b is not None)
        return dz, (dw, db)


def _circular_indices(c: int, pad: int, device) -> torch.Tensor:
    return torch.remainder(torch.arange(-pad, c + pad, device=device), c)


@dataclass(frozen=True)
class ChannelConv:
    """ECA: g = conv1d over the channels with an odd kernel, zero or circular padding, and
    an optional bias. params: (w [1, 1, k] or [k], b [1] or None). No FC layer: `fc` is
    unused."""

    kernel: int
    circular: bool = False

    fuses = False

    def linear_form(self, params):
        w, b = params
        return "circular_conv" if self.circular else "conv", w.reshape(self.kernel), b

    def check(self, c: int, params) -> None:
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"ChannelConv: kernel must be odd and >= 1, got {self.kernel}")
        w, b = params
        _expect("ChannelConv", "w", w, ((self.kernel,), (1, 1, self.kernel)))
        _expect("ChannelConv", "b", b, ((1,),), optional=True)

    @property
    def pad(self) -> int:
        return (self.kernel - 1) // 2

    def _padded(self, z):
        # unsqueeze and squeeze rather than indexing with None: a batch-1 call's Python
        # entry is most of its cost, and indexing is the slower way to the same view.
        z3 = z.unsqueeze(1)
        if not self.circular:
            return z3
        return z3.index_select(2, _circular_indices(z.shape[1], self.pad, z.device))

    def forward(self, z, params, fc=TORCH_FC):
        w, b = params
        g = F.conv1d(self._padded(z), w.view(1, 1, self.kernel), b,
                     padding=0 if self.circular else self.pad)
        return g.squeeze(1), (), None

    def backward(self, dg, z, params, saved, fc=TORCH_FC):
        w, b = params
        zp = self._padded(z)
        dzp, dw, db = torch.ops.aten.convolution_backward(
            dg.unsqueeze(1), zp, w.view(1, 1, self.kernel), [1] if b is not None else None,
            [1], [0 if self.circular else self.pad], [1], False, [0], 1,
            [True, True, b is not None])
        dzp = dzp.squeeze(1)
        if self.circular:
            # Each padded position's gradient goes back to the channel it copies: a product
            # with the one-hot gather matrix, in a fixed order (index_add_ would use atomics
            # on a GPU).
            gather = _circular_indices(z.shape[1], self.pad, z.device)
            dz = dzp @ F.one_hot(gather, z.shape[1]).to(dzp.dtype)
        else:
            dz = dzp
        return dz, (dw.reshape(w.shape), db.reshape(b.shape) if b is not None else None)


@dataclass(frozen=True)
class ChannelConvMlp:
    """ECA's MLP form: h[n, j, c] = act(w1[j]·z[n, c] + b1[j]) for j < R, then g = conv1d
    of h (R channels -> 1, odd kernel, zero padding) + b2. params: (w1 [R, 1, 1], b1 [R],
    w2 [1, R, k], b2 [1]). No FC layer: `fc` is unused."""

    kernel: int
    activation: str
    negative_slope: float

    fuses = False

    def linear_form(self, params):
        return None

    def check(self, c: int, params) -> None:
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"ChannelConvMlp: kernel must be odd and >= 1, got {self.kernel}")
        w1, b1, w2, b2 = params
        r = w1.shape[0] if isinstance(w1, torch.Tensor) and w1.dim() == 3 else 0
        _expect("ChannelConvMlp", "w1", w1, ((r, 1, 1),) if r else ((1, 1, 1),))
        _expect("ChannelConvMlp", "b1", b1, ((r,),), optional=True)
        _expect("ChannelConvMlp", "w2", w2, ((1, r, self.kernel),))
        _expect("ChannelConvMlp", "b2", b2, ((1,),), optional=True)

    def forward(self, z, params, fc=TORCH_FC):
        w1, b1, w2, b2 = params
        a = F.conv1d(z[:, None, :], w1, b1)
        h = activation_function(self.activation, self.negative_slope)(a)
        g = F.conv1d(h, w2, b2, padding=(self.kernel - 1) // 2)
        return g[:, 0, :], (a,), None

    def backward(self, dg, z, params, saved, fc=TORCH_FC):
        w1, b1, w2, b2 = params
        (a,) = saved
        h = activation_function(self.activation, self.negative_slope)(a)
        dh, dw2, db2 = torch.ops.aten.convolution_backward(
            dg[:, None, :], h, w2, [1] if b2 is not None else None, [1],
            [(self.kernel - 1) // 2], [1], False, [0], 1, [True, True, b2 is not None])
        da = activation_gradient(self.activation, self.negative_slope)(a, dh)
        w1v = w1.reshape(1, -1, 1)
        dz = (da * w1v).sum(1)
        dw1 = (da * z[:, None, :]).sum((0, 2)).reshape(w1.shape)
        db1 = da.sum((0, 2)) if b1 is not None else None
        return dz, (dw1, db1, dw2, db2 if b2 is not None else None)


FORMS = (Mlp, Fc, ChannelConv, ChannelConvMlp)
