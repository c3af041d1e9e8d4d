"""FusedCNLAdam: Adam (L2 weight decay, or decoupled as AdamW) with the CNL mask.

:func:`cnl_adam_step` is the definition of the step, every backend's kernels included (they are
tested against it bit for bit); :class:`FusedCNLAdam` steps all its tensors with one of them.
"""
from __future__ import annotations

import torch

from .. import functional
from .. import reference_format as rf
from ..ops.adam_scalars import (capturable_bias_corrections, correctly_rounded_sqrt, decay_scalars, inverse_lr,
                                step_size_of)
from ..ops.chunking import compute_dtype
from ._args import check_common, check_tensor_hyperparameter, scalar
from ._base import EXTRA_ARGUMENTS_DOC, CNLOptimizer, new_state, real_views
from ._rules import rule_gradient

__all__ = ["FusedCNLAdam", "cnl_adam_step"]


@torch.no_grad()
def cnl_adam_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, reference, *, reference_format: str, lr,
                  beta1: float, beta2: float, eps: float, weight_decay: float, decoupled_weight_decay: bool,
                  amsgrad: bool, maximize: bool, step, agem_reference=None, agem_coefficient=0.0, ewc_fisher=None,
                  ewc_anchor=None, ewc_lambda=0.0):
    """One tensor's CNL Adam / AdamW step, in place; the definition (every kernel equals it bit for bit).

    In the compute dtype (float32; float64 for float64 parameters and states), each operation
    rounded on its own, the new parameter rounded once to its dtype::

        g ← −g if maximize;   g ← g − c·r_agem;   g ← g + (2λ_ewc)·(F·(θ − θ*))  (cnl_ext.optim._rules)
        g ← g + λ·θ  (L2: weight_decay, not decoupled)
        m ← β1·m + (1−β1)·g;   v ← β2·v + (1−β2)·(g·g);   v̂ ← max(v̂, v)  (amsgrad; else v̂ = v)
        bc1 = 1 − β1^t;   bc2_sqrt = sqrt(1 − β2^t)
        step = (step_size·m) / (sqrt(v̂)/bc2_sqrt + ε),   step_size = lr / bc1   (torch.optim's order)
        Adam:  θ' = θ − step,               lr·u = step
        AdamW: θ' = θ·(1 − lr·λ) − step,    lr·u = step + (lr·λ)·θ
        θ ← θ where sign(r)·sign(lr·u) < 0 (conflicting), else θ'     (m, v, v̂: updated everywhere)

    ``step`` is t, the step count after this step: a number (the bias corrections in double, and
    ``step_size``, ``sqrt(bc2)``, ``1 − lr·λ``, ``lr·λ`` in double, each rounded once, as torch.optim's
    Python floats), or a 0-d float32 device tensor (capturable: :func:`capturable_bias_corrections`,
    ``step_size`` in the compute dtype). A Tensor ``lr`` makes the scalars derived from it in the
    compute dtype too. ``reference``: None (plain Adam), or stored in ``reference_format``
    (:func:`cnl_ext.reference_format.decode`). Returns None without a reference, else the statistics,
    float64 ``[3]``: (collaborative count, Σ s collaborative, Σ s conflicting) with ``s = r·(lr·u)``
    summed and then times ``1/lr`` (:func:`inverse_lr`), i.e. ``s = r·u``. ``agem_*`` / ``ewc_*``:
    A-GEM's projection and EWC's penalty, :func:`cnl_ext.optim._rules.rule_gradient` (off by default).
    """
    dtype = compute_dtype(param.dtype)
    device = param.device
    if isinstance(step, torch.Tensor):
        bias_correction1, bias_correction2_sqrt = capturable_bias_corrections(beta1, beta2, step, dtype)
    else:
        bias_correction1, bias_correction2_sqrt = 1 - beta1**step, (1 - beta2**step) ** 0.5
    step_size = step_size_of(lr, bias_correction1, dtype)
    lr_decay, decay_factor = decay_scalars(lr, weight_decay, dtype)
    # every scalar a 0-d tensor of the compute dtype: rounded once, and divided by exactly (a CUDA
    # division by a host scalar would multiply by its reciprocal)
    step_size, bias_correction2_sqrt, lr_decay, decay_factor = (
        torch.as_tensor(x, dtype=torch.float64, device=device).to(dtype)
        for x in (step_size, bias_correction2_sqrt, lr_decay, decay_factor))

    p, g = param.to(dtype), grad.to(dtype)
    if maximize:
        g = -g
    g = rule_gradient(g, p, agem_reference=agem_reference, agem_coefficient=agem_coefficient,
                      reference_format=reference_format, ewc_fisher=ewc_fisher, ewc_anchor=ewc_anchor,
                      ewc_lambda=ewc_lambda)
    if weight_decay != 0 and not decoupled_weight_decay:
        g = g + weight_decay * p
    exp_avg.copy_(beta1 * exp_avg + (1 - beta1) * g)
    exp_avg_sq.copy_(beta2 * exp_avg_sq + (1 - beta2) * (g * g))
    second = exp_avg_sq
    if amsgrad:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second = max_exp_avg_sq
    denom = correctly_rounded_sqrt(second) / bias_correction2_sqrt + eps
    adam_step = (step_size * exp_avg) / denom
    if decoupled_weight_decay and weight_decay != 0:
        new = p * decay_factor - adam_step
        lr_u = adam_step + lr_decay * p
    else:
        new = p - adam_step
        lr_u = adam_step
    stats = rf.apply_mask(param, p, new, lr_u, reference, reference_format)  # θ where sign(r)·sign(lr·u) < 0
    if stats is not None:
        stats[1:] *= inverse_lr(lr, dtype)  # Σ r·(lr·u) → Σ r·u
    return stats


