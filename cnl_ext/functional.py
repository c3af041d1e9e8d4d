"""Functional CNL optimizers and the choice of implementation (backend).

As in ``torch/optim/adamw.py``: the optimizer classes gather lists of tensors and call these
functions; these functions group the tensors into buckets that one kernel launch can take (same
device, parameter dtype, step count, with or without a reference) and hand each bucket to a
backend module that implements the ops contract of :mod:`cnl_ext.ops`:

- ``"torch"``: :mod:`cnl_ext.reference`, plain PyTorch, any device;
- ``"triton"``: :mod:`cnl_ext.ops.triton_step`, multi-tensor Triton kernels (CUDA tensors, or CPU
  tensors under ``TRITON_INTERPRET=1``);
- ``"cuda"``: :mod:`cnl_ext.ops.cuda_step`, the compiled C++/CUDA extension;
- ``"auto"``: Triton for CUDA tensors (falling back to the CUDA extension, then the reference, when
  it is missing or fails to compile, with one warning naming the reason), the reference elsewhere.
"""
from __future__ import annotations

import importlib
import warnings
from collections import defaultdict
from typing import NamedTuple

import torch


try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed
    class _DTensor:  # noqa: D401 - nothing is an instance of it
        pass

BACKENDS = ("auto", "triton", "torch", "cuda")
SUPPORTED_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_MODULES = {"torch": "cnl_ext.reference", "triton": "cnl_ext.ops.triton_step", "cuda": "cnl_ext.ops.cuda_step"}
# What backend="auto" tries, in order, for tensors of each device type; the first that works is kept.
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch")}
_auto_chosen: dict = {}  # device type -> (backend name, module)
_auto_rejected: set = set()  # backend names that failed to import or to compile


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter, or a tensor sharded like one)."""
    return isinstance(t, _DTensor)


def local_tensor(t):
    """This rank's shard of a DTensor (sharing its storage); any other tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


def _import_backend(name):
    """The backend module, or raise ImportError/RuntimeError saying why it cannot be used."""
    module = importlib.import_module(_MODULES[name])
    if name == "cuda" and not module.is_available():
        raise RuntimeError(module.unavailable_reason())
    return module


def _auto_backend(device_type: str, reasons=()):
    """(name, module) of the first usable backend in AUTO_ORDER; one warning names what was passed over."""
    if device_type not in _auto_chosen:
        reasons = list(reasons)
        for name in AUTO_ORDER.get(device_type, ("torch",)):
            if name in _auto_rejected:
                continue
            try:
                _auto_chosen[device_type] = (name, _import_backend(name))
                break
            except (ImportError, RuntimeError) as exc:
                _auto_rejected.add(name)
                reasons.append(f"{name}: {exc}")
        if reasons:
            warnings.warn(f"cnl_ext: backend='auto' uses {_auto_chosen[device_type][0]!r} for {device_type} tensors "
                          f"because {'; '.join(reasons)}", RuntimeWarning, stacklevel=4)
    return _auto_chosen[device_type]


def _resolve(backend: str, device: torch.device):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return _auto_backend(device.type)
    if backend == "cuda" and device.type != "cuda":
        raise RuntimeError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    try:
        return backend, _import_backend(backend)
    except (ImportError, RuntimeError) as exc:
        raise RuntimeError(f"backend={backend!r} is not available: {exc}") from exc


def resolve_backend(backend: str, device: torch.device):
    """The module that runs ``backend`` for tensors on ``device``."""
    return _resolve(backend, device)[1]


def check_gradients(params, grads, owner: str = "cnl_ext") -> None:
    """Raise a clear error for gradients no backend can take, before anything is written."""
    strided = torch.strided
    for i, (p, g) in enumerate(zip(params, grads)):
        # the common case in as few attribute reads as possible (this runs for every tensor, every step)
        if (g.layout is strided and p.dtype in SUPPORTED_PARAM_DTYPES and g.dtype is p.dtype
                and g.shape == p.shape and g.device == p.device):
            continue
        if g.layout != strided:
            raise RuntimeError(f"{owner} does not support sparse gradients (parameter {i}, shape {tuple(p.shape)})")
        if g.is_complex() or p.is_complex():
            raise RuntimeError(f"{owner} does not support complex parameters or gradients (parameter {i})")
        if p.dtype not in SUPPORTED_PARAM_DTYPES:
            raise TypeError(f"{owner} supports float32, bfloat16 and float16 parameters; parameter {i} is {p.dtype}")
        raise RuntimeError(
            f"{owner}: the gradient of parameter {i} is {g.dtype} {tuple(g.shape)} on {g.device}, "
            f"but the parameter is {p.dtype} {tuple(p.shape)} on {p.device}"
        )


class BucketKey(NamedTuple):
    """What the tensors of one launch share."""
    device: torch.device
    dtype: torch.dtype
    has_reference: bool
    sharded: bool  # FSDP2 DTensors: the kernels step their local shards
    extra: object  # the caller's: first momentum step, Adam step count


