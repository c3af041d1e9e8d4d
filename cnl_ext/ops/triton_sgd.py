"""CNL SGD / momentum SGD in Triton (torch.optim.SGD semantics, then the CNL mask), multi-tensor.

Layout, launch and the shared device functions: :mod:`.triton_step`; math:
:func:`cnl_ext.ops.torch_backend.sgd_step_`.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_step import (_block_offsets, _chunk_bounds, _importance_args, _importance_update, _launch, _load,
                          _load_param_and_grad, _masked_update, _pointer, _round_to, _rule_args, _rule_gradient,
                          _scalar, _store_partials)

__all__ = ["sgd_step_"]


@triton.jit
def _sgd_block(p_ptr, g_ptr, b_ptr, r_ptr, s_ptr, u_ptr, f_ptr, a_ptr, offs, mask, lr, weight_decay, momentum,
               one_minus_dampening, two_lambda, agem_coefficient, imp_beta1, imp_one_minus_beta1, imp_beta2,
               imp_one_minus_beta2, acc_count, acc_collab, acc_conflict,
               P_DTYPE: tl.constexpr, REF_KIND: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
               FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
               MAXIMIZE: tl.constexpr, STATS: tl.constexpr, IMPORTANCE: tl.constexpr, EWC: tl.constexpr,
               PROJECT: tl.constexpr, COMPUTE: tl.constexpr):
    p, g = _load_param_and_grad(p_ptr, g_ptr, offs, mask, MAXIMIZE, COMPUTE)
    g_passed = -g if MAXIMIZE else g
    g = _rule_gradient(g, p, r_ptr, f_ptr, a_ptr, offs, mask, two_lambda, agem_coefficient, REF_KIND, PROJECT, EWC,
                       COMPUTE)
    if WEIGHT_DECAY:
        g = g + weight_decay * p
    u = g
    if HAS_MOMENTUM:
        if FIRST_STEP:  # torch.optim.SGD starts the buffer at the first gradient, undamped
            b = g
        else:
            b = momentum * _load(b_ptr, offs, mask) + one_minus_dampening * g
        tl.store(b_ptr + offs, b, mask=mask)
        if NESTEROV:
            u = g + momentum * b
        else:
            u = b
    new_p = p - lr * u
    if not PROJECT:  # A-GEM's reference projected the gradient: no mask
        new_p, acc_count, acc_collab, acc_conflict = _masked_update(
            p, new_p, u, r_ptr, offs, mask, acc_count, acc_collab, acc_conflict, REF_KIND, STATS, COMPUTE)
    stored_p = _round_to(new_p, P_DTYPE)
    tl.store(p_ptr + offs, stored_p, mask=mask)
    _importance_update(stored_p, g_passed, s_ptr, u_ptr, offs, mask, imp_beta1, imp_one_minus_beta1, imp_beta2,
                       imp_one_minus_beta2, IMPORTANCE)
    return acc_count, acc_collab, acc_conflict


@triton.jit
def _sgd_kernel(
    ptr_table, chunk_tensor, chunk_start, numels, partials,
    lr, weight_decay, momentum, one_minus_dampening, two_lambda, agem_coefficient, imp_beta1, imp_one_minus_beta1,
    imp_beta2, imp_one_minus_beta2,
    P_DTYPE: tl.constexpr, R_DTYPE: tl.constexpr, REF_KIND: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr, STATS: tl.constexpr, IMPORTANCE: tl.constexpr,
    EWC: tl.constexpr, PROJECT: tl.constexpr, LR_ON_DEVICE: tl.constexpr, COMPUTE: tl.constexpr,
    ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    # pointer table columns: param, grad, momentum buffer, reference, sensitivity, uncertainty, EWC's F
    # and anchor.
    # COMPUTE: the arithmetic's, the momentum buffer's and the sums' dtype (float64 for float64 params).
    pid = tl.program_id(0)
    lr = _scalar(lr, LR_ON_DEVICE, COMPUTE)
    weight_decay = _scalar(weight_decay, False, COMPUTE)
    momentum = _scalar(momentum, False, COMPUTE)
    one_minus_dampening = _scalar(one_minus_dampening, False, COMPUTE)
    two_lambda = _scalar(two_lambda, False, COMPUTE)
    agem_coefficient = _scalar(agem_coefficient, False, COMPUTE)
    t, start, full_end, end = _chunk_bounds(chunk_tensor, chunk_start, numels, pid, CHUNK, BLOCK)
    p_ptr = _pointer(ptr_table, t, 0, 8, P_DTYPE, ALIGNED)
    g_ptr = _pointer(ptr_table, t, 1, 8, P_DTYPE, ALIGNED)
    b_ptr = _pointer(ptr_table, t, 2, 8, COMPUTE, ALIGNED)
    r_ptr = _pointer(ptr_table, t, 3, 8, R_DTYPE, ALIGNED)
    s_ptr = _pointer(ptr_table, t, 4, 8, tl.float32, ALIGNED)
    u_ptr = _pointer(ptr_table, t, 5, 8, tl.float32, ALIGNED)
    f_ptr = _pointer(ptr_table, t, 6, 8, tl.float32, ALIGNED)
    a_ptr = _pointer(ptr_table, t, 7, 8, P_DTYPE, ALIGNED)
    acc_count = tl.zeros((), COMPUTE)
    acc_collab = tl.zeros((), COMPUTE)
    acc_conflict = tl.zeros((), COMPUTE)
    for block_start in range(start, full_end, BLOCK):
        acc_count, acc_collab, acc_conflict = _sgd_block(
            p_ptr, g_ptr, b_ptr, r_ptr, s_ptr, u_ptr, f_ptr, a_ptr, _block_offsets(block_start, BLOCK), None,
            lr, weight_decay, momentum, one_minus_dampening, two_lambda, agem_coefficient, imp_beta1,
            imp_one_minus_beta1, imp_beta2,
            imp_one_minus_beta2, acc_count, acc_collab, acc_conflict,
            P_DTYPE, REF_KIND, HAS_MOMENTUM, FIRST_STEP, NESTEROV, WEIGHT_DECAY, MAXIMIZE, STATS, IMPORTANCE,
            EWC, PROJECT, COMPUTE)
    if full_end < end:
        offs = _block_offsets(full_end, BLOCK)
        acc_count, acc_collab, acc_conflict = _sgd_block(
            p_ptr, g_ptr, b_ptr, r_ptr, s_ptr, u_ptr, f_ptr, a_ptr, offs, offs < end,
            lr, weight_decay, momentum, one_minus_dampening, two_lambda, agem_coefficient, imp_beta1,
            imp_one_minus_beta1, imp_beta2,
            imp_one_minus_beta2, acc_count, acc_collab, acc_conflict,
            P_DTYPE, REF_KIND, HAS_MOMENTUM, FIRST_STEP, NESTEROV, WEIGHT_DECAY, MAXIMIZE, STATS, IMPORTANCE,
            EWC, PROJECT, COMPUTE)
    _store_partials(partials, pid, acc_count, acc_collab, acc_conflict, STATS)


def sgd_step_(params, grads, momentum_buffers, references, stats, *, reference_format: str, lr,
              weight_decay: float, momentum: float, dampening: float, nesterov: bool, maximize: bool,
              first_step: bool, importance=None, importance_kind: str = "first",
              importance_betas=(0.85, 0.85), ewc=None, ewc_lambda=0.0,
              agem_coefficient=None) -> None:
    """See :mod:`cnl_ext.ops` for the contract and :func:`cnl_ext.ops.torch_backend.sgd_step_` for the math; the
    rule's terms (``ewc``, ``ewc_lambda``, ``agem_coefficient``: :mod:`cnl_ext.ops.rules`) in the same pass."""
    sensitivities, uncertainties, importance_scalars, importance_code = _importance_args(
        importance, importance_kind, importance_betas)
    fishers, anchors, rule_scalars, rule_constexprs = _rule_args(references, ewc, ewc_lambda, agem_coefficient)
    _launch(
        _sgd_kernel, (params, grads, momentum_buffers, references, sensitivities, uncertainties, fishers, anchors),
        params, references, None if rule_constexprs["PROJECT"] else stats, reference_format,
        (lr, weight_decay, momentum, 1.0 - dampening, *rule_scalars), weight_decay,
        importance_scalars, HAS_MOMENTUM=momentum_buffers is not None, FIRST_STEP=first_step, NESTEROV=nesterov,
        MAXIMIZE=maximize, IMPORTANCE=importance_code, **rule_constexprs,
    )
