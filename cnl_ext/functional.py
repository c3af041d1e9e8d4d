"""Functional CNL optimizers, and the one place that chooses an implementation (backend).

As in ``torch/optim/adamw.py``: the optimizer classes gather lists of tensors and call these
functions; these functions group the tensors into buckets that one kernel launch can take (same
device, parameter dtype, step count, with or without a reference) and hand each bucket to a
backend module that implements the ops contract of :mod:`cnl_ext.ops`. The backends (the registry,
:data:`BACKEND_MODULES`):

- ``"torch"``: :mod:`cnl_ext.ops.torch_backend`, plain PyTorch, any device (the oracle);
- ``"triton"``: :mod:`cnl_ext.ops.triton_backend`, multi-tensor Triton kernels (CUDA tensors, or
  CPU tensors under ``TRITON_INTERPRET=1``);
- ``"native"``: :mod:`cnl_ext.ops.native_backend`, the compiled C++ extension (CPU kernels, and
  CUDA kernels where it was built with them); ``"cuda"`` is its old name;
- ``"auto"``: per device type, the first of :data:`AUTO_ORDER` that imports, builds and supports
  the op (one warning names what was passed over). Only import and build failures, which happen
  before anything is written, move ``auto`` on; an error inside an op propagates.

The ops take contiguous tensors (the contract); this module hands a non-contiguous parameter,
state or reference to them as a contiguous copy and writes the result back into the original.
"""
from __future__ import annotations

import importlib
import os
import warnings
from collections import defaultdict
from typing import NamedTuple

import torch

from .ops.importance import check_importance_options, importance_update_

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed
    class _DTensor:  # noqa: D401 - nothing is an instance of it
        pass

BACKEND_MODULES = {
    "torch": "cnl_ext.ops.torch_backend",
    "triton": "cnl_ext.ops.triton_backend",
    "native": "cnl_ext.ops.native_backend",
}
BACKEND_ALIASES = {"cuda": "native"}
BACKENDS = ("auto", *BACKEND_MODULES)
# What backend="auto" tries, in order, per device type; other device types get "torch".
AUTO_ORDER = {"cuda": ("triton", "native", "torch"), "cpu": ("native", "torch")}
# Set (as CI does) to make an unavailable native backend an error instead of a fallback to "torch".
REQUIRE_NATIVE_ENV = "CNL_EXT_REQUIRE_NATIVE"
SUPPORTED_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

