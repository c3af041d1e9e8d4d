"""Two more continual-learning rules of the fused optimizers: A-GEM's projection and EWC's penalty.

``rule="agem"`` (A-GEM, Chaudhry et al., "Efficient Lifelong Learning with A-GEM", ICLR 2019): with a
reference gradient ``r`` set, each step first projects the gradient ``g`` (after ``maximize``'s sign)
onto the half-space that does not raise the reference loss to first order::

    c = min(0, g·r) / (r·r)        (dots over every stepped parameter with a reference, all groups)
    g ← g − c·r

and then takes the optimizer's usual update, with no CNL mask. ``r·r`` is kept per parameter and
computed once per reference (:meth:`ReferenceStore.squared_norms`); ``g·r`` is one reduction per
step that reads ``g`` and ``r`` (all-reduced over the ranks when parameters are FSDP2 DTensors).
So an A-GEM step makes 2 passes over the tensors: that reduction, and the step.

EWC (Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017):
``ewc_lambda=λ`` adds the gradient of ``λ·Σ F⊙(θ−θ*)²``, i.e. ``2λ·F⊙(θ−θ*)``, to the gradient,
before the optimizer's own (L2) weight decay; ``F`` (float32) and ``θ*`` (the parameter's dtype) are
per-parameter states ``ewc_fisher`` and ``ewc_anchor`` that :meth:`capture_fisher` sets:
the mean of the squared gradients of the ``f.backward(loss)`` calls inside it (the empirical Fisher
diagonal), added to ``ewc_decay``·(the previous ``F``).

The order, in the compute dtype (float32; float64 for float64 parameters), each operation rounded
on its own (:func:`rule_gradient`, shared by the definitions ``cnl_sgd_step`` and ``cnl_adam_step``)::

    g ← −g if maximize;   g ← g − c·r  (A-GEM);   g ← g + (2λ)·(F·(θ − θ*))  (EWC);   then weight decay

i.e. A-GEM projects the loss gradient only; EWC's penalty is added after the projection (so the
reduction reads ``g`` and ``r`` only). With ``rule="cnl"`` the CNL mask then compares the update
built from this gradient, as it always does.

The fused steps take the rule's gradient from :func:`effective_gradients`, a pre-pass over the
gradients (one pass building ``g − c·r + 2λ·F⊙(θ−θ*)`` per tensor) ahead of the backends' step.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from .. import reference_format as rf
from ..dtensor import is_dtensor, local_tensor
from ..ops.chunking import compute_dtype
from ._reference_store import ReferenceCapture, _raise_if_not_finite

__all__ = ["RULES", "EWC_FISHER", "EWC_ANCHOR", "EWC_KEYS", "check_rule_options", "rule_gradient",
           "effective_gradients", "FisherCapture", "capture_fisher"]

RULES = ("cnl", "agem")
EWC_FISHER, EWC_ANCHOR = "ewc_fisher", "ewc_anchor"
EWC_KEYS = frozenset({EWC_FISHER, EWC_ANCHOR})
MAGNITUDE_FORMATS = ("float32", "bfloat16")  # A-GEM needs the reference's magnitudes


def check_rule_options(rule, ewc_lambda, ewc_decay, reference_format) -> None:
    """Clear errors for bad ``rule`` / ``ewc_lambda`` / ``ewc_decay``, at construction."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if rule == "agem" and reference_format not in MAGNITUDE_FORMATS:
        raise ValueError(f"rule='agem' needs the reference's magnitudes: reference_dtype must be one of "
                         f"{MAGNITUDE_FORMATS}, got {reference_format!r} (a sign-only format)")
    if isinstance(ewc_lambda, bool) or not isinstance(ewc_lambda, (int, float)) or not ewc_lambda >= 0:
        raise ValueError(f"ewc_lambda must be a number >= 0 (0: EWC off), got {ewc_lambda!r}")
    if isinstance(ewc_decay, bool) or not isinstance(ewc_decay, (int, float)) or not 0 <= ewc_decay <= 1:
        raise ValueError(f"ewc_decay must be a number in [0, 1], got {ewc_decay!r}")


