"""Checks of the constructor arguments that the CNL optimizers share with torch.optim.

The hyperparameters are validated as torch.optim validates them (same exception types and, where
torch words them so, the same messages). ``foreach`` and ``fused`` are accepted with any value:
every CNL step is one fused multi-tensor pass, whatever they say, with the same math as torch's
for-loop implementation (``foreach=False``); they are stored in the param groups as given, so a
checkpoint tells torch.optim nothing it was not told (see docs/compatibility.md).
"""
from __future__ import annotations

import torch


def check_tensor_hyperparameter(what: str, value, *, foreach, capturable) -> None:
    """torch.optim's rules for a Tensor ``lr`` or beta: one element, and not foreach without capturable."""
    if not isinstance(value, torch.Tensor):
        return
    if foreach and not capturable:
        raise ValueError(f"{what} as a Tensor is not supported for capturable=False and foreach=True")
    if value.numel() != 1:
        raise ValueError(f"Tensor {what} must be 1-element")
    if value.is_complex() or not value.is_floating_point():
        raise ValueError(f"Tensor {what} must be a real floating-point tensor, got {value.dtype}")


def check_common(name: str, lr, weight_decay, *, foreach, fused, differentiable) -> None:
    """Reject what torch.optim rejects, and what the fused CNL optimizers do not do, at construction."""
    check_tensor_hyperparameter("lr", lr, foreach=False, capturable=False)
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if differentiable:
        raise ValueError(f"{name} does not support differentiable=True (its kernels are not differentiable)")


def scalar(value, on_device: bool = False):
    """A hyperparameter as the kernels take it at one step: a Tensor ``lr`` or beta read once as a
    float, unless ``on_device`` (capturable, or a compiled step), where a Tensor stays as it is."""
    if isinstance(value, torch.Tensor) and not on_device:
        return value.item()
    return value
