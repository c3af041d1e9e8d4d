"""Issue 22's terms of a step (the ops contract's :data:`~cnl_ext.ops.contract.RULE_KEYWORDS`), in plain
PyTorch: the definition every kernel is checked against (tests/optim/test_rules_ops.py); every
backend applies them in its step's own pass.

Per tensor, in the compute dtype (float32; float64 for float64 parameters), each operation rounded on
its own, after ``maximize``'s sign and before the optimizer's L2 weight decay::

    g ← g − c·r                    A-GEM (agem_coefficient c; r the reference, decoded)
    g ← g + (2λ)·(F·(θ − θ*))      EWC (ewc = (F, θ*), ewc_lambda λ)

``c`` and ``2λ`` are rounded once from float64 to the compute dtype. With A-GEM the references
project and do not mask. A-GEM's coefficient comes from :func:`agem_dot_`: ``out[i] += Σ g·r`` over
tensor ``i`` (products in the compute dtype, summed in float64).
"""
from __future__ import annotations

import torch

from ..reference_format import decode
from .chunking import compute_dtype

__all__ = ["rule_gradient", "agem_dot_", "applies"]


def scalar_in(value, dtype, device):
    """``value`` (a number or 0-d tensor) as a 0-d tensor of ``dtype`` on ``device``, rounded once from float64."""
    if isinstance(value, torch.Tensor):
        return value.to(device, torch.float64).to(dtype)
    return torch.tensor(float(value), dtype=torch.float64, device=device).to(dtype)


def rule_gradient(g, p, *, agem_reference=None, agem_coefficient=0.0, reference_format="float32",
                  ewc_fisher=None, ewc_anchor=None, ewc_lambda=0.0):
    """The rule's gradient of one tensor (module docstring), in the dtype of ``g`` (the compute dtype,
    ``maximize`` already applied); ``p`` the parameter in that dtype. ``agem_reference``: None, or
    the stored reference; ``ewc_fisher`` / ``ewc_anchor``: None, or ``F`` (float32) and ``θ*``."""
    dtype = g.dtype
    if agem_reference is not None:
        r = decode(agem_reference, reference_format, g.shape).to(dtype)
        g = g - scalar_in(agem_coefficient, dtype, g.device) * r
    if ewc_fisher is not None and ewc_lambda != 0:
        g = g + scalar_in(2.0 * ewc_lambda, dtype, g.device) * (ewc_fisher.to(dtype) * (p - ewc_anchor.to(dtype)))
    return g


def applies(references, ewc, ewc_lambda, agem_coefficient) -> tuple[bool, bool]:
    """(A-GEM projects, EWC adds its term) for a step op's arguments."""
    return agem_coefficient is not None and references is not None, ewc is not None and ewc_lambda != 0


@torch.no_grad()
def agem_dot_(grads, references, out, *, reference_format: str) -> None:
    """``out[i] += Σ grads[i]·r_i`` (float64 ``out`` of one entry per tensor; products in the compute
    dtype of the gradients, sums in float64)."""
    if not grads:
        return
    dtype = compute_dtype(grads[0].dtype)
    sums = [(g.to(dtype) * decode(r, reference_format, g.shape).to(dtype)).sum(dtype=torch.float64)
            for g, r in zip(grads, references)]
    out += torch.stack(sums).to(out.device)

