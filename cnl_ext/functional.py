"""Functional CNL optimizers: the public functional API over lists of tensors.

As in ``torch/optim/adamw.py``: the optimizer classes gather lists of tensors and call these
functions; these functions group the tensors into buckets that one kernel launch can take
(:mod:`cnl_ext.planning`) and hand each bucket to the backend chosen for its device
(:mod:`cnl_ext.registry`), which implements the ops contract of :mod:`cnl_ext.ops`. The backend is
resolved once per call (or once per optimizer step: :func:`check_step` returns it), before anything
is written.

The ops take contiguous tensors (the contract); a non-contiguous parameter, state or reference is
handed to them as a contiguous copy and the result written back into the original.
"""
from __future__ import annotations

import torch

from .dtensor import is_dtensor, local_tensor
from .ops.contract import ADAM_STEP, AGEM_DOT, MASKED_DELTA, SGD_STEP
from .ops.importance import check_importance_options
from .planning import BucketKey, buckets, execute, plan, take
from .registry import (AUTO_ORDER, BACKEND_ALIASES, BACKEND_MODULES, BACKENDS, REQUIRE_NATIVE_ENV,
                       BackendUnavailable, Resolved, backend_status, canonical_backend, load_backend, resolve,
                       resolve_each, why_unsupported)

__all__ = ["cnl_sgd", "cnl_adam", "cnl_masked_delta", "agem_dots", "check_step", "check_gradients", "state_dtype",
           "SUPPORTED_PARAM_DTYPES", "resolve", "resolve_each", "Resolved", "load_backend", "backend_status",
           "canonical_backend", "why_unsupported", "BackendUnavailable", "BACKENDS", "BACKEND_MODULES",
           "BACKEND_ALIASES", "AUTO_ORDER", "REQUIRE_NATIVE_ENV", "BucketKey", "is_dtensor", "local_tensor"]

SUPPORTED_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the optimizer states (moments, momentum buffers) of a ``param_dtype`` parameter:
    float64 for float64, float32 for float32 and the 16-bit dtypes (16-bit parameters keep float32
    states), and the complex dtype of that for a complex parameter (stepped as its view_as_real pairs)."""
    return _STATE_DTYPES.get(param_dtype, torch.float32)


# state_dtype's table (a dict lookup, which torch.compile traces; dtype.to_real() it does not)
_STATE_DTYPES = {torch.float64: torch.float64, torch.complex64: torch.complex64, torch.complex128: torch.complex128,
                 torch.complex32: torch.complex64}


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


def check_step(op, backend: str, params, grads, *, capturable: bool = False, owner: str = "cnl_ext") -> Resolved:
    """Everything a step can check before the optimizer writes anything (state included): the
    gradients, and a backend for ``op`` (and ``capturable``) on every device of ``params``. Returns
    those backends, for the step (``backend=`` of :func:`cnl_sgd` / :func:`cnl_adam`)."""
    check_gradients(params, grads, owner)
    return resolve_each(backend, op, params, capturable=capturable, owner=owner)


def _backends(op, backend, params, grads, check: bool, capturable: bool = False) -> Resolved:
    """The call's backends: ``backend`` itself when already resolved (by :func:`check_step`)."""
    if isinstance(backend, Resolved):
        return backend
    if check:
        return check_step(op, backend, params, grads, capturable=capturable)
    return resolve_each(backend, op, params, capturable=capturable)


def _importance(importance, kind, betas, check: bool):
    """``importance`` with its options, as :func:`cnl_ext.planning.plan` takes it (options checked
    here unless the caller, an optimizer, checked them at construction)."""
    if importance is None:
        return None
    if check:
        check_importance_options(kind, betas)
    return (*importance, kind, betas)


def _rules(ewc, ewc_lambda, agem_coefficient):
    """(planning's ``rules``, the Fisher list buckets split by) of issue 22's arguments; (None, None) when off."""
    use_ewc = ewc is not None and ewc_lambda != 0
    if not use_ewc and agem_coefficient is None:
        return None, None
    fishers, anchors = ewc if use_ewc else (None, None)
    return (fishers, anchors, ewc_lambda, agem_coefficient), fishers


