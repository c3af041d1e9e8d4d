"""KIF's and Recurrent-KIF's fusion passes in Triton: one multi-tensor launch, one memory pass.

Same contract, math and rounding as :mod:`cnl_ext.ops.kif_fusion_torch` (the oracle); the chunk and
pointer tables, full/partial blocks and bfloat16 rounding are the step kernels' own
(:mod:`cnl_ext.ops.triton_step`). The caller (:mod:`cnl_ext.kif`) hands lists that share one device,
one parameter dtype and one anchor dtype, all contiguous; scores are float32.

Bytes per element: task-vector fusion reads θ, the anchor and writes θ (the coefficient is a gather
from a vector of a few hundred units, cached); Recurrent-KIF's reads θ, θ_b, θ_Q and four float32
EMAs and writes θ (and θ_b with ``update_anchors``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_step
from .triton_step import (_TL_DTYPES, BLOCK, LAUNCH_OPTIONS, _block_offsets, _chunk_bounds, _chunk_table, _load,
                          _pointer, _pointer_table, _round_to)

__all__ = ["task_vector_fuse_", "recurrent_fuse_"]

_RULE_CODE, _RULE_PAPER = 0, 1


@triton.jit
def _task_vector_block(p_ptr, a_ptr, coefficients, unit_offset, div, mod, offs, mask, P_DTYPE: tl.constexpr):
    theta = _load(p_ptr, offs, mask).to(tl.float32)
    anchor = _load(a_ptr, offs, mask).to(tl.float32)
    unit = unit_offset + (offs // div) % mod
    if mask is None:
        c = tl.load(coefficients + unit)
    else:
        c = tl.load(coefficients + unit, mask=mask, other=0.0)
    tl.store(p_ptr + offs, _round_to(anchor + c * (theta - anchor), P_DTYPE), mask=mask)


@triton.jit
def _task_vector_kernel(ptr_table, chunk_tensor, chunk_start, numels, unit_table, coefficients,
                        P_DTYPE: tl.constexpr, A_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
                        CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # pointer table columns: param, anchor; unit table per tensor: offset, div, mod
    pid = tl.program_id(0)
    t, start, full_end, end = _chunk_bounds(chunk_tensor, chunk_start, numels, pid, CHUNK, BLOCK)
    p_ptr = _pointer(ptr_table, t, 0, 2, P_DTYPE, ALIGNED)
    a_ptr = _pointer(ptr_table, t, 1, 2, A_DTYPE, ALIGNED)
    unit_offset = tl.load(unit_table + t * 3 + 0)
    div = tl.load(unit_table + t * 3 + 1)
    mod = tl.load(unit_table + t * 3 + 2)
    for block_start in range(start, full_end, BLOCK):
        _task_vector_block(p_ptr, a_ptr, coefficients, unit_offset, div, mod, _block_offsets(block_start, BLOCK),
                           None, P_DTYPE)
    if full_end < end:
        offs = _block_offsets(full_end, BLOCK)
        _task_vector_block(p_ptr, a_ptr, coefficients, unit_offset, div, mod, offs, offs < end, P_DTYPE)


@triton.jit
def _recurrent_block(p_ptr, b_ptr, q_ptr, si_ptr, ui_ptr, so_ptr, uo_ptr, offs, mask, delta_in, delta_out,
                     P_DTYPE: tl.constexpr, A_DTYPE: tl.constexpr, RULE: tl.constexpr, UPDATE_ANCHORS: tl.constexpr):
    theta = _load(p_ptr, offs, mask).to(tl.float32)
    theta_b = _load(b_ptr, offs, mask).to(tl.float32)
    theta_q = _load(q_ptr, offs, mask).to(tl.float32)
    mask_in = _load(si_ptr, offs, mask) * _load(ui_ptr, offs, mask) > delta_in
    mask_out = _load(so_ptr, offs, mask) * _load(uo_ptr, offs, mask) > delta_out
    if RULE == 1:  # paper: binary masks
        w_in = mask_in.to(tl.float32)
        w_out = mask_out.to(tl.float32)
    else:  # the authors' code
        both = mask_in & mask_out
        w_in = tl.where(both, 0.4, tl.where(mask_in, 1.0, tl.where(mask_out, 0.0, 0.5)))
        w_out = tl.where(both, 0.6, tl.where(mask_in, 0.0, tl.where(mask_out, 1.0, 0.5)))
    new = _round_to(theta_b + w_in * (theta_q - theta_b) + w_out * (theta - theta_q), P_DTYPE)
    tl.store(p_ptr + offs, new, mask=mask)
    if UPDATE_ANCHORS:
        tl.store(b_ptr + offs, _round_to(new.to(tl.float32), A_DTYPE), mask=mask)


@triton.jit
def _recurrent_kernel(ptr_table, chunk_tensor, chunk_start, numels, delta_in, delta_out,
                      P_DTYPE: tl.constexpr, A_DTYPE: tl.constexpr, RULE: tl.constexpr,
                      UPDATE_ANCHORS: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # pointer table columns: param, anchor (θ_b), inner end (θ_Q), S_in, U_in, S_out, U_out
    pid = tl.program_id(0)
    t, start, full_end, end = _chunk_bounds(chunk_tensor, chunk_start, numels, pid, CHUNK, BLOCK)
    p_ptr = _pointer(ptr_table, t, 0, 7, P_DTYPE, ALIGNED)
    b_ptr = _pointer(ptr_table, t, 1, 7, A_DTYPE, ALIGNED)
    q_ptr = _pointer(ptr_table, t, 2, 7, A_DTYPE, ALIGNED)
    si_ptr = _pointer(ptr_table, t, 3, 7, tl.float32, ALIGNED)
    ui_ptr = _pointer(ptr_table, t, 4, 7, tl.float32, ALIGNED)
    so_ptr = _pointer(ptr_table, t, 5, 7, tl.float32, ALIGNED)
    uo_ptr = _pointer(ptr_table, t, 6, 7, tl.float32, ALIGNED)
    for block_start in range(start, full_end, BLOCK):
        _recurrent_block(p_ptr, b_ptr, q_ptr, si_ptr, ui_ptr, so_ptr, uo_ptr, _block_offsets(block_start, BLOCK),
                         None, delta_in, delta_out, P_DTYPE, A_DTYPE, RULE, UPDATE_ANCHORS)
    if full_end < end:
        offs = _block_offsets(full_end, BLOCK)
        _recurrent_block(p_ptr, b_ptr, q_ptr, si_ptr, ui_ptr, so_ptr, uo_ptr, offs, offs < end,
                         delta_in, delta_out, P_DTYPE, A_DTYPE, RULE, UPDATE_ANCHORS)


def _tables(columns, params):
    device = params[0].device
    tensor_of_chunk, chunk_start, numel_table = _chunk_table(tuple(p.numel() for p in params), device)
    pointer_table, aligned = _pointer_table(columns, device)
    return tensor_of_chunk, chunk_start, numel_table, pointer_table, aligned


def task_vector_fuse_(params, anchors, coefficients, unit_maps) -> None:
    """See :mod:`cnl_ext.ops.kif_fusion_torch`."""
    tensor_of_chunk, chunk_start, numel_table, pointer_table, aligned = _tables((params, anchors), params)
    if tensor_of_chunk.numel() == 0:
        return
    device = params[0].device
    unit_table = torch.tensor([[o, max(d, 1), max(m, 1)] for o, d, m in unit_maps], dtype=torch.int64).to(device)
    _task_vector_kernel[(tensor_of_chunk.numel(),)](
        pointer_table, tensor_of_chunk, chunk_start, numel_table, unit_table,
        coefficients.to(device=device, dtype=torch.float32).contiguous(),
        P_DTYPE=_TL_DTYPES[params[0].dtype], A_DTYPE=_TL_DTYPES[anchors[0].dtype], ALIGNED=aligned,
        CHUNK=triton_step.CHUNK, BLOCK=BLOCK, **LAUNCH_OPTIONS)  # CHUNK read at the call, as _chunk_table does


def recurrent_fuse_(params, anchors, inner_ends, inner_sensitivities, inner_uncertainties, outer_sensitivities,
                    outer_uncertainties, *, delta_in: float, delta_out: float, rule: str,
                    update_anchors: bool) -> None:
    """See :mod:`cnl_ext.ops.kif_fusion_torch`."""
    columns = (params, anchors, inner_ends, inner_sensitivities, inner_uncertainties, outer_sensitivities,
               outer_uncertainties)
    tensor_of_chunk, chunk_start, numel_table, pointer_table, aligned = _tables(columns, params)
    if tensor_of_chunk.numel() == 0:
        return
    _recurrent_kernel[(tensor_of_chunk.numel(),)](
        pointer_table, tensor_of_chunk, chunk_start, numel_table, float(delta_in), float(delta_out),
        P_DTYPE=_TL_DTYPES[params[0].dtype], A_DTYPE=_TL_DTYPES[anchors[0].dtype],
        RULE=_RULE_PAPER if rule == "paper" else _RULE_CODE, UPDATE_ANCHORS=update_anchors, ALIGNED=aligned,
        CHUNK=triton_step.CHUNK, BLOCK=BLOCK, **LAUNCH_OPTIONS)  # CHUNK read at the call, as _chunk_table does
