"""KIF's and Recurrent-KIF's elementwise fusion passes in plain PyTorch: the oracle of the kernels.

Both ops work on lists of contiguous tensors, in place, in float32 with one rounding per operation, the new
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

Large tensors are processed in contiguous chunks of about ``CHUNK`` elements with reused float32
buffers, so that the temporaries stay in cache and nothing large is allocated: the passes then move
close to their bytes floor on a CPU. Chunking changes no result (every operation is elementwise).
"""
from __future__ import annotations

import torch

__all__ = ["FUSION_RULES", "CHUNK", "task_vector_fuse_", "recurrent_weights", "recurrent_fuse_"]

FUSION_RULES = ("code", "paper")
CHUNK = 1 << 18  # elements per chunk: 1 MiB per float32 buffer

# (w_in, w_out) per mask code m_in + 2·m_out: neither, in only, out only, both
_WEIGHTS = {"code": ((0.5, 0.5), (1.0, 0.0), (0.0, 1.0), (0.4, 0.6)),
            "paper": ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0))}


def _as_float32(t: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """``t`` itself when float32, else its float32 value in ``buffer`` (exact for bf16/fp16)."""
    if t.dtype == torch.float32:
        return t
    out = buffer[:t.numel()].view(t.shape)
    out.copy_(t)
    return out


def _unit_chunks(numel: int, div: int, mod: int):
    """Contiguous ``(start, end, first unit, units)`` blocks of a tensor whose elements map to unit
    ``(f // div) % mod``: whole ``mod·div`` periods, or runs of units, or slices of one unit."""
    period = mod * div
    if numel > period:  # repeating pattern (LoRA B: one period per output row)
        step = max(1, CHUNK // period) * period
        for start in range(0, numel, step):
            yield start, min(start + step, numel), 0, mod
    elif mod > 1:  # one period: runs of whole units (rows)
        units_per_chunk = max(1, CHUNK // div)
        for first in range(0, mod, units_per_chunk):
            count = min(units_per_chunk, mod - first)
            yield first * div, (first + count) * div, first, count
    else:  # one unit
        for start in range(0, numel, CHUNK):
            yield start, min(start + CHUNK, numel), 0, 1


@torch.no_grad()
def task_vector_fuse_(params, anchors, coefficients, unit_maps) -> None:
    """``params[i] <- a + c * (params[i] - a)`` per unit; ``unit_maps[i] = (offset, div, mod)``."""
    device = params[0].device
    coefficients = coefficients.to(device=device, dtype=torch.float32)
    size = max((end - start for p, (_, div, mod) in zip(params, unit_maps)
                for start, end, _, _ in _unit_chunks(p.numel(), div, mod)), default=1)
    theta_buffer = torch.empty(size, dtype=torch.float32, device=device)
    anchor_buffer = torch.empty_like(theta_buffer)
    for p, a, (offset, div, mod) in zip(params, anchors, unit_maps):
        flat_p, flat_a = p.view(-1), a.view(-1)
        for start, end, first, count in _unit_chunks(p.numel(), div, mod):
            chunk = flat_p[start:end]
            theta = chunk if chunk.dtype == torch.float32 else _as_float32(chunk, theta_buffer)
            anchor = _as_float32(flat_a[start:end], anchor_buffer)
            theta.sub_(anchor)
            if count == 1 and end - start <= div:  # a slice of one unit: a scalar coefficient
                theta.mul_(coefficients[offset + first])
            else:
                c = coefficients[offset + first:offset + first + count]
                theta.view(-1, count, div).mul_(c.view(1, count, 1))
            theta.add_(anchor)  # anchor + c·(θ − anchor): a + x equals x + a bit for bit
            if theta is not chunk:
                chunk.copy_(theta)


def recurrent_weights(mask_in: torch.Tensor, mask_out: torch.Tensor, rule: str):
    """The per-element float32 weights ``(w_in, w_out)`` of a fusion rule."""
    table = torch.tensor(_WEIGHTS[rule], dtype=torch.float32, device=mask_in.device)
    code = mask_in.to(torch.int64) + 2 * mask_out.to(torch.int64)
    return table[:, 0][code], table[:, 1][code]


@torch.no_grad()
def recurrent_fuse_(params, anchors, inner_ends, inner_sensitivities, inner_uncertainties, outer_sensitivities,
                    outer_uncertainties, *, delta_in: float, delta_out: float, rule: str,
                    update_anchors: bool) -> None:
    """One Recurrent-KIF fusion over all tensors (see the module docstring)."""
    device = params[0].device
    size = max(1, min(CHUNK, max(p.numel() for p in params)))
    f32 = dict(dtype=torch.float32, device=device)
    theta_b, theta_q, theta, t_in, score = (torch.empty(size, **f32) for _ in range(5))
    w_in, w_out = torch.empty(size, **f32), torch.empty(size, **f32)
    mask_in = torch.empty(size, dtype=torch.bool, device=device)
    mask_out = torch.empty_like(mask_in)
    code = torch.empty(size, dtype=torch.int64, device=device)
    table = torch.tensor(_WEIGHTS[rule], **f32)
    table_in, table_out = table[:, 0].contiguous(), table[:, 1].contiguous()
    threshold_in = torch.tensor(delta_in, **f32)
    threshold_out = torch.tensor(delta_out, **f32)
    for i, p in enumerate(params):
        lists = (p, anchors[i], inner_ends[i], inner_sensitivities[i], inner_uncertainties[i],
                 outer_sensitivities[i], outer_uncertainties[i])
        flat = [t.view(-1) for t in lists]
        for start in range(0, p.numel(), CHUNK):
            end = min(start + CHUNK, p.numel())
            n = end - start
            p_c, b_c, q_c, si, ui, so, uo = (t[start:end] for t in flat)
            torch.gt(torch.mul(si, ui, out=score[:n]), threshold_in, out=mask_in[:n])
            torch.gt(torch.mul(so, uo, out=score[:n]), threshold_out, out=mask_out[:n])
            torch.add(mask_in[:n].view(torch.uint8), mask_out[:n].view(torch.uint8), alpha=2, out=code[:n])
            torch.index_select(table_in, 0, code[:n], out=w_in[:n])
            torch.index_select(table_out, 0, code[:n], out=w_out[:n])
            b32 = _as_float32(b_c, theta_b)
            q32 = _as_float32(q_c, theta_q)
            # θ_b + w_in·(θ_Q − θ_b), as (θ_Q − θ_b)·w_in + θ_b: the same roundings
            torch.sub(q32, b32, out=t_in[:n]).mul_(w_in[:n]).add_(b32)
            new = p_c if p_c.dtype == torch.float32 else _as_float32(p_c, theta)
            new.sub_(q32).mul_(w_out[:n]).add_(t_in[:n])  # (θ − θ_Q)·w_out + (...)
            if new is not p_c:
                p_c.copy_(new)
            if update_anchors:
                b_c.copy_(p_c)
