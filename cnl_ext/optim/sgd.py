"""FusedCNLSGD: SGD and momentum SGD (the paper's SGD and Momentum) with the CNL mask.

:func:`cnl_sgd_step` is the definition of the step, every backend's kernels included (they are
tested against it bit for bit); :class:`FusedCNLSGD` steps all its tensors with one of them.
"""
from __future__ import annotations

import torch

from .. import functional
from .. import reference_format as rf
from ..ops.chunking import compute_dtype
from ._args import check_common, scalar
from ._base import EXTRA_ARGUMENTS_DOC, CNLOptimizer, real_views
from ._rules import rule_gradient

__all__ = ["FusedCNLSGD", "cnl_sgd_step"]


@torch.no_grad()
def cnl_sgd_step(param, grad, momentum_buffer, reference, *, reference_format: str, lr, weight_decay: float,
                 momentum: float, dampening: float, nesterov: bool, maximize: bool, first_step: bool,
                 agem_reference=None, agem_coefficient=0.0, ewc_fisher=None, ewc_anchor=None, ewc_lambda=0.0):
    """One tensor's CNL SGD / momentum / Nesterov step, in place; the definition (every kernel equals it
    bit for bit).

    In the compute dtype (float32; float64 for float64 parameters and buffers), each operation rounded
    on its own, the new parameter rounded once to its dtype (torch.optim.SGD's order)::

        g ← −g if maximize;   g ← g − c·r_agem;   g ← g + (2λ_ewc)·(F·(θ − θ*));   g ← g + λ·θ  (weight_decay λ)
        b ← g on the first step, else b ← μ·b + (1 − dampening)·g      (momentum μ; no buffer: u = g)
        u = b, or g + μ·b with Nesterov
        θ' = θ − lr·u
        θ ← θ where sign(r)·sign(u) < 0 (conflicting), else θ'          (b: updated everywhere)

    ``momentum_buffer``: None without momentum. ``lr``: a float, or a 0-d tensor (rounded to the
    compute dtype). ``reference``: None (plain SGD), or stored in ``reference_format``
    (:func:`cnl_ext.reference_format.decode`). Returns None without a reference, else the statistics,
    float64 ``[3]``: (collaborative count, Σ s collaborative, Σ s conflicting), ``s = r·u``.
    ``agem_*`` / ``ewc_*``: A-GEM's projection (``c``: the step's coefficient over all tensors) and
    EWC's penalty, :func:`cnl_ext.optim._rules.rule_gradient` (off by default).
    """
    dtype = compute_dtype(param.dtype)
    if isinstance(lr, torch.Tensor):
        lr = lr.to(dtype)
    p, g = param.to(dtype), grad.to(dtype)
    if maximize:
        g = -g
    g = rule_gradient(g, p, agem_reference=agem_reference, agem_coefficient=agem_coefficient,
                      reference_format=reference_format, ewc_fisher=ewc_fisher, ewc_anchor=ewc_anchor,
                      ewc_lambda=ewc_lambda)
    if weight_decay != 0:
        g = g + weight_decay * p
    u = g
    if momentum_buffer is not None:
        momentum_buffer.copy_(g if first_step else momentum * momentum_buffer + (1 - dampening) * g)
        u = g + momentum * momentum_buffer if nesterov else momentum_buffer
    new = p - lr * u
    return rf.apply_mask(param, p, new, u, reference, reference_format)  # θ where sign(r)·sign(u) < 0


class FusedCNLSGD(CNLOptimizer):
    """Drop-in for ``torch.optim.SGD``; with a reference set, only collaborative elements move.

    ``u = g`` (+ weight decay), or the momentum buffer ``b ← μ·b + (1 − dampening)·g`` (``g + μ·b``
    with Nesterov); an element moves by ``−lr·u`` only where ``sign(r)·sign(u) ≥ 0``. The momentum
    buffer is updated for every element, in float32 for float32 and 16-bit parameters
    (docs/compatibility.md), in float64 for float64 ones.
    """

    _op = "sgd_step_"
    _torch_setstate_defaults = dict(nesterov=False, maximize=False, foreach=None, differentiable=False, fused=False)

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None,
                 backend="auto", reference_dtype="float32", track_stats=False, importance=None,
                 importance_betas=(0.85, 0.85), rule="cnl", ewc_lambda=0.0,
                 ewc_decay=1.0):
        name = type(self).__name__
        check_common(name, lr, weight_decay, foreach=foreach, fused=fused, differentiable=differentiable)
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=False, fused=fused)
        super().__init__(params, defaults, backend=backend, reference_dtype=reference_dtype,
                         track_stats=track_stats, importance=importance, importance_betas=importance_betas,
                         rule=rule, ewc_lambda=ewc_lambda, ewc_decay=ewc_decay)

    def _step_group(self, group, params, grads, stats):
        use_momentum = group["momentum"] != 0
        states = [dict(self.state.get(p, {})) for p in params]  # stored only once the step succeeded
        buffers = real_views([state.get("momentum_buffer") for state in states]) if use_momentum else None
        functional.cnl_sgd(
            real_views(params), real_views(grads), buffers, self._references_for(params), stats,
            lr=scalar(group["lr"], on_device=torch.compiler.is_compiling()), weight_decay=group["weight_decay"],
            momentum=group["momentum"], dampening=group["dampening"], nesterov=group["nesterov"],
            maximize=group["maximize"], reference_format=self.reference_format, backend=self._step_backends,
            check=False, **self._importance_arguments(params, states),
            **self._rule_arguments(states),
        )
        for i, (p, state) in enumerate(zip(params, states)):
            if use_momentum and state.get("momentum_buffer") is None:  # created by cnl_sgd (as the real view)
                state["momentum_buffer"] = torch.view_as_complex(buffers[i]) if p.is_complex() else buffers[i]
            if state:
                self.state[p] = state


FusedCNLSGD.__doc__ += EXTRA_ARGUMENTS_DOC