_modules: dict = {}  # backend name -> module, or the reason it is unavailable (str)
_auto_chosen: dict = {}  # (device type, op) -> module
_warned: set = set()


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the optimizer states (moments, momentum buffers) of a ``param_dtype`` parameter:
    float64 for float64, float32 for float32 and the 16-bit dtypes (16-bit parameters keep float32
    states), and the complex dtype of that for a complex parameter (stepped as its view_as_real pairs)."""
    return _STATE_DTYPES.get(param_dtype, torch.float32)


# state_dtype's table (a dict lookup, which torch.compile traces; dtype.to_real() it does not)
_STATE_DTYPES = {torch.float64: torch.float64, torch.complex64: torch.complex64, torch.complex128: torch.complex128,
                 torch.complex32: torch.complex64}


class BackendUnavailable(RuntimeError):
    """A backend that cannot run in this process (not installed, not built, failed to build)."""


def canonical_backend(backend: str) -> str:
    """``backend`` as a name of :data:`BACKENDS` (aliases resolved); ValueError for anything else."""
    name = BACKEND_ALIASES.get(backend, backend)
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS + tuple(BACKEND_ALIASES)}, got {backend!r}")
    return name


def load_backend(name: str):
    """The backend module ``name``; BackendUnavailable says why it cannot be used here."""
    if name not in _modules:
        try:
            module = importlib.import_module(BACKEND_MODULES[name])
            reason = module.unavailable_reason()
        except ImportError as exc:
            module, reason = None, f"{BACKEND_MODULES[name]} cannot be imported: {exc}"
        _modules[name] = module if not reason else reason
    loaded = _modules[name]
    if isinstance(loaded, str):
        raise BackendUnavailable(f"backend {name!r} is not available: {loaded}")
    return loaded


def backend_status() -> dict:
    """``{name: ""}`` for every backend usable in this process, else the reason it is not (for reports)."""
    status = {}
    for name in BACKEND_MODULES:
        try:
            load_backend(name)
            status[name] = ""
        except BackendUnavailable as exc:
            status[name] = str(exc)
    return status


def why_unsupported(module, device, op) -> str:
    """Why backend ``module`` does not run ``op`` on ``device`` (for error messages and reports)."""
    explain = getattr(module, "unsupported_reason", None)
    return explain(device, op) if explain else f"backend {module.NAME!r} does not support {op} on {device}"


def _needs(dtype) -> tuple:
    """The capabilities (``supports`` ops) a step of parameters of ``dtype`` needs beyond the op itself:
    ``"float64"`` for float64 parameters (computed in float64, with float64 states)."""
    return ("float64",) if dtype == torch.float64 else ()


def resolve(backend: str, device: torch.device, op: str, dtype: torch.dtype = None):
    """The backend module that runs ``op`` for tensors on ``device`` (of parameter dtype ``dtype``,
    when given: float64 ones need a backend that ``supports(device, "float64")``); raises before
    anything is written."""
    name = canonical_backend(backend)
    needs = _needs(dtype)
    if name != "auto":
        module = load_backend(name)
        for capability in (op, *needs):
            if not module.supports(device, capability):
                raise RuntimeError(why_unsupported(module, device, capability))
        return module
    key = (device.type, op, needs)
    if key not in _auto_chosen:
        passed_over = []
        for candidate in AUTO_ORDER.get(device.type, ("torch",)):
            try:
                module = load_backend(candidate)
            except BackendUnavailable as exc:
                if candidate == "native" and os.environ.get(REQUIRE_NATIVE_ENV) == "1":
                    raise BackendUnavailable(f"{exc} ({REQUIRE_NATIVE_ENV}=1 makes this an error)") from None
                passed_over.append(str(exc))
                continue
            if all(module.supports(device, capability) for capability in (op, *needs)):
                _auto_chosen[key] = module
                break
        else:
            raise RuntimeError(f"no backend runs {op} on {device}" + (f" for {dtype} parameters" if needs else ""))
        message = (f"cnl_ext: backend='auto' uses {_auto_chosen[key].NAME!r} for {device.type} tensors because "
                   + "; ".join(passed_over))
        if passed_over and message not in _warned:
            _warned.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
    return _auto_chosen[key]


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter, or a tensor sharded like one)."""
    return isinstance(t, _DTensor)


def local_tensor(t):
    """This rank's shard of a DTensor (sharing its storage); any other tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


def check_gradients(params, grads, owner: str = "cnl_ext") -> None:
    """Raise a clear error for gradients no backend can take, before anything is written."""
    strided = torch.strided
    for i, (p, g) in enumerate(zip(params, grads)):
        # the common case in as few attribute reads as possible (this runs for every tensor, every step)
        if (g.layout is strided and p.dtype in SUPPORTED_PARAM_DTYPES and g.dtype is p.dtype
                and g.shape == p.shape and g.device == p.device):
            continue
        if g.layout != strided:
            raise RuntimeError(f"{owner} does not support sparse gradients (parameter {i}, shape {tuple(p.shape)}): "
                               f"its kernels mask every element of a dense update; give it a dense gradient "
                               f"(nn.Embedding/EmbeddingBag: sparse=False; docs/compatibility.md)")
        if g.is_complex() or p.is_complex():
            raise RuntimeError(f"{owner} does not support complex parameters or gradients (parameter {i})")
        if p.dtype not in SUPPORTED_PARAM_DTYPES:
            raise TypeError(f"{owner} supports float32, bfloat16, float16 and float64 parameters; "
                            f"parameter {i} is {p.dtype}")
        raise RuntimeError(
            f"{owner}: the gradient of parameter {i} is {g.dtype} {tuple(g.shape)} on {g.device}, "
            f"but the parameter is {p.dtype} {tuple(p.shape)} on {p.device}"
        )


def check_step(op: str, backend: str, params, grads, *, capturable: bool = False, owner: str = "cnl_ext") -> None:
    """Everything a step can check before the optimizer writes anything (state included):
    the gradients, and a backend for ``op`` (and ``capturable``) on every device of ``params``."""
    check_gradients(params, grads, owner)
    for device, dtype in {(p.device, torch.float64 if p.dtype == torch.float64 else None) for p in params}:
        module = resolve(backend, device, op, dtype)
        if capturable and not module.supports(device, "capturable"):
            raise RuntimeError(f"{owner}: capturable=True is not supported by backend {module.NAME!r} on {device}")


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


def _importance_of(importance, indices, kind, betas):
    """The bucket's part of ``importance`` (None, or the two EMA lists) with its options, for _plan."""
    if importance is None:
        return None
    sensitivities, uncertainties = importance
    return _take(sensitivities, indices), _take(uncertainties, indices), kind, betas


