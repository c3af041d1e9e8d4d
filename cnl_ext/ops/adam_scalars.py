"""The scalars of an Adam step that the definition (:func:`cnl_ext.optim.adam.cnl_adam_step`) and the
backends compute alike: the capturable bias corrections, the step size ``lr / bc1``, the statistics'
``1/lr``, and a correctly rounded sqrt. Here, below both, so that the backends need not import the
optimizers."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["capturable_bias_corrections", "capturable_step_scalars", "step_size_of", "decay_scalars", "inverse_lr",
           "correctly_rounded_sqrt"]


def correctly_rounded_sqrt(x: torch.Tensor, out: torch.Tensor = None) -> torch.Tensor:
    """``sqrt(x)`` correctly rounded, as IEEE 754 and every kernel compute it (torch's own CPU sqrt is
    MKL's, an ulp off for about a sixth of float32 values and 1% of float64 ones); into ``out`` if given.
    On CPU numpy's (the instruction's), except under torch.compile, which traces torch's."""
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        if out is None:
            return torch.from_numpy(np.asarray(np.sqrt(x.numpy())))
        np.sqrt(x.numpy(), out=out.numpy())
        return out
    return torch.sqrt(x, out=out)


def capturable_bias_corrections(beta1: float, beta2: float, step: torch.Tensor, dtype: torch.dtype):
    """``(1 − β1^t, sqrt(1 − β2^t))`` from a device step count (a 0-d float32 tensor: capturable), as 0-d
    tensors on its device, in ``dtype`` (β rounded to it, t converted, pow, ``1 − x`` and sqrt each
    rounded to it): nothing is read back to the host."""
    t = step.to(dtype)
    bias_correction1 = 1 - torch.pow(torch.full((), beta1, dtype=dtype, device=t.device), t)
    bias_correction2 = 1 - torch.pow(torch.full((), beta2, dtype=dtype, device=t.device), t)
    return bias_correction1, correctly_rounded_sqrt(bias_correction2)


def step_size_of(lr, bias_correction1, dtype: torch.dtype):
    """``lr / bc1``: in double for a float lr and a float bc1 (as torch.optim; the kernels round it once
    to ``dtype``), else a 0-d tensor in ``dtype`` on the device (a Tensor lr, device bias corrections)."""
    if not isinstance(lr, torch.Tensor) and not isinstance(bias_correction1, torch.Tensor):
        return lr / bias_correction1
    device = (lr if isinstance(lr, torch.Tensor) else bias_correction1).device
    lr, bias_correction1 = (torch.as_tensor(x, dtype=torch.float64, device=device).to(dtype)
                            for x in (lr, bias_correction1))
    return torch.div(lr, bias_correction1)


def capturable_step_scalars(lr, beta1: float, beta2: float, device_steps, dtype: torch.dtype) -> list:
    """Per tensor, ``(lr / bc1, sqrt(bc2))`` from its device step count (:func:`capturable_bias_corrections`,
    :func:`step_size_of`), as 0-d tensors on the device."""
    scalars = []
    for step in device_steps:
        bias_correction1, bias_correction2_sqrt = capturable_bias_corrections(beta1, beta2, step, dtype)
        scalars.append((step_size_of(lr, bias_correction1, dtype), bias_correction2_sqrt))
    return scalars


def decay_scalars(lr, weight_decay: float, dtype: torch.dtype):
    """AdamW's ``(lr·λ, 1 − lr·λ)``: in double for a float lr (rounded once by whatever takes them), in
    ``dtype`` on the device for a Tensor lr."""
    if isinstance(lr, torch.Tensor):
        lr_decay = lr.to(dtype) * weight_decay
        return lr_decay, 1 - lr_decay
    return lr * weight_decay, 1 - lr * weight_decay


def inverse_lr(lr, dtype: torch.dtype):
    """The statistics' ``1/lr`` (float64), lr as the step computes with it (rounded to ``dtype``); 0 at
    lr = 0, where nothing moves and every sum is 0. A Tensor lr gives a device tensor (no read-back)."""
    if isinstance(lr, torch.Tensor):
        lr = lr.to(dtype).double()
        return torch.where(lr == 0, torch.zeros_like(lr), 1 / lr)
    lr = torch.tensor(lr, dtype=dtype).item()
    return 1.0 / lr if lr != 0 else 0.0