class FusedCNLAdam(CNLOptimizer):
    """Drop-in for ``torch.optim.Adam``; with a reference set, only collaborative elements move.

    ``u = m̂ / (sqrt(v̂) + ε)`` (+ ``λ·θ`` with decoupled weight decay); an element moves by
    ``−lr·u`` only where ``sign(r)·sign(u) ≥ 0``, while the moments are updated everywhere. States
    are float32 for float32 and 16-bit parameters (docs/compatibility.md), float64 for float64 ones;
    ``state["step"]`` is a host scalar tensor as in torch,
    or a device one with ``capturable=True`` (then ``lr`` may be a device tensor too, and ``step``
    makes no host synchronization, so it can be captured in a CUDA graph).
    """

    _op = "adam_step_"
    _torch_setstate_defaults = dict(amsgrad=False, maximize=False, foreach=None, capturable=False,
                                    differentiable=False, fused=None, decoupled_weight_decay=False)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, backend="auto", reference_dtype="float32", track_stats=False,
                 importance=None, importance_betas=(0.85, 0.85), rule="cnl", ewc_lambda=0.0,
                 ewc_decay=1.0):
        name = type(self).__name__
        check_tensor_hyperparameter("lr", lr, foreach=foreach, capturable=capturable)
        check_common(name, lr, weight_decay, foreach=foreach, fused=fused, differentiable=differentiable)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        if not (all(isinstance(b, float) for b in betas) or all(isinstance(b, torch.Tensor) for b in betas)):
            raise ValueError("betas must be either both floats or both Tensors")
        for i, beta in enumerate(betas):
            check_tensor_hyperparameter(f"betas[{i}]", beta, foreach=foreach, capturable=capturable)
        betas = tuple(b.squeeze() if isinstance(b, torch.Tensor) and b.dim() != 0 else b for b in betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable, differentiable=False, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, backend=backend, reference_dtype=reference_dtype,
                         track_stats=track_stats, importance=importance, importance_betas=importance_betas,
                         rule=rule, ewc_lambda=ewc_lambda, ewc_decay=ewc_decay)

    def _state_of(self, p, capturable, amsgrad):
        """``p``'s state: its own, or a new one that ``step`` stores only once the step succeeded."""
        state = dict(self.state.get(p, {}))  # a copy: stored by step() only once the step succeeded
        if "step" not in state:
            # capturable: the step count lives on the device, so no step reads it back to the host
            state.update(step=torch.zeros((), dtype=torch.float32, device=p.device if capturable else "cpu"),
                         exp_avg=new_state(p), exp_avg_sq=new_state(p))
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])
        return state

    def _step_group(self, group, params, grads, stats):
        capturable = group["capturable"]
        states = [self._state_of(p, capturable, group["amsgrad"]) for p in params]
        beta1, beta2 = (scalar(beta) for beta in group["betas"])
        functional.cnl_adam(
            real_views(params), real_views(grads), real_views([s["exp_avg"] for s in states]),
            real_views([s["exp_avg_sq"] for s in states]), real_views([s.get("max_exp_avg_sq") for s in states]),
            [s["step"] for s in states], self._references_for(params), stats,
            lr=scalar(group["lr"], on_device=capturable or torch.compiler.is_compiling()), beta1=beta1,
            beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"], amsgrad=group["amsgrad"],
            maximize=group["maximize"], capturable=capturable, reference_format=self.reference_format,
            backend=self._step_backends, check=False, **self._importance_arguments(params, states),
            **self._rule_arguments(states),
        )
        for p, state in zip(params, states):
            self.state[p] = state


FusedCNLAdam.__doc__ += EXTRA_ARGUMENTS_DOC