def _dense(tensors, written_back):
    """``tensors`` with contiguous copies in place of non-contiguous ones; each copy of a tensor
    the op writes is recorded in ``written_back`` as (original, copy), to be copied back after."""
    if tensors is None:
        return None
    dense = []
    for t in tensors:
        if t is None or t.is_contiguous():
            dense.append(t)
            continue
        copy = t.contiguous()
        if written_back is not None:
            written_back.append((t, copy))
        dense.append(copy)
    return dense


class _Launch(NamedTuple):
    """One bucket's op call, planned before any bucket runs."""
    module: object
    op: str
    args: tuple  # the op's positional tensor lists, contract order (stats excluded)
    kwargs: dict
    indices: list
    key: BucketKey
    copies: list  # (original, contiguous copy) of the non-contiguous tensors the op writes
    importance_after: dict  # importance_update_'s arguments where the backend does not fuse it, else None
    stats: object  # the bucket's zeroed float64 [n, 3] statistics rows, or None


def _plan(op, backend, indices, key: BucketKey, written, read, stats=None, importance=None, **kwargs) -> _Launch:
    """The call of ``op`` on one bucket; ``written``/``read``: the tensor lists it writes / only reads,
    in the op's argument order (written first); ``stats``: the caller's statistics rows (or None);
    ``importance``: None or (sensitivities, uncertainties, kind, betas) of the bucket (KIF's EMAs, in
    the step where the backend fuses them, else after it)."""
    module = resolve(backend, key.device, op, key.dtype)
    bucket_stats = None
    if stats is not None and key.has_reference:
        bucket_stats = torch.zeros(len(indices), 3, dtype=torch.float64, device=key.device)
    if importance is not None:
        written = (*written, *importance[:2])
    if key.sharded:  # FSDP2 parameters, gradients, states and references are DTensors sharded alike
        written = [None if ts is None else [local_tensor(t) for t in ts] for ts in written]
        read = [None if ts is None else [local_tensor(t) for t in ts] for ts in read]
    copies = []
    written = [_dense(ts, copies) for ts in written]
    read = [_dense(ts, None) for ts in read]
    importance_after = None
    if importance is not None:
        *written, sensitivities, uncertainties = written
        kind, betas = importance[2:]
        if module.supports(key.device, "importance"):
            kwargs.update(importance=(sensitivities, uncertainties), importance_kind=kind, importance_betas=betas)
        else:  # one more pass over the bucket after the step
            importance_after = dict(params_after=written[0], grads=read[0], sensitivities=sensitivities,
                                    uncertainties=uncertainties, kind=kind, betas=betas)
    return _Launch(module, op, _contract_order(op, written, read), kwargs, indices, key, copies, importance_after,
                   bucket_stats)


