"""The stream ops' calls of a staged or block-tail call, made on fake tensors for `se-kernels
plan` (se_kernels.plan).

The paths' own code (staged.forward_passes and backward_passes, tail.forward_passes and
backward_passes) runs on fake CUDA tensors (no GPU, no memory) with the stream ops a GPU
backend gives: functions of the ops' schemas that plan each call with the backend's own
planning code and record it instead of launching it. What runs between the passes (the
statistics, the excitation, the backward's algebra) is PyTorch work on [N, C] and [C]
vectors, which the plan leaves out. The excitation is an MLP of `squeeze` hidden units:
every form gives the same passes.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from . import _compat, _stream_ops, staged, tail
from .excitation import Mlp
from .options import NONE, OUT_RELU, RELU, SIGMOID
from .schedule import STREAMS, TAIL, PlanCall

Ops = dict[str, Callable]
Names = dict[StorageWeakRef, str]


def storage(t: torch.Tensor) -> StorageWeakRef:
    return StorageWeakRef(t.untyped_storage())


def _naming(ops: Ops, names: Names) -> Ops:
    """`ops`, each naming its x-sized outputs (out, dx, dresidual) as the plan does."""
    def naming(name: str, op: Callable) -> Callable:
        def run(*args):
            outputs = op(*args)
            for role, t in _stream_ops.named(name, (), outputs).items():
                if role in STREAMS and t.numel():
                    names.setdefault(storage(t), role)
            return outputs
        return run
    return {name: naming(name, op) for name, op in ops.items()}


def run_passes(call: PlanCall, forward_ops: Ops, backward_ops: Ops) -> Names:
    """Runs `call` (a staged or tail PlanCall) forward with `forward_ops` as its stream ops,
    then backward with `backward_ops`, and returns the plan names (STREAMS) of the x-sized
    tensors by storage. The tail runs in training, on the batch's statistics; a residual
    (the tail's shortcut) takes a gradient."""
    fmt = torch.channels_last if call.channels_last else torch.contiguous_format
    out_activation = OUT_RELU if call.out_relu else NONE
    form = Mlp(RELU, 0.0)
    names: Names = {}
    forward_ops, backward_ops = _naming(forward_ops, names), _naming(backward_ops, names)
    with _compat.fake_tensor_mode():
        like = dict(device="cuda", dtype=call.dtype)
        x = torch.empty(call.n, call.c, call.h, call.w, **like).contiguous(memory_format=fmt)
        residual = torch.empty_like(x) if call.residual else None
        params = (torch.empty(call.squeeze, call.c, **like), torch.empty(call.squeeze, **like),
                  torch.empty(call.c, call.squeeze, **like), torch.empty(call.c, **like),
                  None, None, None, None)
        for name, t in (("x", x), ("residual", residual)):
            if t is not None:
                names[storage(t)] = name
        if call.path == TAIL:
            static = (True, 1e-5, form, SIGMOID, out_activation, None, call.activation)
            norm = tuple(torch.empty(call.c, **like) for _ in range(4))
            out, _, _, saved = tail.forward_passes(forward_ops, static, x, residual, None, *norm,
                                                   params)

            def backward(grad_out):
                tail.backward_passes(backward_ops, static, len(params), call.residual, grad_out,
                                     saved)
        else:
            out, _, saved = staged.forward_passes(forward_ops, form, SIGMOID, call.pool,
                                                  out_activation, x, residual, params)

            def backward(grad_out):
                staged.backward_passes(backward_ops, form, SIGMOID, call.pool, out_activation,
                                       call.residual, grad_out, x,
                                       out if call.out_relu else None, *saved)
        grad_out = torch.empty_like(out)
        names[storage(grad_out)] = "grad_out"
        backward(grad_out)
    return names
