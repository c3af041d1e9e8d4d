"""The CNL step in plain PyTorch: the readable reference and the ``backend="torch"`` implementation.

Read it next to the spec (``docs``: the update rule and the per-optimizer table). It follows the
ops contract of :mod:`cnl_ext.ops` (lists of tensors, updated in place) so that every backend can
be checked against it element by element. It runs on any device, CPU included.

For every element, with ``u`` the optimizer's update direction (``θ ← θ − lr·u``) and ``r`` the
reference gradient::

    conflicting = (r > 0 and u < 0) or (r < 0 and u > 0)      # sign(r)·sign(u) < 0
    θ ← θ                   if conflicting
    θ ← θ − lr·u            otherwise                            (optimizer states: always updated)
"""
from __future__ import annotations

import torch

from . import reference_format


def conflicting(reference: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the elements whose update disagrees in sign with the reference.

    Defined by signs (spec), so an element whose reference or update is exactly 0 is collaborative.
    """
    return ((reference > 0) & (update < 0)) | ((reference < 0) & (update > 0))


def _apply_masked(param, param32, new_param32, update, stored_reference, fmt, stats_row):
    """Write ``new_param32`` into ``param`` where collaborative; accumulate the statistics."""
    if stored_reference is None:
        param.copy_(new_param32)
        return
    r = reference_format.decode(stored_reference, fmt, param.shape)
    conflict = conflicting(r, update)
    if stats_row is not None:
        s = r * update
        collaborative = ~conflict
        stats_row += torch.stack(
            [
                collaborative.sum(dtype=torch.float64),
                torch.where(collaborative, s, 0.0).sum(dtype=torch.float64),
                torch.where(conflict, s, 0.0).sum(dtype=torch.float64),
            ]
        )
    param.copy_(torch.where(conflict, param32, new_param32))


def _signed_grad(grad, maximize):
    g = grad.to(torch.float32)
    return -g if maximize else g


@torch.no_grad()
def sgd_step_(params, grads, momentum_buffers, references, stats, *, reference_format: str, lr,
              weight_decay: float, momentum: float, dampening: float, nesterov: bool, maximize: bool,
              first_step: bool) -> None:
    """SGD (``momentum_buffers is None``) or momentum SGD, as torch.optim.SGD, with the CNL mask."""
    for i, (p, grad) in enumerate(zip(params, grads)):
        p32 = p.to(torch.float32)
        g = _signed_grad(grad, maximize)
        if weight_decay != 0:
            g = g + weight_decay * p32
        if momentum_buffers is not None:
            buf = momentum_buffers[i]
            if first_step:  # torch.optim.SGD starts the buffer at the first gradient, undamped
                buf.copy_(g)
            else:
                buf.mul_(momentum).add_(g, alpha=1 - dampening)
            u = g + momentum * buf if nesterov else buf
        else:
            u = g
        _apply_masked(p, p32, p32 - lr * u, u, None if references is None else references[i],
                      reference_format, None if stats is None else stats[i])


@torch.no_grad()
def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, references, stats, *,
               reference_format: str, lr, beta1: float, beta2: float, eps: float,
               weight_decay: float, decoupled_weight_decay: bool, amsgrad: bool, maximize: bool,
               bias_correction1: float = None, bias_correction2: float = None, device_steps=None) -> None:
    """Adam (L2 weight decay) or AdamW (decoupled), as torch.optim.Adam/AdamW, with the CNL mask.

    For AdamW the decay term is part of ``u`` (spec), so a frozen element is not decayed either.
    With ``device_steps`` (capturable), the bias corrections come from each tensor's step count on
    the device, and ``lr`` may be a device scalar: nothing here reads a value back to the host.
    """
    for i, (p, grad) in enumerate(zip(params, grads)):
        if device_steps is not None:
            bias_correction1 = 1 - beta1 ** device_steps[i]
            bias_correction2 = 1 - beta2 ** device_steps[i]
        bias_correction2_sqrt = bias_correction2**0.5
        p32 = p.to(torch.float32)
        g = _signed_grad(grad, maximize)
        if weight_decay != 0 and not decoupled_weight_decay:
            g = g + weight_decay * p32
        m, v = exp_avgs[i], exp_avg_sqs[i]
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], v, out=max_exp_avg_sqs[i])
            v = max_exp_avg_sqs[i]
        denom = v.sqrt() / bias_correction2_sqrt + eps
        adam = m / bias_correction1 / denom
        if decoupled_weight_decay and weight_decay != 0:
            u = adam + weight_decay * p32
            new = p32 * (1 - lr * weight_decay) - lr * adam  # torch.optim.AdamW's order of operations
        else:
            u = adam
            new = p32 - lr * adam
        _apply_masked(p, p32, new, u, None if references is None else references[i],
                      reference_format, None if stats is None else stats[i])