def agem_dots(grads, references, *, reference_format: str = "float32", backend="auto"):
    """A-GEM's reduction: a float64 tensor (on the device of ``grads[0]``) of ``Σ g·r`` per tensor (0
    where a tensor has no reference), one pass of the backend's ``agem_dot_`` per bucket, or PyTorch's
    (:func:`cnl_ext.ops.rules.agem_dot_`) where the backend has none on that device. Sharded (FSDP2)
    tensors: this rank's shards (the caller all-reduces)."""
    from .ops import rules as torch_rules

    out = torch.zeros(len(grads), dtype=torch.float64, device=local_tensor(grads[0]).device if grads else "cpu")
    name = backend if isinstance(backend, str) else "auto"
    for key, idx in buckets(grads, references):
        if not key.has_reference:
            continue
        try:
            run = resolve(name, key.device, AGEM_DOT, key.dtype).agem_dot_
        except RuntimeError:
            run = torch_rules.agem_dot_
        part = torch.zeros(len(idx), dtype=torch.float64, device=key.device)
        dense = [local_tensor(grads[i]).contiguous() for i in idx]
        run(dense, take(references, idx), part, reference_format=reference_format)
        out.index_add_(0, torch.tensor(idx, device=out.device), part.to(out.device))
    return out


def cnl_sgd(params, grads, momentum_buffer_list, references=None, stats=None, *, lr: float,
            weight_decay: float = 0.0, momentum: float = 0.0, dampening: float = 0.0,
            nesterov: bool = False, maximize: bool = False, reference_format: str = "float32",
            backend="auto", check: bool = True, importance=None, importance_kind: str = "first",
            importance_betas=(0.85, 0.85), ewc=None, ewc_lambda: float = 0.0, agem_coefficient=None) -> None:
    """Functional CNL SGD / momentum SGD (see :class:`cnl_ext.FusedCNLSGD`).

    ``momentum_buffer_list`` entries that are ``None`` are created here (:func:`state_dtype`), as torch's
    functional SGD does, and written back into the list. ``stats``: ``None`` or a float64
    ``[len(params), 3]`` tensor that receives (collaborative count, Σs collaborative, Σs conflicting).
    ``backend``: a name of :data:`BACKENDS`, or what :func:`check_step` returned for this step.
    ``check=False`` skips :func:`check_step` and the importance options' check when the caller has
    just run them. ``importance``: None, or (sensitivities, uncertainties), float32 tensors aligned
    with ``params``: KIF's EMAs, updated with ``importance_kind`` and ``importance_betas``
    (:mod:`cnl_ext.ops.importance`). Issue 22 (:mod:`cnl_ext.ops.rules`): ``ewc`` None or (fishers,
    anchors) aligned with ``params`` (None entries: no EWC term there) with ``ewc_lambda``;
    ``agem_coefficient`` None (the references mask: CNL) or A-GEM's ``c`` (:func:`agem_dots`; the
    references project the gradient and mask nothing).
    """
    backends = _backends(SGD_STEP, backend, params, grads, check)
    importance = _importance(importance, importance_kind, importance_betas, check)
    use_momentum = momentum != 0
    first_step = set()
    if use_momentum:
        for i, buf in enumerate(momentum_buffer_list):
            if buf is None:  # created here, as torch's functional SGD does
                momentum_buffer_list[i] = torch.zeros_like(params[i], dtype=state_dtype(params[i].dtype),
                                                           memory_format=torch.contiguous_format)
                first_step.add(i)
    lists = dict(params=params, grads=grads, momentum_buffers=momentum_buffer_list if use_momentum else None)
    rules, fishers = _rules(ewc, ewc_lambda, agem_coefficient)
    launches = [
        plan(SGD_STEP, backends.module_for(key.device, key.dtype), key, idx,
             dict(lists, references=references if key.has_reference else None), stats=stats, importance=importance,
             rules=rules, reference_format=reference_format, lr=lr, weight_decay=weight_decay, momentum=momentum,
             dampening=dampening, nesterov=nesterov, maximize=maximize, first_step=key.extra)
        for key, idx in buckets(params, references, first_step.__contains__, fishers)
    ]
    execute(launches, stats)


