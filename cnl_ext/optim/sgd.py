"""FusedCNLSGD: SGD and momentum SGD (the paper's SGD and Momentum) with the CNL mask."""
from __future__ import annotations

import torch

from .. import functional
from ._args import check_common, scalar
from ._base import CNLOptimizer, real_views

__all__ = ["FusedCNLSGD"]


class FusedCNLSGD(CNLOptimizer):
    """Drop-in for ``torch.optim.SGD``; with a reference set, only collaborative elements move.

    ``u = g`` (+ weight decay), or the momentum buffer ``b ← μ·b + (1 − dampening)·g`` (``g + μ·b``
    with Nesterov); an element moves by ``−lr·u`` only where ``sign(r)·sign(u) ≥ 0``. The momentum
    buffer is updated for every element, in float32 for float32 and 16-bit parameters
    (docs/compatibility.md), in float64 for float64 ones.

    Extra arguments: ``backend`` (``"auto" | "torch" | "triton" | "native"``, see
    :mod:`cnl_ext.functional`), ``reference_dtype`` (``"float32" | "bfloat16" | "int8" | "sign2"``),
    ``track_stats`` (see :meth:`cnl_stats`), and ``importance`` (``None | "first" | "param_mix"``) with
    ``importance_betas``: KIF's importance EMAs kept in the same pass (see :meth:`importance_scores`);
    an observer: parameters and moments are bit-identical with it on.
    """

    _op = "sgd_step_"
    _torch_setstate_defaults = dict(nesterov=False, maximize=False, foreach=None, differentiable=False, fused=False)

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None,
                 backend="auto", reference_dtype="float32", track_stats=False, importance=None,
                 importance_betas=(0.85, 0.85)):
        name = type(self).__name__
        check_common(name, lr, weight_decay, foreach=foreach, fused=fused, differentiable=differentiable)
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=False, fused=fused)
        super().__init__(params, defaults, backend=backend, reference_dtype=reference_dtype,
                         track_stats=track_stats, importance=importance, importance_betas=importance_betas)

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
        )
        for i, (p, state) in enumerate(zip(params, states)):
            if use_momentum and state.get("momentum_buffer") is None:  # created by cnl_sgd (as the real view)
                state["momentum_buffer"] = torch.view_as_complex(buffers[i]) if p.is_complex() else buffers[i]
            if state:
                self.state[p] = state
