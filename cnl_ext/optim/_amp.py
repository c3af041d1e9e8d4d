"""GradScaler support (``_step_supports_amp_scaling``), shared by the CNL optimizers.

``torch.amp.GradScaler`` hands a fused optimizer ``grad_scale`` (None once the user has called
``unscale_``) and ``found_inf`` as attributes before ``step``. Like the scaler's path for unfused
optimizers, this reads both with one host synchronization: a step with inf/NaN gradients is skipped
whole (parameters, states and step counts untouched), otherwise the gradients are unscaled in place.
"""
from __future__ import annotations

import torch


def skip_or_unscale(optimizer, grads) -> bool:
    """True if this step must be skipped; else unscale ``grads`` in place when a scale is pending."""
    grad_scale = getattr(optimizer, "grad_scale", None)
    found_inf = getattr(optimizer, "found_inf", None)
    if grad_scale is None and found_inf is None:
        return False
    flags = [t.detach().reshape(()).to(torch.float64) for t in (found_inf, grad_scale) if t is not None]
    values = torch.stack([f.to(flags[0].device) for f in flags]).tolist()  # stacked on the device: one host sync
    if found_inf is not None and values.pop(0) != 0:
        return True
    if grad_scale is not None and grads:
        torch._foreach_mul_(grads, 1.0 / values[0])
    return False
