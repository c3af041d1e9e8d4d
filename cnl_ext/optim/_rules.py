"""Two more continual-learning rules of the fused optimizers: A-GEM's projection and EWC's penalty.

``rule="agem"`` (A-GEM, Chaudhry et al., "Efficient Lifelong Learning with A-GEM", ICLR 2019): with a
reference gradient ``r`` set, each step first projects the gradient ``g`` (after ``maximize``'s sign)
onto the half-space that does not raise the reference loss to first order::

    c = min(0, g·r) / (r·r)        (dots over every stepped parameter with a reference, all groups)
    g ← g − c·r

and then takes the optimizer's usual update, with no CNL mask. ``r·r`` is kept per parameter and
computed once per reference (:meth:`ReferenceStore.squared_norms`); ``g·r`` is one reduction per
step that reads ``g`` and ``r`` (all-reduced over the ranks when parameters are FSDP2 DTensors).
So an A-GEM step makes 2 passes over the tensors: that reduction, and the step. Where ``g·r ≥ 0``
(``c = 0``) and ``c`` is on the CPU, the step is the plain one and does not read ``r``; on a GPU it
projects by 0 instead, as reading ``c`` there would cost a sync.

EWC (Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017):
``ewc_lambda=λ`` adds the gradient of ``λ·Σ F⊙(θ−θ*)²``, i.e. ``2λ·F⊙(θ−θ*)``, to the gradient,
before the optimizer's own (L2) weight decay; ``F`` (float32) and ``θ*`` (the parameter's dtype) are
per-parameter states ``ewc_fisher`` and ``ewc_anchor`` that :meth:`capture_fisher` sets:
the mean of the squared gradients of the ``f.backward(loss)`` calls inside it (the empirical Fisher
diagonal), added to ``ewc_decay``·(the previous ``F``).

The order, in the compute dtype (float32; float64 for float64 parameters), each operation rounded
on its own (:func:`cnl_ext.ops.rules.rule_gradient`, which the definitions ``cnl_sgd_step`` and
``cnl_adam_step`` call)::

    g ← −g if maximize;   g ← g − c·r  (A-GEM);   g ← g + (2λ)·(F·(θ − θ*))  (EWC);   then weight decay

i.e. A-GEM projects the loss gradient only; EWC's penalty is added after the projection (so the
reduction reads ``g`` and ``r`` only). With ``rule="cnl"`` the CNL mask then compares the update
built from this gradient, as it always does.

The step ops take the terms as arguments (the ops contract's ``RULE_KEYWORDS``): every backend's
kernels apply them in the step's own pass (the native CUDA ones then update KIF's importance EMAs, if
asked, right after it: ``Capabilities.importance_with_rules``). The ``g·r`` reduction is
the native CPU kernels' ``agem_dot_`` (one multi-tensor pass, parallel over the tensors' work items,
summed in a fixed order), PyTorch ops elsewhere.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from .. import functional
from ..dtensor import is_dtensor, local_tensor
from ..ops.rules import rule_gradient
from ._reference_store import ReferenceCapture, _raise_if_not_finite

__all__ = ["RULES", "EWC_FISHER", "EWC_ANCHOR", "EWC_KEYS", "check_rule_options", "rule_gradient",
           "agem_coefficient", "rule_arguments", "FisherCapture", "capture_fisher"]

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


def _real(t):
    return torch.view_as_real(t) if t is not None and t.is_complex() else t


def agem_coefficient(optimizer, gathered):
    """A-GEM's ``c = min(0, g·r)/(r·r)`` of this step, a 0-d float64 tensor, or None (``rule`` is not
    ``"agem"``, or no reference is set). ``g·r``: one reduction over the stepped parameters with a
    reference (:func:`cnl_ext.functional.agem_dots`, per param group, signed by its ``maximize``);
    ``r·r``: the same parameters' cached squared norms; both all-reduced over the ranks when a
    parameter is an FSDP2 DTensor (one all-reduce of two numbers)."""
    store = optimizer._reference
    if getattr(optimizer, "rule", "cnl") != "agem" or not store:
        return None
    norms = store.squared_norms()
    dots, squares, sharded, device = [], [], False, None
    for group, params, grads, *_ in gathered:
        references = [store.tensors.get(p) for p in params]
        if not any(r is not None for r in references):
            continue
        per_tensor = functional.agem_dots([_real(g) for g in grads], references, reference_format=store.format,
                                          backend=optimizer.backend)
        device = device or per_tensor.device
        sign = -1.0 if group.get("maximize", False) else 1.0
        dots.append(per_tensor.sum().to(device) * sign)
        squares.extend(norms[p].to(device) for p, r in zip(params, references) if r is not None)
        sharded = sharded or any(map(is_dtensor, params))
    if not dots:
        return torch.zeros((), dtype=torch.float64)
    totals = torch.stack([torch.stack(dots).sum(), torch.stack(squares).sum()])
    if sharded and dist.is_initialized():
        dist.all_reduce(totals)
    dot, square = totals[0], totals[1]
    conflict = (dot < 0) & (square > 0)
    return torch.where(conflict, dot / torch.where(square > 0, square, torch.ones_like(square)),
                       torch.zeros_like(dot))


def rule_arguments(optimizer, states, coefficient) -> dict:
    """The functional keywords of issue 22 for one group's step (``{}`` when neither rule term is on):
    EWC's Fisher estimates and anchors from ``states`` (the per-parameter states the step uses; a
    complex parameter's as view_as_real pairs) and A-GEM's ``coefficient``."""
    ewc_lambda = getattr(optimizer, "ewc_lambda", 0.0)
    use_ewc = ewc_lambda != 0 and any(EWC_FISHER in state for state in states)
    if not use_ewc and coefficient is None:
        return {}
    arguments = dict(agem_coefficient=coefficient)
    if use_ewc:
        arguments.update(ewc=([state.get(EWC_FISHER) for state in states],
                              [_real(state.get(EWC_ANCHOR)) for state in states]), ewc_lambda=ewc_lambda)
    return arguments


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