def cnl_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, references=None,
             stats=None, *, lr, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
             weight_decay: float = 0.0, decoupled_weight_decay: bool = False, amsgrad: bool = False,
             maximize: bool = False, capturable: bool = False, reference_format: str = "float32",
             backend="auto", check: bool = True, importance=None, importance_kind: str = "first",
             importance_betas=(0.85, 0.85), ewc=None, ewc_lambda: float = 0.0, agem_coefficient=None) -> None:
    """Functional CNL Adam / AdamW (see :class:`cnl_ext.FusedCNLAdam`).

    ``state_steps`` are scalar tensors, incremented here as in torch's functional Adam. On the host
    (default), tensors whose step counts differ go to different launches (their bias corrections
    differ). With ``capturable``, the steps live on the params' device, ``lr`` may be a device
    scalar, and the bias corrections are computed on the device: no host synchronization, so the
    step can be captured in a CUDA graph. ``backend``, ``check``, ``importance`` and issue 22's
    ``ewc``, ``ewc_lambda``, ``agem_coefficient`` as for :func:`cnl_sgd`.
    """
    backends = _backends(ADAM_STEP, backend, params, grads, check, capturable)
    importance = _importance(importance, importance_kind, importance_betas, check)
    on_device = capturable or _compiled_steps_on_device(backends, params, state_steps)
    # bucketed by the step count this step takes (host steps); counted as each bucket launches
    bucket_key = (lambda i: None) if on_device else [float(s) + 1 for s in state_steps].__getitem__
    lists = dict(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                 max_exp_avg_sqs=max_exp_avg_sqs if amsgrad else None)
    rules, fishers = _rules(ewc, ewc_lambda, agem_coefficient)
    launches = []
    for key, idx in buckets(params, references, bucket_key, fishers):
        step = key.extra
        corrections = (dict(device_steps=take(state_steps, idx)) if on_device else
                       dict(bias_correction1=1 - beta1**step, bias_correction2=1 - beta2**step))
        launches.append(plan(
            ADAM_STEP, backends.module_for(key.device, key.dtype), key, idx,
            dict(lists, references=references if key.has_reference else None), stats=stats, importance=importance,
            rules=rules, reference_format=reference_format, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
            amsgrad=amsgrad, maximize=maximize, **corrections))
    execute(launches, stats, step_counts=state_steps)


def _compiled_steps_on_device(backends: Resolved, params, state_steps) -> bool:
    """Under ``torch.compile``: whether the bias corrections can come from the step counts as tensors
    (as with capturable), so that the graph has no ``float(step)`` break. In eager mode reading a
    host step count is cheap and keeps the corrections exact in float64, so never there."""
    if not torch.compiler.is_compiling():
        return False
    if any(s.device != p.device for s, p in zip(state_steps, params)):
        return False  # host steps of device parameters: a device kernel cannot read them
    return all(module.capabilities(device).capturable for (device, _), module in backends.items())


def cnl_masked_delta(params, befores, references, stats=None, *, reference_format: str = "float32",
                     inv_lr: float = 1.0, backend="auto") -> None:
    """The write-back of :class:`cnl_ext.CNL`: where ``params − befores`` conflicts with the
    reference, put ``befores`` back into ``params`` (in place). ``stats`` as for :func:`cnl_adam`,
    with ``u = −Δ·inv_lr``. See :func:`cnl_ext.ops.torch_backend.masked_delta_`."""
    backends = backend if isinstance(backend, Resolved) else resolve_each(backend, MASKED_DELTA, params)
    lists = dict(params=params, befores=befores, references=references)
    launches = [plan(MASKED_DELTA, backends.module_for(key.device, key.dtype), key, idx, lists, stats=stats,
                     reference_format=reference_format, inv_lr=inv_lr)
                for key, idx in buckets(params, references)]
    execute(launches, stats)
