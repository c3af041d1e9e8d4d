"""FusedCNLAdamW: AdamW with the CNL mask; the decay term is part of the masked update (spec).

Its step is defined by :func:`cnl_ext.optim.adam.cnl_adam_step` with ``decoupled_weight_decay=True``.
"""
from __future__ import annotations

from .adam import FusedCNLAdam

__all__ = ["FusedCNLAdamW"]


class FusedCNLAdamW(FusedCNLAdam):
    """Drop-in for ``torch.optim.AdamW``: ``u = m̂ / (sqrt(v̂) + ε) + λ·θ``, so a frozen element is
    not decayed either. See :class:`FusedCNLAdam` for the arguments."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 backend="auto", reference_dtype="float32", track_stats=False, importance=None,
                 importance_betas=(0.85, 0.85), rule="cnl", ewc_lambda=0.0,
                 ewc_decay=1.0):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, backend=backend, reference_dtype=reference_dtype,
                         track_stats=track_stats, importance=importance, importance_betas=importance_betas,
                         rule=rule, ewc_lambda=ewc_lambda, ewc_decay=ewc_decay)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # as torch.optim.AdamW: whatever the checkpoint says
            group["decoupled_weight_decay"] = True