def _prepare(launches) -> None:
    """Let each backend compile what it will launch (Triton compiles at the first launch otherwise),
    so that a compile error surfaces before the first bucket writes."""
    for launch in launches:
        prepare = getattr(launch.module, "prepare", None)
        if prepare is not None:
            prepare(launch.op, *launch.args, launch.stats, **launch.kwargs)


def _run(launch: _Launch, stats, step_counts=None) -> None:
    """Run one planned bucket, adding its statistics into the caller's rows. ``step_counts``: the
    bucket's Adam step counts, counted just before its launch and uncounted if the launch raises (a
    launch that fails has written nothing)."""
    bucket_stats = launch.stats
    if step_counts is not None:
        torch._foreach_add_(step_counts, 1)
    if step_counts is None or torch.compiler.is_compiling():  # a compiled graph that fails is rerun whole
        getattr(launch.module, launch.op)(*launch.args, bucket_stats, **launch.kwargs)
    else:
        try:
            getattr(launch.module, launch.op)(*launch.args, bucket_stats, **launch.kwargs)
        except BaseException:
            torch._foreach_sub_(step_counts, 1)
            raise
    if launch.importance_after is not None:
        importance_update_(**launch.importance_after)
    for original, copy in launch.copies:
        original.copy_(copy)
    if bucket_stats is None:
        return
    if len(launch.indices) == stats.shape[0]:  # one bucket: no index tensor to copy to the device
        stats += bucket_stats.to(stats.device)
    else:
        stats.index_add_(0, torch.tensor(launch.indices, device=stats.device), bucket_stats.to(stats.device))


def _contract_order(op, written, read):
    """The positional tensor lists of ``op`` (see :mod:`cnl_ext.ops`) from its written and read lists."""
    if op == "masked_delta_":  # (params, befores, references)
        return (*written, *read)
    if op == "sgd_step_":  # (params, grads, momentum_buffers, references)
        params, buffers = written
        grads, references = read
        return params, grads, buffers, references
    params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = written  # adam_step_
    grads, references = read
    return params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, references


def cnl_sgd(params, grads, momentum_buffer_list, references=None, stats=None, *, lr: float,
            weight_decay: float = 0.0, momentum: float = 0.0, dampening: float = 0.0,
            nesterov: bool = False, maximize: bool = False, reference_format: str = "float32",
            backend: str = "auto", check: bool = True, importance=None, importance_kind: str = "first",
            importance_betas=(0.85, 0.85)) -> None:
    """Functional CNL SGD / momentum SGD (see :class:`cnl_ext.FusedCNLSGD`).

    ``momentum_buffer_list`` entries that are ``None`` are created here (:func:`state_dtype`), as torch's
    functional SGD does, and written back into the list. ``stats``: ``None`` or a float64
    ``[len(params), 3]`` tensor that receives (collaborative count, Σs collaborative, Σs conflicting).
    ``check=False`` skips :func:`check_step` when the caller has just run it. ``importance``: None, or
    (sensitivities, uncertainties), float32 tensors aligned with ``params``: KIF's EMAs, updated with
    ``importance_kind`` and ``importance_betas`` (:mod:`cnl_ext.ops.importance`).
    """
    if check:
        check_step("sgd_step_", backend, params, grads)
    if importance is not None:
        check_importance_options(importance_kind, importance_betas)
    use_momentum = momentum != 0
    first_step = set()
    if use_momentum:
        for i, buf in enumerate(momentum_buffer_list):
            if buf is None:  # created here, as torch's functional SGD does
                momentum_buffer_list[i] = torch.zeros_like(params[i], dtype=state_dtype(params[i].dtype),
                                                           memory_format=torch.contiguous_format)
                first_step.add(i)
    launches = [
        _plan("sgd_step_", backend, idx, key,
              written=(_take(params, idx), _take(momentum_buffer_list, idx) if use_momentum else None),
              read=(_take(grads, idx), _take(references, idx) if key.has_reference else None), stats=stats,
              importance=_importance_of(importance, idx, importance_kind, importance_betas),
              reference_format=reference_format, lr=lr, weight_decay=weight_decay, momentum=momentum,
              dampening=dampening, nesterov=nesterov, maximize=maximize, first_step=key.extra)
        for key, idx in _buckets(params, references, first_step.__contains__)
    ]
    _prepare(launches)
    for launch in launches:
        _run(launch, stats)