def _scalar(value, dtype, device):
    """``value`` (a number or 0-d tensor) as a 0-d tensor of ``dtype``, rounded once from float64."""
    if isinstance(value, torch.Tensor):
        return value.to(device, torch.float64).to(dtype)
    return torch.tensor(float(value), dtype=torch.float64, device=device).to(dtype)


def rule_gradient(g, p, *, agem_reference=None, agem_coefficient=0.0, reference_format="float32",
                  ewc_fisher=None, ewc_anchor=None, ewc_lambda=0.0):
    """The rule's gradient of one tensor (the module docstring's order), in the dtype of ``g`` (the
    compute dtype, ``maximize`` already applied); ``p`` the parameter in that dtype.

    ``agem_reference``: None, or the stored reference (float32 / bfloat16), and ``agem_coefficient``
    ``c = min(0, g·r)/(r·r)`` (a number or 0-d tensor); ``ewc_fisher`` / ``ewc_anchor``: None, or
    ``F`` (float32) and ``θ*`` with ``ewc_lambda`` λ."""
    dtype = g.dtype
    if agem_reference is not None:
        r = rf.decode(agem_reference, reference_format, g.shape).to(dtype)
        g = g - _scalar(agem_coefficient, dtype, g.device) * r
    if ewc_fisher is not None and ewc_lambda != 0:
        g = g + _scalar(2.0 * ewc_lambda, dtype, g.device) * (ewc_fisher.to(dtype) * (p - ewc_anchor.to(dtype)))
    return g


def _real(t):
    return torch.view_as_real(t) if t is not None and t.is_complex() else t


def agem_coefficient(references, norms, gathered, reference_format):
    """``c = min(0, g·r)/(r·r)`` over every parameter of ``gathered`` (group, params, grads, ...) with a
    reference (``g`` signed by its group's ``maximize``), a 0-d float64 tensor; None when none has
    one. The sums in float64 of the per-tensor products in the compute dtype; all-reduced over the
    ranks when a parameter is sharded."""
    dots, squares, sharded, device = [], [], False, None
    for group, params, grads, *_ in gathered:
        sign = -1.0 if group.get("maximize", False) else 1.0
        for p, g in zip(params, grads):
            stored = references.get(p)
            if stored is None:
                continue
            g = _real(local_tensor(g))
            dtype = compute_dtype(g.dtype)
            r = rf.decode(stored, reference_format, g.shape)
            dot = (g.to(dtype) * r.to(dtype)).sum(dtype=torch.float64)
            device = device or dot.device
            dots.append((dot * sign).to(device))
            squares.append(norms[p].to(device))
            sharded = sharded or is_dtensor(p)
    if not dots:
        return None
    totals = torch.stack([torch.stack(dots).sum(), torch.stack(squares).sum()])
    if sharded and dist.is_initialized():
        dist.all_reduce(totals)
    dot, square = totals[0], totals[1]
    conflict = (dot < 0) & (square > 0)
    return torch.where(conflict, dot / torch.where(square > 0, square, torch.ones_like(square)),
                       torch.zeros_like(dot))


def _as_grad(local, g):
    """``local`` as the gradient of a parameter whose gradient is ``g`` (a DTensor again if ``g`` is)."""
    if is_dtensor(g):
        from torch.distributed.tensor import DTensor
        return DTensor.from_local(local, g.device_mesh, g.placements, shape=g.shape, stride=g.stride(),
                                  run_check=False)
    return local


