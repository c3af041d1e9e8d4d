"""Multi-tensor CNL steps in the compiled C++/CUDA extension ``cnl_ext._C`` (sources in ``csrc/``).

The fallback for CUDA tensors where Triton is missing or unsuitable. Same functions, arguments and
semantics as :mod:`cnl_ext.ops.triton_step` (the contract is in :mod:`cnl_ext.ops`); they call the
PyTorch operators ``torch.ops.cnl_ext.sgd_step_`` and ``torch.ops.cnl_ext.adam_step_`` that the
extension registers, so they also work inside ``torch.compile``.

This module always imports, also on a CPU-only machine or an install without the extension:
:func:`is_available` says whether the ops can run, and :func:`unavailable_reason` says why not.
"""
from __future__ import annotations

import importlib
import re

import torch

_OPS = ("sgd_step_", "adam_step_")


def _load():
    """Import ``cnl_ext._C`` (which registers the ops); return (module or None, reason or "")."""
    try:
        module = importlib.import_module("cnl_ext._C")
    except ModuleNotFoundError as exc:
        if exc.name not in ("cnl_ext._C", "cnl_ext"):
            return None, f"cnl_ext._C could not be loaded: {exc}"
        return None, (
            "cnl_ext._C is not built (cnl_ext was installed without a CUDA toolkit and a CUDA build "
            "of torch; reinstall on such a machine with `pip install --no-build-isolation .`, or "
            "CNL_EXT_BUILD_CUDA=1 to make a failed build an error)"
        )
    except (ImportError, OSError) as exc:  # e.g. built against another torch (undefined symbols)
        return None, f"cnl_ext._C could not be loaded (built for another torch or CUDA?): {exc}"
    missing = [name for name in _OPS if not hasattr(torch.ops.cnl_ext, name)]
    if missing:
        return None, f"cnl_ext._C loaded but does not register torch.ops.cnl_ext.{missing[0]}"
    return module, ""


_C, _LOAD_ERROR = _load()


def unavailable_reason() -> str:
    """Why the CUDA ops cannot run here, or ``""`` when they can."""
    if _C is None:
        return _LOAD_ERROR
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return f"torch {torch.__version__} is a CPU-only build"
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return ""


def is_available() -> bool:
    """True when ``cnl_ext._C`` is loaded and a CUDA device is present."""
    return unavailable_reason() == ""


def _arch_list(token: str) -> str:
    """setup.py's bare token back to TORCH_CUDA_ARCH_LIST form: ``80_90PTX`` -> ``8.0;9.0+PTX``."""
    archs = []
    for arch in token.split("_"):
        match = re.fullmatch(r"(\d+)(\d)([a-z]?)(PTX)?", arch)
        if match is None:
            return token  # not the usual form: report it as built
        major, minor, suffix, ptx = match.groups()
        archs.append(f"{major}.{minor}{suffix}" + ("+PTX" if ptx else ""))
    return ";".join(archs)


def build_info() -> dict:
    """What the loaded extension was built with (for benchmark and bug reports); ``{}`` without it."""
    if _C is None:
        return {}
    version = int(_C.cuda_runtime_version)
    return {
        "cuda_runtime": f"{version // 1000}.{version % 1000 // 10}",
        "cuda_arch_list": _arch_list(_C.cuda_archs),
        "chunk_size": int(_C.chunk_size),
        "library": _C.__file__,
    }


def _check() -> None:
    if _C is None:
        raise RuntimeError(_LOAD_ERROR)


def _split_lr(lr):
    """(float lr, lr_tensor): a capturable step's device-scalar ``lr`` travels as ``lr_tensor``."""
    if isinstance(lr, torch.Tensor):
        return 0.0, lr
    return float(lr), None


def sgd_step_(params, grads, momentum_buffers, references, stats, *, reference_format: str, lr,
              weight_decay: float, momentum: float, dampening: float, nesterov: bool, maximize: bool,
              first_step: bool) -> None:
    """See :mod:`cnl_ext.ops` for the contract and :func:`cnl_ext.ops.torch_backend.sgd_step_` for the math."""
    _check()
    if len(params) == 0:  # nothing to do (and no tensor for the dispatcher to choose a kernel by)
        return
    lr, lr_tensor = _split_lr(lr)
    torch.ops.cnl_ext.sgd_step_(
        params, grads, momentum_buffers, references, stats,
        reference_format=reference_format, lr=lr, weight_decay=float(weight_decay),
        momentum=float(momentum), dampening=float(dampening), nesterov=bool(nesterov),
        maximize=bool(maximize), first_step=bool(first_step), lr_tensor=lr_tensor,
    )


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, references, stats, *,
               reference_format: str, lr, beta1: float, beta2: float, eps: float,
               weight_decay: float, decoupled_weight_decay: bool, amsgrad: bool, maximize: bool,
               bias_correction1: float = None, bias_correction2: float = None, device_steps=None) -> None:
    """See :mod:`cnl_ext.ops` for the contract and :func:`cnl_ext.ops.torch_backend.adam_step_` for the math.

    Capturable (CUDA graphs): ``lr`` may be a 0-d float32 device tensor and ``device_steps`` (one 0-d
    float32 device tensor per param, already incremented) replaces the bias corrections.
    """
    _check()
    if len(params) == 0:
        return
    lr, lr_tensor = _split_lr(lr)
    on_device = device_steps is not None
    torch.ops.cnl_ext.adam_step_(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None, references, stats,
        reference_format=reference_format, lr=lr, beta1=float(beta1), beta2=float(beta2),
        eps=float(eps), weight_decay=float(weight_decay),
        decoupled_weight_decay=bool(decoupled_weight_decay), amsgrad=bool(amsgrad),
        maximize=bool(maximize),
        bias_correction1=None if on_device else float(bias_correction1),
        bias_correction2=None if on_device else float(bias_correction2),
        device_steps=device_steps, lr_tensor=lr_tensor,
    )
