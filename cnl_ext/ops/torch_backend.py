"""The ``"torch"`` backend: the CNL ops in plain PyTorch, for any device.

The math is defined per tensor, in plain PyTorch, next to each optimizer class (the definitions:
:func:`cnl_ext.optim.sgd.cnl_sgd_step`, :func:`cnl_ext.optim.adam.cnl_adam_step`,
:func:`cnl_ext.optim.wrapper.cnl_masked_delta`; tests/optim/test_definition.py); this backend computes
exactly that, bit for bit (float32 arithmetic, float64 for float64 parameters, whose states are
float64 too, in the definitions' order, the new parameter rounded once to its dtype), tuned: it is
the oracle the other tests compare kernels with. It follows the ops contract of :mod:`cnl_ext.ops`
and runs each step chunk by chunk (:mod:`.chunking`: the whole sequence of operations on a few
hundred KiB at a time, in cache, with reused buffers), each operation on a float32 1-D tensor of the
chunk (in the compute dtype, :func:`.chunking.compute_dtype`): a view of a tensor of that dtype itself,
or a copy (bf16/fp16 parameters, packed small tensors) stored back once, rounded.

For every element, with ``u`` the optimizer's update direction (``θ ← θ − lr·u``) and ``r`` the
reference gradient::

    conflicting = (r > 0 and u < 0) or (r < 0 and u > 0)      # sign(r)·sign(u) < 0
    θ ← θ                   if conflicting
    θ ← θ − lr·u            otherwise                            (optimizer states: always updated)

(Adam tests the signs of ``lr·u``, the step itself, and scales its sums of ``r·(lr·u)`` by 1/lr.)
"""
from __future__ import annotations

import torch

from ..reference_format import conflicting
from .adam_scalars import capturable_step_scalars, correctly_rounded_sqrt, decay_scalars, inverse_lr, step_size_of
from .chunking import chunks, compute_dtype
from .contract import OPS, Capabilities
from .importance import importance_update_
from .rules import agem_dot_, applies, scalar_in
from .kif_fusion_torch import recurrent_fuse_ as kif_recurrent_fuse_
from .kif_fusion_torch import task_vector_fuse_ as kif_task_vector_fuse_

NAME = "torch"

__all__ = ["NAME", "unavailable_reason", "capabilities", "conflicting", "sgd_step_", "adam_step_", "masked_delta_",
           "agem_dot_", "kif_task_vector_fuse_", "kif_recurrent_fuse_"]


def unavailable_reason() -> str:
    """Always usable: plain PyTorch."""
    return ""


_EVERYTHING = Capabilities(frozenset(OPS), float64=True, capturable=True, importance=True)


def capabilities(device: torch.device) -> Capabilities:
    """Every op, on every device, with every option (float64 parameters included)."""
    return _EVERYTHING


_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}


def _where(condition, a, b, out):
    """``torch.where(condition, a, b)`` of float32 (or float64) tensors, into ``out``, bit for bit: as
    ``b ^ ((a ^ b)·condition)`` on their bits (torch.where's CPU kernel branches per element, ~9×
    slower on a mask of random signs)."""
    bits = _BITS[a.dtype]
    a_bits, b_bits, out_bits = (t.view(bits) for t in (a, b, out))
    torch.bitwise_xor(a_bits, b_bits, out=out_bits).mul_(condition).bitwise_xor_(b_bits)
    return out


def _compute_lr(lr, dtype):
    """``lr`` for arithmetic in ``dtype``: a float as it is, a (capturable) tensor in ``dtype``, so
    that derived scalars such as ``1 − lr·λ`` are computed in it too."""
    return lr.to(dtype) if isinstance(lr, torch.Tensor) else lr


class _Rules:
    """Issue 22's terms of one call (:mod:`.rules`), applied chunk by chunk in the definition's order."""

    def __init__(self, references, ewc, ewc_lambda, agem_coefficient, dtype, device):
        self.project, self.ewc = applies(references, ewc, ewc_lambda, agem_coefficient)
        self.on = self.project or self.ewc
        self.c = scalar_in(agem_coefficient, dtype, device) if self.project else None
        self.two_lambda = scalar_in(2.0 * ewc_lambda, dtype, device) if self.ewc else None
        self.fishers, self.anchors = ewc if self.ewc else (None, None)

    def mask(self, references, stats):
        """(references, stats) of the CNL mask: none with A-GEM (the references projected)."""
        return (None, None) if self.project else (references, stats)

    def apply_(self, chunk, g, p, references, fmt):
        """``g`` (this chunk's gradient after maximize's sign, a copy) ← g − c·r, then + 2λ·(F·(p − θ*))."""
        if self.project:
            g.sub_(torch.mul(chunk.read_reference(references, fmt), self.c, out=chunk.scratch()))
        if self.ewc:
            d = torch.sub(p, chunk.read(self.anchors), out=chunk.scratch())
            g.add_(d.mul_(chunk.read(self.fishers)).mul_(self.two_lambda))


