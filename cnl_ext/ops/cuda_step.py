"""Deprecated module name of the CUDA side of :mod:`cnl_ext.ops.native_backend`, kept for code that
imported it (the registry, :mod:`cnl_ext.registry`, knows the backend as ``"native"``, old name
``"cuda"``): the same ops; ``unavailable_reason`` and ``is_available`` say whether the CUDA kernels can run."""
from __future__ import annotations

from .native_backend import _arch_list, adam_step_, build_info, sgd_step_  # noqa: F401
from .native_backend import cuda_unavailable_reason as unavailable_reason


def is_available() -> bool:
    """True when ``cnl_ext._C`` is loaded and a CUDA device is present."""
    return unavailable_reason() == ""
