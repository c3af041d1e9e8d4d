"""CNL Adam / AdamW in Triton (torch.optim.Adam / AdamW semantics, then the CNL mask), multi-tensor.

Layout, launch and the shared device functions: :mod:`.triton_step`; math:
:func:`cnl_ext.optim.adam.cnl_adam_step` (the definition).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .adam_scalars import capturable_step_scalars, step_size_of
from .chunking import compute_dtype
from .triton_step import (_block_offsets, _chunk_bounds, _div, _importance_args, _importance_update, _launch, _load,
                          _load_param_and_grad, _masked_update, _pointer, _round_to, _rule_args, _rule_gradient,
                          _scalar, _sqrt, _store_partials)

__all__ = ["adam_step_"]


@triton.jit
def _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, r_ptr, s_ptr, u_ptr, f_ptr, a_ptr, offs, mask,
                lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, one_minus_lr_wd,
                lr_weight_decay, step_size, bias_correction2_sqrt, two_lambda, agem_coefficient,
                imp_beta1, imp_one_minus_beta1, imp_beta2, imp_one_minus_beta2,
                acc_count, acc_collab, acc_conflict,
                P_DTYPE: tl.constexpr, REF_KIND: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, STATS: tl.constexpr,
                IMPORTANCE: tl.constexpr, EWC: tl.constexpr, PROJECT: tl.constexpr, COMPUTE: tl.constexpr):
    p, g = _load_param_and_grad(p_ptr, g_ptr, offs, mask, MAXIMIZE, COMPUTE)
    g_passed = -g if MAXIMIZE else g
    g = _rule_gradient(g, p, r_ptr, f_ptr, a_ptr, offs, mask, two_lambda, agem_coefficient, REF_KIND, PROJECT, EWC,
                       COMPUTE)
    if WEIGHT_DECAY and not DECOUPLED:
        g = g + weight_decay * p
    m = beta1 * _load(m_ptr, offs, mask) + one_minus_beta1 * g
    v = beta2 * _load(v_ptr, offs, mask) + one_minus_beta2 * (g * g)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if AMSGRAD:
        v = tl.maximum(_load(vmax_ptr, offs, mask), v)
        tl.store(vmax_ptr + offs, v, mask=mask)
    # torch.optim's order: step = (step_size·m) / denom; the mask and the statistics see lr·u
    denom = _div(_sqrt(v, COMPUTE), bias_correction2_sqrt, COMPUTE) + eps
    step = _div(step_size * m, denom, COMPUTE)
    if WEIGHT_DECAY and DECOUPLED:
        lr_u = step + lr_weight_decay * p
        new_p = p * one_minus_lr_wd - step  # torch.optim.AdamW's order
    else:
        lr_u = step
        new_p = p - step
    if not PROJECT:  # A-GEM's reference projected the gradient: no mask
        new_p, acc_count, acc_collab, acc_conflict = _masked_update(
            p, new_p, lr_u, r_ptr, offs, mask, acc_count, acc_collab, acc_conflict, REF_KIND, STATS, COMPUTE)
    stored_p = _round_to(new_p, P_DTYPE)
    tl.store(p_ptr + offs, stored_p, mask=mask)
    _importance_update(stored_p, g_passed, s_ptr, u_ptr, offs, mask, imp_beta1, imp_one_minus_beta1, imp_beta2,
                       imp_one_minus_beta2, IMPORTANCE)
    return acc_count, acc_collab, acc_conflict


@triton.jit
def _adam_kernel(
    ptr_table, chunk_tensor, chunk_start, numels, partials,
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, one_minus_lr_wd,
    lr_weight_decay, step_size, bias_correction2_sqrt, two_lambda, agem_coefficient, imp_beta1, imp_one_minus_beta1,
    imp_beta2, imp_one_minus_beta2,
    P_DTYPE: tl.constexpr, R_DTYPE: tl.constexpr, REF_KIND: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr, STATS: tl.constexpr, IMPORTANCE: tl.constexpr, EWC: tl.constexpr,
    PROJECT: tl.constexpr, LR_ON_DEVICE: tl.constexpr,
    STEP_ON_DEVICE: tl.constexpr, COMPUTE: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # pointer table columns: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, reference, (unused),
    # sensitivity, uncertainty, EWC's F and anchor. COMPUTE: the arithmetic's, the moments' and the sums' dtype (float64
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
    lr_weight_decay = _scalar(lr_weight_decay, False, COMPUTE)
    two_lambda = _scalar(two_lambda, False, COMPUTE)
    agem_coefficient = _scalar(agem_coefficient, False, COMPUTE)
    if LR_ON_DEVICE:  # the host computed lr·λ and 1 − lr·λ for a float lr; with a device lr, as the torch backend does
        lr_weight_decay = lr * weight_decay
        one_minus_lr_wd = 1 - lr_weight_decay
    t, start, full_end, end = _chunk_bounds(chunk_tensor, chunk_start, numels, pid, CHUNK, BLOCK)
    p_ptr = _pointer(ptr_table, t, 0, 11, P_DTYPE, ALIGNED)
    g_ptr = _pointer(ptr_table, t, 1, 11, P_DTYPE, ALIGNED)
    m_ptr = _pointer(ptr_table, t, 2, 11, COMPUTE, ALIGNED)
    v_ptr = _pointer(ptr_table, t, 3, 11, COMPUTE, ALIGNED)
    vmax_ptr = _pointer(ptr_table, t, 4, 11, COMPUTE, ALIGNED)
    r_ptr = _pointer(ptr_table, t, 5, 11, R_DTYPE, ALIGNED)
    s_ptr = _pointer(ptr_table, t, 7, 11, tl.float32, ALIGNED)
    u_ptr = _pointer(ptr_table, t, 8, 11, tl.float32, ALIGNED)
    f_ptr = _pointer(ptr_table, t, 9, 11, tl.float32, ALIGNED)
    a_ptr = _pointer(ptr_table, t, 10, 11, P_DTYPE, ALIGNED)
    if STEP_ON_DEVICE:  # this tensor's step size and sqrt(bc2), which the host computed on the device
        step_size = tl.load(step_size + t)
        bias_correction2_sqrt = tl.load(bias_correction2_sqrt + t)
    else:
        step_size = _scalar(step_size, False, COMPUTE)
        bias_correction2_sqrt = _scalar(bias_correction2_sqrt, False, COMPUTE)
    acc_count = tl.zeros((), COMPUTE)
    acc_collab = tl.zeros((), COMPUTE)
    acc_conflict = tl.zeros((), COMPUTE)
    for block_start in range(start, full_end, BLOCK):
        acc_count, acc_collab, acc_conflict = _adam_block(
            p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, r_ptr, s_ptr, u_ptr, f_ptr, a_ptr, _block_offsets(block_start, BLOCK), None,
            lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, one_minus_lr_wd,
            lr_weight_decay, step_size, bias_correction2_sqrt, two_lambda, agem_coefficient, imp_beta1,
            imp_one_minus_beta1, imp_beta2, imp_one_minus_beta2, acc_count, acc_collab, acc_conflict,
            P_DTYPE, REF_KIND, WEIGHT_DECAY, DECOUPLED, AMSGRAD, MAXIMIZE, STATS, IMPORTANCE, EWC, PROJECT, COMPUTE)
    if full_end < end:
        offs = _block_offsets(full_end, BLOCK)
        acc_count, acc_collab, acc_conflict = _adam_block(
            p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, r_ptr, s_ptr, u_ptr, f_ptr, a_ptr, offs, offs < end,
            lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, one_minus_lr_wd,
            lr_weight_decay, step_size, bias_correction2_sqrt, two_lambda, agem_coefficient, imp_beta1,
            imp_one_minus_beta1, imp_beta2, imp_one_minus_beta2, acc_count, acc_collab, acc_conflict,
            P_DTYPE, REF_KIND, WEIGHT_DECAY, DECOUPLED, AMSGRAD, MAXIMIZE, STATS, IMPORTANCE, EWC, PROJECT, COMPUTE)
    # the sums of lr·u, scaled by 1/lr (0 at lr = 0, where nothing moves)
    inv_lr = tl.where(lr == 0, 0.0, _div(tl.full((), 1.0, COMPUTE), tl.where(lr == 0, 1.0, lr), COMPUTE))
    _store_partials(partials, pid, acc_count, acc_collab * inv_lr, acc_conflict * inv_lr, STATS)


def _adam_step_scalars(params, lr, beta1, beta2, bias_correction1, bias_correction2, device_steps):
    """(step size, sqrt(bc2)) of the step: floats (the kernel rounds them once), or with a device lr or
    device step counts, one of each per tensor in device arrays, from the definition's torch ops
    (:mod:`.adam_scalars`: Triton's interpreter has no pow)."""
    if device_steps is None and not isinstance(lr, torch.Tensor):
        return lr / bias_correction1, bias_correction2**0.5
    dtype, device, n = compute_dtype(params[0].dtype), params[0].device, len(params)
    if device_steps is None:
        step_size = step_size_of(lr, bias_correction1, dtype).expand(n).contiguous()
        return step_size, torch.full((n,), bias_correction2**0.5, dtype=dtype, device=device)
    step_sizes, bias_correction2_sqrts = zip(*capturable_step_scalars(lr, beta1, beta2, device_steps, dtype))
    return torch.stack(step_sizes), torch.stack(bias_correction2_sqrts)


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, references, stats, *,
               reference_format: str, lr, beta1: float, beta2: float, eps: float,
               weight_decay: float, decoupled_weight_decay: bool, amsgrad: bool, maximize: bool,
               bias_correction1: float = None, bias_correction2: float = None, device_steps=None,
               importance=None, importance_kind: str = "first", importance_betas=(0.85, 0.85), ewc=None, ewc_lambda=0.0,
              agem_coefficient=None) -> None:
    """See :mod:`cnl_ext.ops` for the contract and :func:`cnl_ext.optim.adam.cnl_adam_step` for the math; the
    rule's terms (``ewc``, ``ewc_lambda``, ``agem_coefficient``: :mod:`cnl_ext.ops.rules`) in the same pass."""
    fishers, anchors, rule_scalars, rule_constexprs = _rule_args(references, ewc, ewc_lambda, agem_coefficient)
    if rule_constexprs["PROJECT"]:
        stats = None  # nothing is masked
    sensitivities, uncertainties, importance_scalars, importance_code = _importance_args(
        importance, importance_kind, importance_betas)
    # derived constants in double, rounded once (as torch's Python-float hyper-parameters are)
    host_lr = not isinstance(lr, torch.Tensor)
    one_minus_lr_wd, lr_weight_decay = (1.0 - lr * weight_decay, lr * weight_decay) if host_lr else (0.0, 0.0)
    step_size, bias_correction2_sqrt = _adam_step_scalars(params, lr, beta1, beta2, bias_correction1,
                                                          bias_correction2, device_steps)
    on_device = isinstance(step_size, torch.Tensor)
    _launch(
        _adam_kernel,
        (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None, references, None,
         sensitivities, uncertainties, fishers, anchors),
        params, references, stats, reference_format,
        (lr, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay, one_minus_lr_wd, lr_weight_decay,
         step_size, bias_correction2_sqrt, *rule_scalars),
        weight_decay, importance_scalars, DECOUPLED=decoupled_weight_decay, AMSGRAD=amsgrad, MAXIMIZE=maximize,
        STEP_ON_DEVICE=on_device, IMPORTANCE=importance_code, **rule_constexprs,
    )