def _write_masked(chunk, params, old, new, update, references, fmt, stats):
    """Store ``new`` into this chunk of ``params`` where collaborative (everywhere without a
    reference), ``old`` where conflicting (without a reference, ``new`` may be ``old`` updated in
    place). With ``stats``, row ``i`` gets (collaborative count, Σs collaborative, Σs conflicting), ``s = r·u``.
    """
    if references is None:
        chunk.write(params, new)
        return
    r = chunk.read_reference(references, fmt)
    conflict = conflicting(r, update)
    if stats is not None:
        s = torch.mul(r, update, out=chunk.scratch())
        collaborative = ~conflict
        chunk.add_sums(stats, [collaborative, torch.where(collaborative, s, 0.0), torch.where(conflict, s, 0.0)])
    chunk.write(params, _where(conflict, old, new, out=chunk.scratch()))


@torch.no_grad()
def sgd_step_(params, grads, momentum_buffers, references, stats, *, reference_format: str, lr,
              weight_decay: float, momentum: float, dampening: float, nesterov: bool, maximize: bool,
              first_step: bool, importance=None, importance_kind: str = "first",
              importance_betas=(0.85, 0.85), ewc=None, ewc_lambda=0.0, agem_coefficient=None) -> None:
    """SGD (``momentum_buffers is None``) or momentum SGD, as torch.optim.SGD, with the CNL mask.

    ``importance``: ``None`` or (sensitivities, uncertainties), KIF's EMAs, updated after the step
    from the new parameters and ``grads`` (:func:`cnl_ext.ops.importance.importance_update_`).
    ``ewc``, ``ewc_lambda``, ``agem_coefficient``: the rule's terms (:mod:`cnl_ext.ops.rules`), in the
    same chunk loop."""
    dtype = compute_dtype(params[0].dtype)
    lr = _compute_lr(lr, dtype)
    rules = _Rules(references, ewc, ewc_lambda, agem_coefficient, dtype, params[0].device)
    projected, (references, stats) = references, rules.mask(references, stats)
    for chunk in chunks(params, dtype=dtype):
        p = chunk.read(params)
        g = chunk.read(grads, copy=maximize or weight_decay != 0 or rules.on)  # a copy where it is changed
        t = chunk.scratch()
        if maximize:
            g.neg_()
        if rules.on:
            rules.apply_(chunk, g, p, projected, reference_format)
        if weight_decay != 0:
            g.add_(torch.mul(p, weight_decay, out=t))
        if momentum_buffers is None:
            u = g
        else:
            b = chunk.read(momentum_buffers)
            if first_step:  # torch.optim.SGD starts the buffer at the first gradient, undamped
                b.copy_(g)
            else:
                b.mul_(momentum).add_(torch.mul(g, 1 - dampening, out=t))
            chunk.write(momentum_buffers, b)
            u = torch.add(g, torch.mul(b, momentum, out=t), out=t) if nesterov else b
        step = torch.mul(u, lr, out=chunk.scratch())
        new = p.sub_(step) if references is None else torch.sub(p, step, out=step)
        _write_masked(chunk, params, p, new, u, references, reference_format, stats)
    if importance is not None:
        importance_update_(params, grads, *importance, kind=importance_kind, betas=importance_betas)


