"""Checks of the constructor arguments that the CNL optimizers share with torch.optim."""
from __future__ import annotations

import torch


def check_common(name: str, lr, weight_decay, *, foreach, fused, differentiable, capturable=False) -> None:
    """Reject what the fused CNL optimizers do not do, with the reason, at construction."""
    if isinstance(lr, torch.Tensor):
        if not capturable:
            raise ValueError(f"{name}: lr as a Tensor is supported only with capturable=True; pass a float")
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"{name}: a Tensor lr must be a floating-point scalar, got shape {tuple(lr.shape)} {lr.dtype}")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if foreach:
        raise ValueError(f"{name} is a fused multi-tensor optimizer; foreach=True does not apply (choose backend=)")
    if fused is False:
        raise ValueError(f"{name} is always fused; for the unfused PyTorch reference use backend='torch'")
    if differentiable:
        raise ValueError(f"{name} does not support differentiable=True (its kernels are not differentiable)")