def effective_gradients(optimizer, gathered):
    """``gathered`` (group, params, grads, backends) with each gradient replaced by the rule's
    (:func:`rule_gradient`) where A-GEM or EWC applies; the caller's ``.grad`` tensors are not written.

    The kernels negate ``g`` under ``maximize`` themselves, so the new gradient is ``s·rule_gradient(s·g)``
    (``s = ±1``: exact), rounded to the parameter's dtype."""
    rule, ewc_lambda = getattr(optimizer, "rule", "cnl"), getattr(optimizer, "ewc_lambda", 0.0)
    references = optimizer._reference.tensors
    coefficient = None
    if rule == "agem" and references:
        coefficient = agem_coefficient(references, optimizer._reference.squared_norms(), gathered,
                                       optimizer._reference.format)
    if coefficient is None and not ewc_lambda:
        return gathered
    result = []
    for group, params, grads, *rest in gathered:
        maximize = group.get("maximize", False)
        new_grads = []
        for p, g in zip(params, grads):
            state = optimizer.state.get(p, {})
            stored = references.get(p) if coefficient is not None else None
            fisher = state.get(EWC_FISHER) if ewc_lambda else None
            if stored is None and fisher is None:
                new_grads.append(g)
                continue
            local_g, local_p = _real(local_tensor(g)), _real(local_tensor(p))
            dtype = compute_dtype(local_g.dtype)
            signed = local_g.to(dtype)
            if maximize:
                signed = -signed
            out = rule_gradient(signed, local_p.to(dtype), agem_reference=stored,
                                agem_coefficient=coefficient if stored is not None else 0.0,
                                reference_format=optimizer._reference.format, ewc_fisher=fisher,
                                ewc_anchor=None if fisher is None else _real(state[EWC_ANCHOR]),
                                ewc_lambda=ewc_lambda)
            if maximize:
                out = -out
            out = out.to(local_g.dtype)
            if g.is_complex():
                out = torch.view_as_complex(out)
            new_grads.append(_as_grad(out, g))
        result.append((group, params, new_grads, *rest))
    return result


class FisherCapture(ReferenceCapture):
    """Handed out by :func:`capture_fisher`; ``f.backward(loss)`` as ``ref.backward`` of
    :meth:`capture_reference` (``weight`` scales the loss and weighs that call's squared gradient)."""

    weight = 1.0

    def backward(self, loss: torch.Tensor, *, weight: float = 1.0, **kwargs) -> None:
        self.weight = weight
        super().backward(loss, weight=weight, **kwargs)


@contextlib.contextmanager
def capture_fisher(optimizer):
    """See :meth:`cnl_ext.CNLOptimizer.capture_fisher`."""
    params = [p for p in optimizer._parameters() if p.requires_grad]
    saved_grads = [p.grad for p in params]
    sums = [None] * len(params)

    def fold():
        w = capture.weight
        for i, p in enumerate(params):
            if p.grad is None:
                continue
            grad = _real(local_tensor(p.grad))
            square = grad.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            square.mul_(square)
            if w != 1.0:
                square.div_(w)  # (w·g)²/w = w·g²: this call's weight
            if sums[i] is None:
                sums[i] = square
            else:
                sums[i].add_(square)
            p.grad.zero_()

    capture = FisherCapture(fold)
    try:
        for p in params:
            p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
        yield capture
        if capture.calls == 0:
            raise RuntimeError("capture_fisher() ended without any f.backward(loss) call")
        fisher_new = [s if s is not None else torch.zeros_like(_real(local_tensor(p)), dtype=torch.float32,
                                                                 memory_format=torch.contiguous_format)
                      for s, p in zip(sums, params)]
        _raise_if_not_finite(fisher_new, "capture_fisher(): the squared gradients (an fp16 loss-scaled backward "
                             "that overflowed?); the previous Fisher estimate is kept",
                             sharded=any(map(is_dtensor, params)), scale=1.0 / capture.total_weight)
        decay = optimizer.ewc_decay
        updates = []
        for p, new in zip(params, fisher_new):
            old = optimizer.state.get(p, {}).get(EWC_FISHER)
            fisher = new if old is None or decay == 0 else new.add_(old, alpha=decay)
            anchor = local_tensor(p).detach().clone(memory_format=torch.contiguous_format)
            updates.append((p, fisher, anchor))
        for p, fisher, anchor in updates:  # everything computed: now written
            state = optimizer.state[p]
            state[EWC_FISHER], state[EWC_ANCHOR] = fisher, anchor
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g
