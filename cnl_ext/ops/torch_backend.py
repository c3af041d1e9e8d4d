"""The ``"torch"`` backend: the CNL ops in plain PyTorch, for any device.

It is the oracle every kernel is tested against and the definition of rounding: float32 arithmetic
in the order written here, the new parameter rounded once to its dtype. Read it next to the spec
(the update rule and the per-optimizer table). It follows the ops contract of :mod:`cnl_ext.ops`
and runs each step as ``torch._foreach_*`` calls over the whole bucket, with no more temporaries
than the math needs (a float32 parameter is updated in place; only bf16/fp16 ones take a float32
copy).

For every element, with ``u`` the optimizer's update direction (``θ ← θ − lr·u``) and ``r`` the
reference gradient::

    conflicting = (r > 0 and u < 0) or (r < 0 and u > 0)      # sign(r)·sign(u) < 0
    θ ← θ                   if conflicting
    θ ← θ − lr·u            otherwise                            (optimizer states: always updated)
"""
from __future__ import annotations

import torch

from .. import reference_format as rf
from .importance import importance_update_
from .kif_fusion_torch import recurrent_fuse_ as kif_recurrent_fuse_
from .kif_fusion_torch import task_vector_fuse_ as kif_task_vector_fuse_

NAME = "torch"

__all__ = ["NAME", "unavailable_reason", "supports", "conflicting", "sgd_step_", "adam_step_", "masked_delta_",
           "kif_task_vector_fuse_", "kif_recurrent_fuse_"]


def unavailable_reason() -> str:
    """Always usable: plain PyTorch."""
    return ""


def supports(device: torch.device, op: str) -> bool:
    """Every op, on every device."""
    return op in ("sgd_step_", "adam_step_", "masked_delta_", "capturable", "importance", "kif_task_vector_fuse_",
                  "kif_recurrent_fuse_")


