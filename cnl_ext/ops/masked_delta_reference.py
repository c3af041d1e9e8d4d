"""The masked write-back of :class:`cnl_ext.CNL` in plain PyTorch: the oracle of its Triton kernel.

After any optimizer's step, with ``Δ = θ_after − θ_before`` and ``u = −Δ/lr`` (spec, "any optimizer")::

    θ ← θ_before   where sign(r)·sign(u) < 0  (conflicting)
    θ ← θ_after    otherwise

Contract (shared with :mod:`cnl_ext.ops.triton_masked_delta`)::

    masked_delta_(params, befores, references, stats, *, reference_format, inv_lr)

``params`` hold θ_after and are written in place; ``befores`` are contiguous copies of θ_before
(same dtype and shape); ``references`` one stored reference per param (see
:mod:`cnl_ext.reference_format`); ``stats`` None or a float64 ``[len(params), 3]`` tensor that
receives, added to row ``i``, (collaborative count, Σ r·u over collaborative, Σ r·u over
conflicting) with ``u = −Δ·inv_lr``.
"""
from __future__ import annotations

import torch

from ..reference import _apply_masked

__all__ = ["masked_delta_"]


@torch.no_grad()
def masked_delta_(params, befores, references, stats, *, reference_format: str, inv_lr: float) -> None:
    for i, (p, before) in enumerate(zip(params, befores)):
        before32, after32 = before.to(torch.float32), p.to(torch.float32)
        row = None if stats is None else torch.zeros(3, dtype=torch.float64, device=stats.device)
        # The mask takes its signs from −Δ itself (exact in float32), not from −Δ·inv_lr, which
        # could underflow to 0; the sums of s are scaled by 1/lr once, after.
        _apply_masked(p, before32, after32, before32 - after32, references[i], reference_format, row)
        if row is not None:
            row[1:] *= inv_lr
            stats[i] += row
