"""CNL Adam / AdamW in Triton (torch.optim.Adam / AdamW semantics, then the CNL mask), multi-tensor.

Layout, launch and the shared device functions: :mod:`.triton_step`; math:
:func:`cnl_ext.ops.torch_backend.adam_step_`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_step import (_block_offsets, _chunk_bounds, _div, _importance_args, _importance_update, _launch, _load,
                          _load_param_and_grad, _masked_update, _pointer, _round_to, _scalar, _sqrt, _store_partials)

__all__ = ["adam_step_"]


@triton.jit
def _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, r_ptr, s_ptr, u_ptr, offs, mask,
                lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, one_minus_lr_wd,
                bias_correction1, bias_correction2_sqrt,
                imp_beta1, imp_one_minus_beta1, imp_beta2, imp_one_minus_beta2,
                acc_count, acc_collab, acc_conflict,
                P_DTYPE: tl.constexpr, REF_KIND: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, STATS: tl.constexpr,
                IMPORTANCE: tl.constexpr, COMPUTE: tl.constexpr):
    p, g = _load_param_and_grad(p_ptr, g_ptr, offs, mask, MAXIMIZE, COMPUTE)
    g_passed = -g if MAXIMIZE else g
    if WEIGHT_DECAY and not DECOUPLED:
        g = g + weight_decay * p
    m = beta1 * _load(m_ptr, offs, mask) + one_minus_beta1 * g
    v = beta2 * _load(v_ptr, offs, mask) + one_minus_beta2 * (g * g)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if AMSGRAD:
        v = tl.maximum(_load(vmax_ptr, offs, mask), v)
        tl.store(vmax_ptr + offs, v, mask=mask)
    denom = _div(_sqrt(v, COMPUTE), bias_correction2_sqrt, COMPUTE) + eps
    adam = _div(_div(m, bias_correction1, COMPUTE), denom, COMPUTE)
    if WEIGHT_DECAY and DECOUPLED:
        u = adam + weight_decay * p
        new_p = p * one_minus_lr_wd - lr * adam  # torch.optim.AdamW's order
    else:
        u = adam
        new_p = p - lr * adam
    new_p, acc_count, acc_collab, acc_conflict = _masked_update(
        p, new_p, u, r_ptr, offs, mask, acc_count, acc_collab, acc_conflict, REF_KIND, STATS, COMPUTE)
    stored_p = _round_to(new_p, P_DTYPE)
    tl.store(p_ptr + offs, stored_p, mask=mask)
    _importance_update(stored_p, g_passed, s_ptr, u_ptr, offs, mask, imp_beta1, imp_one_minus_beta1, imp_beta2,
                       imp_one_minus_beta2, IMPORTANCE)
    return acc_count, acc_collab, acc_conflict


@triton.jit
def _adam_kernel(
    ptr_table, chunk_tensor, chunk_start, numels, partials,
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, one_minus_lr_wd,
    bias_correction1, bias_correction2_sqrt, imp_beta1, imp_one_minus_beta1, imp_beta2, imp_one_minus_beta2,
    P_DTYPE: tl.constexpr, R_DTYPE: tl.constexpr, REF_KIND: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr, STATS: tl.constexpr, IMPORTANCE: tl.constexpr, LR_ON_DEVICE: tl.constexpr,
    STEP_ON_DEVICE: tl.constexpr, COMPUTE: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # pointer table columns: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, reference, step,
    # sensitivity, uncertainty. COMPUTE: the arithmetic's, the moments' and the sums' dtype (float64
    # for float64 params).
    pid = tl.program_id(0)
    lr = _scalar(lr, LR_ON_DEVICE, COMPUTE)
    beta1 = _scalar(beta1, False, COMPUTE)
    one_minus_beta1 = _scalar(one_minus_beta1, False, COMPUTE)
    beta2 = _scalar(beta2, False, COMPUTE)
    one_minus_beta2 = _scalar(one_minus_beta2, False, COMPUTE)
    eps = _scalar(eps, False, COMPUTE)
    weight_decay = _scalar(weight_decay, False, COMPUTE)
    one_minus_lr_wd = _scalar(one_minus_lr_wd, False, COMPUTE)
    bias_correction1 = _scalar(bias_correction1, False, COMPUTE)
    bias_correction2_sqrt = _scalar(bias_correction2_sqrt, False, COMPUTE)
    if LR_ON_DEVICE:  # the host computed 1 − lr·λ for a float lr; with a device lr, as the torch backend does
        one_minus_lr_wd = 1 - lr * weight_decay
    t, start, full_end, end = _chunk_bounds(chunk_tensor, chunk_start, numels, pid, CHUNK, BLOCK)
    p_ptr = _pointer(ptr_table, t, 0, 9, P_DTYPE, ALIGNED)
    g_ptr = _pointer(ptr_table, t, 1, 9, P_DTYPE, ALIGNED)
    m_ptr = _pointer(ptr_table, t, 2, 9, COMPUTE, ALIGNED)
    v_ptr = _pointer(ptr_table, t, 3, 9, COMPUTE, ALIGNED)
    vmax_ptr = _pointer(ptr_table, t, 4, 9, COMPUTE, ALIGNED)
    r_ptr = _pointer(ptr_table, t, 5, 9, R_DTYPE, ALIGNED)
    s_ptr = _pointer(ptr_table, t, 7, 9, tl.float32, ALIGNED)
    u_ptr = _pointer(ptr_table, t, 8, 9, tl.float32, ALIGNED)
    if STEP_ON_DEVICE:  # capturable: the bias corrections follow this tensor's step count on the device
        step = tl.load(_pointer(ptr_table, t, 6, 9, tl.float32, False)).to(COMPUTE)
        bias_correction1 = 1 - tl.exp2(step * tl.log2(beta1))
        bias_correction2_sqrt = _sqrt(1 - tl.exp2(step * tl.log2(beta2)), COMPUTE)
    acc_count = tl.zeros((), COMPUTE)
    acc_collab = tl.zeros((), COMPUTE)
    acc_conflict = tl.zeros((), COMPUTE)
    for block_start in range(start, full_end, BLOCK):
        acc_count, acc_collab, acc_conflict = _adam_block(
            p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, r_ptr, s_ptr, u_ptr, _block_offsets(block_start, BLOCK), None,
            lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, one_minus_lr_wd,
            bias_correction1, bias_correction2_sqrt, imp_beta1, imp_one_minus_beta1, imp_beta2, imp_one_minus_beta2,
            acc_count, acc_collab, acc_conflict,
            P_DTYPE, REF_KIND, WEIGHT_DECAY, DECOUPLED, AMSGRAD, MAXIMIZE, STATS, IMPORTANCE, COMPUTE)
    if full_end < end:
        offs = _block_offsets(full_end, BLOCK)
        acc_count, acc_collab, acc_conflict = _adam_block(
            p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, r_ptr, s_ptr, u_ptr, offs, offs < end,
            lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, one_minus_lr_wd,
            bias_correction1, bias_correction2_sqrt, imp_beta1, imp_one_minus_beta1, imp_beta2, imp_one_minus_beta2,
            acc_count, acc_collab, acc_conflict,
            P_DTYPE, REF_KIND, WEIGHT_DECAY, DECOUPLED, AMSGRAD, MAXIMIZE, STATS, IMPORTANCE, COMPUTE)
    _store_partials(partials, pid, acc_count, acc_collab, acc_conflict, STATS)


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, references, stats, *,
               reference_format: str, lr, beta1: float, beta2: float, eps: float,
               weight_decay: float, decoupled_weight_decay: bool, amsgrad: bool, maximize: bool,
               bias_correction1: float = None, bias_correction2: float = None, device_steps=None,
               importance=None, importance_kind: str = "first", importance_betas=(0.85, 0.85)) -> None:
    """See :mod:`cnl_ext.ops` for the contract and :func:`cnl_ext.ops.torch_backend.adam_step_` for the math."""
    on_device = device_steps is not None
    sensitivities, uncertainties, importance_scalars, importance_code = _importance_args(
        importance, importance_kind, importance_betas)
    # derived constants in double, rounded once (as torch's Python-float hyper-parameters are)
    one_minus_lr_wd = 0.0 if isinstance(lr, torch.Tensor) else 1.0 - lr * weight_decay
    _launch(
        _adam_kernel,
        (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None, references, device_steps,
         sensitivities, uncertainties),
        params, references, stats, reference_format,
        (lr, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay, one_minus_lr_wd,
         1.0 if on_device else bias_correction1, 1.0 if on_device else bias_correction2**0.5),
        weight_decay, importance_scalars, DECOUPLED=decoupled_weight_decay, AMSGRAD=amsgrad, MAXIMIZE=maximize,
        STEP_ON_DEVICE=on_device, IMPORTANCE=importance_code,
    )