def cnl_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, references=None,
             stats=None, *, lr, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
             weight_decay: float = 0.0, decoupled_weight_decay: bool = False, amsgrad: bool = False,
             maximize: bool = False, capturable: bool = False, reference_format: str = "float32",
             backend: str = "auto", check: bool = True, importance=None, importance_kind: str = "first",
             importance_betas=(0.85, 0.85)) -> None:
    """Functional CNL Adam / AdamW (see :class:`cnl_ext.FusedCNLAdam`).

    ``state_steps`` are scalar tensors, incremented here as in torch's functional Adam. On the host
    (default), tensors whose step counts differ go to different launches (their bias corrections
    differ). With ``capturable``, the steps live on the params' device, ``lr`` may be a device
    scalar, and the bias corrections are computed on the device: no host synchronization, so the
    step can be captured in a CUDA graph. ``check=False`` and ``importance`` as for :func:`cnl_sgd`.
    """
    if check:
        check_step("adam_step_", backend, params, grads, capturable=capturable)
    if importance is not None:
        check_importance_options(importance_kind, importance_betas)
    on_device = capturable or _compiled_steps_on_device(backend, params, state_steps)
    # bucketed by the step count this step takes (host steps); counted as each bucket launches
    bucket_key = (lambda i: None) if on_device else [float(s) + 1 for s in state_steps].__getitem__
    launches = []
    for key, idx in _buckets(params, references, bucket_key):
        step = key.extra
        corrections = (dict(device_steps=_take(state_steps, idx)) if on_device else
                       dict(bias_correction1=1 - beta1**step, bias_correction2=1 - beta2**step))
        launches.append(_plan(
            "adam_step_", backend, idx, key,
            written=(_take(params, idx), _take(exp_avgs, idx), _take(exp_avg_sqs, idx),
                     _take(max_exp_avg_sqs, idx) if amsgrad else None),
            read=(_take(grads, idx), _take(references, idx) if key.has_reference else None), stats=stats,
            importance=_importance_of(importance, idx, importance_kind, importance_betas),
            reference_format=reference_format, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
            amsgrad=amsgrad, maximize=maximize, **corrections))
    _prepare(launches)
    for launch in launches:
        _run(launch, stats, step_counts=_take(state_steps, launch.indices))


def _compiled_steps_on_device(backend, params, state_steps) -> bool:
    """Under ``torch.compile``: whether the bias corrections can come from the step counts as tensors
    (as with capturable), so that the graph has no ``float(step)`` break. In eager mode reading a
    host step count is cheap and keeps the corrections exact in float64, so never there."""
    if not torch.compiler.is_compiling():
        return False
    if any(s.device != p.device for s, p in zip(state_steps, params)):
        return False  # host steps of device parameters: a device kernel cannot read them
    return all(resolve(backend, device, "adam_step_").supports(device, "capturable")
               for device in {p.device for p in params})


def cnl_masked_delta(params, befores, references, stats=None, *, reference_format: str = "float32",
                     inv_lr: float = 1.0, backend: str = "auto") -> None:
    """The write-back of :class:`cnl_ext.CNL`: where ``params − befores`` conflicts with the
    reference, put ``befores`` back into ``params`` (in place). ``stats`` as for :func:`cnl_adam`,
    with ``u = −Δ·inv_lr``. See :func:`cnl_ext.ops.torch_backend.masked_delta_`."""
    launches = [_plan("masked_delta_", backend, idx, key, written=(_take(params, idx),),
                      read=(_take(befores, idx), _take(references, idx)), stats=stats,
                      reference_format=reference_format, inv_lr=inv_lr)
                for key, idx in _buckets(params, references, lambda i: None)]
    _prepare(launches)
    for launch in launches:
        _run(launch, stats)