def _buckets(params, references, extra_key):
    """``(BucketKey, indices)`` pairs grouping the tensors one launch can take together."""
    groups = defaultdict(list)
    no_reference = references is None
    for i, p in enumerate(params):
        has_reference = not no_reference and references[i] is not None
        groups[(p.device, p.dtype, has_reference, is_dtensor(p), extra_key(i))].append(i)
    return [(BucketKey(*key), indices) for key, indices in groups.items()]


def _take(tensors, indices):
    return None if tensors is None else [tensors[i] for i in indices]


def _contiguous(tensors):
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


def _run_bucket(step_name, backend, stats, indices, key: BucketKey, tensor_lists, **kwargs):
    """Run one bucket, adding its statistics into the caller's rows.

    With backend="auto", a backend that fails (Triton that does not compile, say: that happens
    before its kernel writes anything) is dropped for the next one in AUTO_ORDER, with a warning.
    """
    device = key.device
    name, module = _resolve(backend, device)
    if key.sharded:  # FSDP2 parameters, gradients, states and references are DTensors sharded alike
        tensor_lists = [None if tensors is None else [local_tensor(t) for t in tensors] for tensors in tensor_lists]
    while True:
        bucket_stats = None
        if stats is not None and key.has_reference:
            bucket_stats = torch.zeros(len(indices), 3, dtype=torch.float64, device=device)
        try:
            getattr(module, step_name)(*tensor_lists, bucket_stats, **kwargs)
            break
        except Exception as exc:
            if backend != "auto" or name == "torch":
                raise
            _auto_rejected.add(name)
            _auto_chosen.pop(device.type, None)
            name, module = _auto_backend(device.type, [f"{name} failed: {type(exc).__name__}: {exc}"])
    if bucket_stats is None:
        return
    if len(indices) == stats.shape[0]:  # one bucket: no index tensor to copy to the device
        stats += bucket_stats.to(stats.device)
    else:
        stats.index_add_(0, torch.tensor(indices, device=stats.device), bucket_stats.to(stats.device))


def cnl_sgd(params, grads, momentum_buffer_list, references=None, stats=None, *, lr: float,
            weight_decay: float = 0.0, momentum: float = 0.0, dampening: float = 0.0,
            nesterov: bool = False, maximize: bool = False, reference_format: str = "float32",
            backend: str = "auto") -> None:
    """Functional CNL SGD / momentum SGD (see :class:`cnl_ext.FusedCNLSGD`).

    ``momentum_buffer_list`` entries that are ``None`` are created here (float32), as torch's
    functional SGD does, and written back into the list. ``stats``: ``None`` or a float64
    ``[len(params), 3]`` tensor that receives (collaborative count, Σs collaborative, Σs conflicting).
    """
    use_momentum = momentum != 0
    first_step = set()
    if use_momentum:
        for i, buf in enumerate(momentum_buffer_list):
            if buf is None:
                momentum_buffer_list[i] = torch.zeros_like(params[i], dtype=torch.float32,
                                                           memory_format=torch.contiguous_format)
                first_step.add(i)
    for key, idx in _buckets(params, references, first_step.__contains__):
        _run_bucket(
            "sgd_step_", backend, stats, idx, key,
            (_take(params, idx), _contiguous(_take(grads, idx)),
             _take(momentum_buffer_list, idx) if use_momentum else None,
             _take(references, idx) if key.has_reference else None),
            reference_format=reference_format, lr=lr, weight_decay=weight_decay, momentum=momentum,
            dampening=dampening, nesterov=nesterov, maximize=maximize, first_step=key.extra,
        )


def cnl_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, references=None,
             stats=None, *, lr, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
             weight_decay: float = 0.0, decoupled_weight_decay: bool = False, amsgrad: bool = False,
             maximize: bool = False, capturable: bool = False, reference_format: str = "float32",
             backend: str = "auto") -> None:
    """Functional CNL Adam / AdamW (see :class:`cnl_ext.FusedCNLAdam`).

    ``state_steps`` are scalar tensors, incremented here as in torch's functional Adam. On the host
    (default), tensors whose step counts differ go to different launches (their bias corrections
    differ). With ``capturable``, the steps live on the params' device, ``lr`` may be a device
    scalar, and the bias corrections are computed on the device: no host synchronization, so the
    step can be captured in a CUDA graph.
    """
    torch._foreach_add_(state_steps, 1)  # one call: cheaper than a Python loop over host scalars
    bucket_key = (lambda i: None) if capturable else [float(s) for s in state_steps].__getitem__
    for key, idx in _buckets(params, references, bucket_key):
        step = key.extra
        corrections = (dict(device_steps=_take(state_steps, idx)) if capturable else
                       dict(bias_correction1=1 - beta1**step, bias_correction2=1 - beta2**step))
        _run_bucket(
            "adam_step_", backend, stats, idx, key,
            (_take(params, idx), _contiguous(_take(grads, idx)), _take(exp_avgs, idx),
             _take(exp_avg_sqs, idx), _take(max_exp_avg_sqs, idx) if amsgrad else None,
             _take(references, idx) if key.has_reference else None),
            reference_format=reference_format, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
            amsgrad=amsgrad, maximize=maximize, **corrections,
        )
