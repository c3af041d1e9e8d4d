"""The ``"triton"`` backend: multi-tensor Triton kernels (:mod:`.triton_sgd`, :mod:`.triton_adam`,
:mod:`.triton_masked_delta`, KIF's fusion passes in :mod:`.kif_fusion_triton`; what they share:
:mod:`.triton_step`).

Triton runs CUDA tensors, and CPU tensors only under its interpreter (``TRITON_INTERPRET=1``, set
before triton is imported), which the tests use to check the kernels without a GPU. Importing this
module imports triton: an ImportError here means the backend is unavailable.
"""
from __future__ import annotations

import os

import torch

from . import triton_step
from .contract import OPS, STEP_OPS, Capabilities
from .rules import agem_dot_  # A-GEM's reduction: PyTorch's (a few ops per tensor)
from .kif_fusion_triton import recurrent_fuse_ as kif_recurrent_fuse_
from .kif_fusion_triton import task_vector_fuse_ as kif_task_vector_fuse_
from .triton_masked_delta import masked_delta_
from .triton_adam import adam_step_
from .triton_sgd import sgd_step_

NAME = "triton"

__all__ = ["NAME", "unavailable_reason", "capabilities", "prepare", "sgd_step_", "adam_step_",
           "masked_delta_", "agem_dot_", "kif_task_vector_fuse_", "kif_recurrent_fuse_"]

_STEP_OPS = frozenset(op.name for op in STEP_OPS)  # the ops that honour compile_only
_EVERYTHING = Capabilities(frozenset(OPS), float64=True, capturable=True, importance=True)
_ELSEWHERE = ("Triton runs CUDA tensors, or CPU tensors under its interpreter (TRITON_INTERPRET=1, set before "
              "triton is imported); got tensors on {device}")


def unavailable_reason() -> str:
    """``""``: once this module is imported, triton is."""
    return ""


def capabilities(device: torch.device) -> Capabilities:
    """Every op, with every option, on CUDA tensors; on CPU tensors only under ``TRITON_INTERPRET=1``.
    float64 included: the kernels step float64 parameters in float64, with float64 states and float64
    hyper-parameters (device scalars, since Triton passes Python floats as float32)."""
    device = torch.device(device)
    if device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return _EVERYTHING
    return Capabilities(reason=_ELSEWHERE.format(device=device))


def prepare(op: str, *args, **kwargs) -> None:
    """Compile the kernel that the step op ``op(*args, **kwargs)`` would launch, writing nothing (compile
    errors surface here, before a multi-bucket step has written its first bucket). KIF's fusion passes
    compile at their launch."""
    if op not in _STEP_OPS:
        return
    with triton_step.compile_only():
        globals()[op](*args, **kwargs)
