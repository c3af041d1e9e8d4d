"""The masked write-back of :class:`cnl_ext.CNL` in Triton: one multi-tensor launch per bucket.

Same contract and math as :func:`cnl_ext.ops.torch_backend.masked_delta_`; the chunk tables, pointer
tables, reference decoding, masking, rounding and statistics are the core kernels' own
(:mod:`cnl_ext.ops.triton_step`). Per element it reads θ_after, θ_before and the reference and
writes θ once.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_step import (_block_offsets, _chunk_bounds, _launch, _load, _masked_update, _pointer, _round_to,
                          _scalar, _store_partials)

__all__ = ["masked_delta_"]


@triton.jit
def _masked_delta_block(p_ptr, b_ptr, r_ptr, offs, mask, acc_count, acc_collab, acc_conflict,
                        P_DTYPE: tl.constexpr, REF_KIND: tl.constexpr, STATS: tl.constexpr, COMPUTE: tl.constexpr):
    after = _load(p_ptr, offs, mask).to(COMPUTE)
    before = _load(b_ptr, offs, mask).to(COMPUTE)
    # u = −Δ/lr has the sign of (before − after), exact in the compute dtype; the sums are scaled by the caller.
    new_p, acc_count, acc_collab, acc_conflict = _masked_update(
        before, after, before - after, r_ptr, offs, mask, acc_count, acc_collab, acc_conflict, REF_KIND, STATS,
        COMPUTE)
    tl.store(p_ptr + offs, _round_to(new_p, P_DTYPE), mask=mask)
    return acc_count, acc_collab, acc_conflict


@triton.jit
def _masked_delta_kernel(
    ptr_table, chunk_tensor, chunk_start, numels, partials, inv_lr,
    P_DTYPE: tl.constexpr, R_DTYPE: tl.constexpr, REF_KIND: tl.constexpr, STATS: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr, LR_ON_DEVICE: tl.constexpr, COMPUTE: tl.constexpr, ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    # pointer table columns: param (θ after the inner step), θ before it, reference.
    # WEIGHT_DECAY and LR_ON_DEVICE are set by the shared launcher and unused here; COMPUTE: the
    # dtype of Δ and the sums (float64 for float64 params, whose inv_lr is then a float64 device scalar).
    pid = tl.program_id(0)
    inv_lr = _scalar(inv_lr, False, COMPUTE)
    t, start, full_end, end = _chunk_bounds(chunk_tensor, chunk_start, numels, pid, CHUNK, BLOCK)
    p_ptr = _pointer(ptr_table, t, 0, 3, P_DTYPE, ALIGNED)
    b_ptr = _pointer(ptr_table, t, 1, 3, P_DTYPE, ALIGNED)
    r_ptr = _pointer(ptr_table, t, 2, 3, R_DTYPE, ALIGNED)
    acc_count = tl.zeros((), COMPUTE)
    acc_collab = tl.zeros((), COMPUTE)
    acc_conflict = tl.zeros((), COMPUTE)
    for block_start in range(start, full_end, BLOCK):
        acc_count, acc_collab, acc_conflict = _masked_delta_block(
            p_ptr, b_ptr, r_ptr, _block_offsets(block_start, BLOCK), None,
            acc_count, acc_collab, acc_conflict, P_DTYPE, REF_KIND, STATS,
            COMPUTE)
    if full_end < end:
        offs = _block_offsets(full_end, BLOCK)
        acc_count, acc_collab, acc_conflict = _masked_delta_block(
            p_ptr, b_ptr, r_ptr, offs, offs < end, acc_count, acc_collab, acc_conflict, P_DTYPE, REF_KIND, STATS,
            COMPUTE)
    _store_partials(partials, pid, acc_count, acc_collab * inv_lr, acc_conflict * inv_lr, STATS)


def masked_delta_(params, befores, references, stats, *, reference_format: str, inv_lr: float) -> None:
    """See :func:`cnl_ext.ops.torch_backend.masked_delta_` for the contract and the math."""
    _launch(_masked_delta_kernel, (params, befores, references), params, references, stats,
            reference_format, (float(inv_lr),), 0.0)