def conflicting(reference: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the elements whose update disagrees in sign with the reference.

    Defined by signs (spec), so an element whose reference or update is exactly 0 is collaborative.
    """
    return ((reference > 0) & (update < 0)) | ((reference < 0) & (update > 0))


def _float32(tensors):
    """The tensors as float32: themselves when they already are (no copy), else float32 copies."""
    return [t if t.dtype == torch.float32 else t.to(torch.float32) for t in tensors]


def _subtract(params32, step, *, in_place):
    """``params32 − step``: written into ``params32`` when nothing needs their old values (no mask)."""
    if in_place:
        torch._foreach_sub_(params32, step)
        return params32
    return torch._foreach_sub(params32, step)


def _write_masked(params, params32, new32, updates, references, fmt, stats):
    """Write ``new32`` into ``params`` where collaborative (everywhere without a reference).

    ``params32`` may be ``params`` themselves (float32), so the masked value is taken from it before
    ``params`` is written. With ``stats``, row ``i`` gets (collaborative count, Σs collaborative,
    Σs conflicting), ``s = r·u``.
    """
    if references is None:
        if new32[0] is not params[0]:  # computed in a float32 copy (bf16/fp16 params, or the write-back)
            torch._foreach_copy_(params, new32)
        return
    for i, (p, p32, new, u, stored) in enumerate(zip(params, params32, new32, updates, references)):
        r = rf.decode(stored, fmt, p.shape)
        conflict = conflicting(r, u)
        if stats is not None:
            s = r * u
            collaborative = ~conflict
            stats[i] += torch.stack([
                collaborative.sum(dtype=torch.float64),
                torch.where(collaborative, s, 0.0).sum(dtype=torch.float64),
                torch.where(conflict, s, 0.0).sum(dtype=torch.float64),
            ])
        p.copy_(torch.where(conflict, p32, new))


@torch.no_grad()
def sgd_step_(params, grads, momentum_buffers, references, stats, *, reference_format: str, lr,
              weight_decay: float, momentum: float, dampening: float, nesterov: bool, maximize: bool,
              first_step: bool, importance=None, importance_kind: str = "first",
              importance_betas=(0.85, 0.85)) -> None:
    """SGD (``momentum_buffers is None``) or momentum SGD, as torch.optim.SGD, with the CNL mask.

    ``importance``: ``None`` or (sensitivities, uncertainties), KIF's EMAs, updated after the step
    from the new parameters and ``grads`` (:func:`cnl_ext.ops.importance.importance_update_`)."""
    params32 = _float32(params)
    g = _float32(grads)
    if maximize:
        g = torch._foreach_neg(g)
    if weight_decay != 0:
        g = torch._foreach_add(g, torch._foreach_mul(params32, weight_decay))
    if momentum_buffers is None:
        u = g
    else:
        if first_step:  # torch.optim.SGD starts the buffer at the first gradient, undamped
            torch._foreach_copy_(momentum_buffers, g)
        else:
            torch._foreach_mul_(momentum_buffers, momentum)
            torch._foreach_add_(momentum_buffers, torch._foreach_mul(g, 1 - dampening))
        u = torch._foreach_add(g, torch._foreach_mul(momentum_buffers, momentum)) if nesterov else momentum_buffers
    step = torch._foreach_mul(u, lr)
    new = _subtract(params32, step, in_place=references is None)
    _write_masked(params, params32, new, u, references, reference_format, stats)
    if importance is not None:
        importance_update_(params, grads, *importance, kind=importance_kind, betas=importance_betas)


@torch.no_grad()
def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, references, stats, *,
               reference_format: str, lr, beta1: float, beta2: float, eps: float,
               weight_decay: float, decoupled_weight_decay: bool, amsgrad: bool, maximize: bool,
               bias_correction1: float = None, bias_correction2: float = None, device_steps=None,
               importance=None, importance_kind: str = "first", importance_betas=(0.85, 0.85)) -> None:
    """Adam (L2 weight decay) or AdamW (decoupled), as torch.optim.Adam/AdamW, with the CNL mask.

    For AdamW the decay term is part of ``u`` (spec), so a frozen element is not decayed either.
    With ``device_steps`` (capturable), the bias corrections come from each tensor's step count on
    the device, and ``lr`` may be a device scalar: nothing here reads a value back to the host.
    """
    params32 = _float32(params)
    g = _float32(grads)
    if maximize:
        g = torch._foreach_neg(g)
    if weight_decay != 0 and not decoupled_weight_decay:
        g = torch._foreach_add(g, torch._foreach_mul(params32, weight_decay))
    # m ← β1·m + (1−β1)·g ; v ← β2·v + (1−β2)·g², each product rounded before the sum
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, torch._foreach_mul(g, 1 - beta1))
    torch._foreach_mul_(exp_avg_sqs, beta2)
    g_squared = torch._foreach_mul(g, g)
    torch._foreach_mul_(g_squared, 1 - beta2)
    torch._foreach_add_(exp_avg_sqs, g_squared)
    del g_squared
    second = exp_avg_sqs
    if amsgrad:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        second = max_exp_avg_sqs
    # adam = (m / bc1) / (sqrt(v) / sqrt(bc2) + ε), computed in place in one temporary list
    denom = torch._foreach_sqrt(second)
    if device_steps is None:
        torch._foreach_div_(denom, bias_correction2**0.5)
        torch._foreach_add_(denom, eps)
        adam = torch._foreach_div(exp_avgs, bias_correction1)
    else:
        bias_correction1s = torch._foreach_pow(beta1, device_steps)
        torch._foreach_neg_(bias_correction1s)
        torch._foreach_add_(bias_correction1s, 1)
        bias_correction2s = torch._foreach_pow(beta2, device_steps)
        torch._foreach_neg_(bias_correction2s)
        torch._foreach_add_(bias_correction2s, 1)
        torch._foreach_sqrt_(bias_correction2s)
        torch._foreach_div_(denom, bias_correction2s)
        torch._foreach_add_(denom, eps)
        adam = torch._foreach_div(exp_avgs, bias_correction1s)
    torch._foreach_div_(adam, denom)
    del denom
    step = torch._foreach_mul(adam, lr)
    if decoupled_weight_decay and weight_decay != 0:
        # torch.optim.AdamW's order: θ·(1 − lr·λ) − lr·adam; u = adam + λ·θ
        u = None if references is None else torch._foreach_add(adam, torch._foreach_mul(params32, weight_decay))
        if references is None:
            torch._foreach_mul_(params32, 1 - lr * weight_decay)
            new = _subtract(params32, step, in_place=True)
        else:
            new = _subtract(torch._foreach_mul(params32, 1 - lr * weight_decay), step, in_place=True)
    else:
        new = _subtract(params32, step, in_place=references is None)
        u = adam
    del step
    _write_masked(params, params32, new, u, references, reference_format, stats)
    if importance is not None:  # see sgd_step_
        importance_update_(params, grads, *importance, kind=importance_kind, betas=importance_betas)


@torch.no_grad()
def masked_delta_(params, befores, references, stats, *, reference_format: str, inv_lr: float) -> None:
    """The write-back of :class:`cnl_ext.CNL`: after any optimizer's step, with ``Δ = θ_after −
    θ_before`` and ``u = −Δ/lr``, put ``θ_before`` back where ``sign(r)·sign(u) < 0``.

    ``params`` hold θ_after and are written in place; ``befores`` are contiguous copies of
    θ_before. ``stats`` rows get the sums of ``s = r·u`` with ``u = −Δ·inv_lr``.
    """
    before32, after32 = _float32(befores), _float32(params)
    # The mask takes its signs from −Δ itself (exact in float32), not from −Δ·inv_lr, which could
    # underflow to 0; the sums of s are scaled by 1/lr once, after.
    minus_delta = torch._foreach_sub(before32, after32)
    rows = None if stats is None else torch.zeros_like(stats)
    _write_masked(params, before32, after32, minus_delta, references, reference_format, rows)
    if rows is not None:
        rows[:, 1:] *= inv_lr
        stats += rows