@torch.no_grad()
def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, references, stats, *,
               reference_format: str, lr, beta1: float, beta2: float, eps: float,
               weight_decay: float, decoupled_weight_decay: bool, amsgrad: bool, maximize: bool,
               bias_correction1: float = None, bias_correction2: float = None, device_steps=None,
               importance=None, importance_kind: str = "first", importance_betas=(0.85, 0.85), ewc=None,
               ewc_lambda=0.0, agem_coefficient=None) -> None:
    """Adam (L2 weight decay) or AdamW (decoupled), as torch.optim.Adam/AdamW, with the CNL mask: the
    definition :func:`cnl_ext.optim.adam.cnl_adam_step`, in chunks (the rule's terms: as :func:`sgd_step_`).

    For AdamW the decay term is part of ``u`` (spec), so a frozen element is not decayed either.
    With ``device_steps`` (capturable), the bias corrections come from each tensor's step count on
    the device, and ``lr`` may be a device scalar: nothing here reads a value back to the host.
    """
    dtype = compute_dtype(params[0].dtype)
    device = params[0].device
    rules = _Rules(references, ewc, ewc_lambda, agem_coefficient, dtype, device)
    projected, (references, stats) = references, rules.mask(references, stats)
    if device_steps is None:  # one (step_size, sqrt(bc2)) for all tensors: floats in double, or device scalars
        bc2_sqrt = bias_correction2**0.5
        if device.type != "cpu":  # CUDA divides by a host scalar as a product with its reciprocal
            bc2_sqrt = torch.full((), bc2_sqrt, dtype=dtype, device=device)
        per_call = step_size_of(lr, bias_correction1, dtype), bc2_sqrt
    else:  # per tensor, on the device
        per_tensor = capturable_step_scalars(lr, beta1, beta2, device_steps, dtype)
    lr_decay, decay_factor = decay_scalars(lr, weight_decay, dtype)
    rows = None if stats is None else torch.zeros_like(stats)  # of lr·u, scaled by 1/lr once at the end
    for chunk in chunks(params, pack=device_steps is None, dtype=dtype):  # per-tensor scalars: one tensor per chunk
        step_size, bc2_sqrt = per_call if device_steps is None else per_tensor[chunk.tensor]
        p = chunk.read(params)
        g = chunk.read(grads, copy=maximize or (weight_decay != 0 and not decoupled_weight_decay) or rules.on)
        m, v = chunk.read(exp_avgs), chunk.read(exp_avg_sqs)
        t, denom = chunk.scratch(), chunk.scratch()
        if maximize:
            g.neg_()
        if rules.on:
            rules.apply_(chunk, g, p, projected, reference_format)
        if weight_decay != 0 and not decoupled_weight_decay:
            g.add_(torch.mul(p, weight_decay, out=t))
        # m ← β1·m + (1−β1)·g ; v ← β2·v + (1−β2)·g², each product rounded before the sum
        m.mul_(beta1).add_(torch.mul(g, 1 - beta1, out=t))
        v.mul_(beta2).add_(torch.mul(g, g, out=t).mul_(1 - beta2))
        chunk.write(exp_avgs, m)
        chunk.write(exp_avg_sqs, v)
        second = v
        if amsgrad:
            second = chunk.read(max_exp_avg_sqs)
            torch.maximum(second, v, out=second)
            chunk.write(max_exp_avg_sqs, second)
        # step = (step_size·m) / (sqrt(v)/sqrt(bc2) + ε): torch.optim's order
        correctly_rounded_sqrt(second, out=denom).div_(bc2_sqrt).add_(eps)
        step = torch.mul(m, step_size, out=t).div_(denom)
        if decoupled_weight_decay and weight_decay != 0:
            # torch.optim.AdamW's order: θ·(1 − lr·λ) − step; lr·u = step + (lr·λ)·θ
            lr_u = None if references is None else torch.add(step, torch.mul(p, lr_decay, out=denom), out=denom)
            new = p if references is None else chunk.scratch()
            torch.mul(p, decay_factor, out=new).sub_(step)
        else:
            new = p.sub_(step) if references is None else torch.sub(p, step, out=chunk.scratch())
            lr_u = step
        _write_masked(chunk, params, p, new, lr_u, references, reference_format, rows)
    if rows is not None:
        rows[:, 1:] *= inverse_lr(lr, dtype)
        stats += rows
    if importance is not None:  # see sgd_step_
        importance_update_(params, grads, *importance, kind=importance_kind, betas=importance_betas)


@torch.no_grad()
def masked_delta_(params, befores, references, stats, *, reference_format: str, inv_lr: float) -> None:
    """The write-back of :class:`cnl_ext.CNL`: after any optimizer's step, with ``Δ = θ_after −
    θ_before`` and ``u = −Δ/lr``, put ``θ_before`` back where ``sign(r)·sign(u) < 0``.

    ``params`` hold θ_after and are written in place; ``befores`` are contiguous copies of
    θ_before. ``stats`` rows get the sums of ``s = r·u`` with ``u = −Δ·inv_lr``.
    """
    rows = None if stats is None else torch.zeros_like(stats)
    for chunk in chunks(params, dtype=compute_dtype(params[0].dtype)):
        before, after = chunk.read(befores), chunk.read(params)
        # The mask takes its signs from −Δ itself (exact in float32), not from −Δ·inv_lr, which could
        # underflow to 0; the sums of s are scaled by 1/lr once, after.
        minus_delta = torch.sub(before, after, out=chunk.scratch())
        _write_masked(chunk, params, before, after, minus_delta, references, reference_format, rows)
    if rows is not None:
        rows[:, 1:] *= inv_lr
        stats += rows
