"""KIF's and Recurrent-KIF's elementwise fusion passes in plain PyTorch: the oracle of the kernels.

Both ops work on lists of tensors, in place, in float32 with one rounding per operation, the new
parameter rounded once to its dtype (nearest even). :mod:`cnl_ext.kif` validates and dispatches;
these functions assume valid input.

``task_vector_fuse_`` (KIF, spec §1.5): ``θ <- a + c_u * (θ - a)`` with ``a`` the anchor (the weights the
task started from) and ``c_u`` the coefficient of the element's unit. Units are described per tensor
by ``(offset, div, mod)``: element ``f`` (flat, row-major) belongs to unit ``offset + (f // div) % mod``
of the flat ``coefficients`` vector. One unit per tensor is ``(o, numel, 1)``; one per output row of a
``[rows, cols]`` weight ``(o, cols, rows)``; the rank-1 units of LoRA ``A [r, in]`` / ``B [out, r]``
are ``(o, in, r)`` and ``(o, 1, r)`` (the same ``o``: row i of A and column i of B share unit i).

``recurrent_fuse_`` (Recurrent-KIF, spec §2.4): with ``τ_in = θ_Q - θ_b``, ``τ_out = θ - θ_Q``,
``m_in = S_in·U_in > δ_in``, ``m_out = S_out·U_out > δ_out`` (strict)::

    θ <- θ_b + w_in * τ_in + w_out * τ_out          (evaluated left to right)
    rule "code":  (w_in, w_out) = (0.4, 0.6) both, (1, 0) m_in only, (0, 1) m_out only, (0.5, 0.5) neither
    rule "paper": (w_in, w_out) = (m_in, m_out)
    then, with update_anchors, θ_b <- θ as stored (the next cycle's anchor).
"""
from __future__ import annotations

import torch

__all__ = ["FUSION_RULES", "task_vector_fuse_", "recurrent_weights", "recurrent_fuse_"]

FUSION_RULES = ("code", "paper")


@torch.no_grad()
def task_vector_fuse_(params, anchors, coefficients, unit_maps) -> None:
    """``params[i] <- a + c * (params[i] - a)`` per unit; ``unit_maps[i] = (offset, div, mod)``."""
    if all(p.dtype == torch.float32 and p.is_contiguous() for p in params):
        # in place, no temporaries: the same three roundings (a + x equals x + a bit for bit)
        a32 = [a.to(torch.float32) for a in anchors]
        torch._foreach_sub_(params, a32)
        for p, (offset, div, mod) in zip(params, unit_maps):
            if p.numel():
                p.view(-1, mod, div).mul_(coefficients[offset:offset + mod].view(1, mod, 1))
        torch._foreach_add_(params, a32)
        return
    p32 = [p.to(torch.float32) for p in params]
    a32 = [a.to(torch.float32) for a in anchors]
    task_vectors = [d.contiguous() for d in torch._foreach_sub(p32, a32)]  # units follow row-major order
    for p, d, (offset, div, mod) in zip(params, task_vectors, unit_maps):
        if p.numel():
            d.view(-1, mod, div).mul_(coefficients[offset:offset + mod].view(1, mod, 1))
    fused = torch._foreach_add(a32, task_vectors)
    for p, new in zip(params, fused):
        p.copy_(new)


def recurrent_weights(mask_in: torch.Tensor, mask_out: torch.Tensor, rule: str):
    """The per-element float32 weights ``(w_in, w_out)`` of a fusion rule."""
    if rule == "paper":
        return mask_in.to(torch.float32), mask_out.to(torch.float32)
    both = mask_in & mask_out
    w_in = torch.where(both, 0.4, torch.where(mask_in, 1.0, torch.where(mask_out, 0.0, 0.5)))
    w_out = torch.where(both, 0.6, torch.where(mask_in, 0.0, torch.where(mask_out, 1.0, 0.5)))
    return w_in.to(torch.float32), w_out.to(torch.float32)


@torch.no_grad()
def recurrent_fuse_(params, anchors, inner_ends, inner_sensitivities, inner_uncertainties, outer_sensitivities,
                    outer_uncertainties, *, delta_in: float, delta_out: float, rule: str,
                    update_anchors: bool) -> None:
    """One Recurrent-KIF fusion over all tensors (see the module docstring)."""
    for i, p in enumerate(params):
        theta = p.to(torch.float32)
        theta_b = anchors[i].to(torch.float32)
        theta_q = inner_ends[i].to(torch.float32)
        mask_in = inner_sensitivities[i] * inner_uncertainties[i] > torch.tensor(delta_in, dtype=torch.float32)
        mask_out = outer_sensitivities[i] * outer_uncertainties[i] > torch.tensor(delta_out, dtype=torch.float32)
        w_in, w_out = recurrent_weights(mask_in, mask_out, rule)
        p.copy_(theta_b + w_in * (theta_q - theta_b) + w_out * (theta - theta_q))
        if update_anchors:
            anchors[i].copy_(p)
