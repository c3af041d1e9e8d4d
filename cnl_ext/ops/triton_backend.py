"""The ``"triton"`` backend: multi-tensor Triton kernels (:mod:`.triton_step`, :mod:`.triton_masked_delta`,
KIF's fusion passes in :mod:`.kif_fusion_triton`).

Triton runs CUDA tensors, and CPU tensors only under its interpreter (``TRITON_INTERPRET=1``, set
before triton is imported), which the tests use to check the kernels without a GPU. Importing this
module imports triton: an ImportError here means the backend is unavailable.
"""
from __future__ import annotations

import os

import torch

from . import triton_step
from .kif_fusion_triton import recurrent_fuse_ as kif_recurrent_fuse_
from .kif_fusion_triton import task_vector_fuse_ as kif_task_vector_fuse_
from .triton_masked_delta import masked_delta_
from .triton_step import adam_step_, sgd_step_

NAME = "triton"

__all__ = ["NAME", "unavailable_reason", "supports", "unsupported_reason", "prepare", "sgd_step_", "adam_step_",
           "masked_delta_", "kif_task_vector_fuse_", "kif_recurrent_fuse_"]

_OPS = ("sgd_step_", "adam_step_", "masked_delta_", "capturable", "importance", "float64",
        "kif_task_vector_fuse_", "kif_recurrent_fuse_")


def unavailable_reason() -> str:
    """``""``: once this module is imported, triton is."""
    return ""


def supports(device: torch.device, op: str) -> bool:
    """Every op on CUDA tensors; on CPU tensors only under ``TRITON_INTERPRET=1``. ``"float64"``
    included: the kernels step float64 parameters in float64, with float64 states and float64
    hyper-parameters (device scalars, since Triton passes Python floats as float32)."""
    on_cpu = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    return op in _OPS and (device.type == "cuda" or on_cpu)


def unsupported_reason(device: torch.device, op: str) -> str:
    """Why :func:`supports` says no, for error messages."""
    if op not in _OPS:
        return f"the Triton backend has no op {op!r}"
    return (f"Triton runs CUDA tensors, or CPU tensors under its interpreter (TRITON_INTERPRET=1, set before "
            f"triton is imported); got tensors on {device}")


def prepare(op: str, *args, **kwargs) -> None:
    """Compile the kernel that ``op(*args, **kwargs)`` would launch, writing nothing (compile errors
    surface here, before a multi-bucket step has written its first bucket)."""
    with triton_step.compile_only():
        globals()[op](*args, **kwargs)
