"""Buckets and launch plans: how one call over lists of tensors becomes one op call per bucket.

A bucket is what one kernel launch takes: tensors on one device, of one parameter dtype, with or
without a reference, sharded (FSDP2 DTensors) or not, and whatever the caller adds to the key (first
momentum step, Adam step count, KIF's anchor dtype). Every bucket's call is planned (:func:`plan`:
the op's arguments from its :class:`~cnl_ext.ops.contract.OpSpec`, contiguous copies of
non-contiguous tensors) and prepared (the Triton kernels compiled) before the first one runs
(:func:`execute`), so that a compile error stops a step before it writes.
"""
from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import torch

from .dtensor import is_dtensor, local_tensor
from .ops.contract import OpSpec
from .ops.importance import importance_update_
from .step_counts import counted

__all__ = ["BucketKey", "Launch", "buckets", "take", "plan", "execute", "check_lists"]


class BucketKey(NamedTuple):
    """What the tensors of one launch share."""
    device: torch.device
    dtype: torch.dtype
    has_reference: bool
    sharded: bool  # FSDP2 DTensors: the kernels step their local shards
    extra: object  # the caller's: first momentum step, Adam step count, anchor dtype
    ewc: bool = False  # issue 22: the tensors have EWC's Fisher estimate and anchor


def buckets(params, references=None, extra_key=lambda i: None, fishers=None):
    """``(BucketKey, indices)`` pairs grouping the tensors one launch can take together (``fishers``:
    None, or EWC's Fisher estimates aligned with ``params``, None where a tensor has none)."""
    groups = defaultdict(list)
    no_reference = references is None
    for i, p in enumerate(params):
        has_reference = not no_reference and references[i] is not None
        has_fisher = fishers is not None and fishers[i] is not None
        groups[(p.device, p.dtype, has_reference, is_dtensor(p), extra_key(i), has_fisher)].append(i)
    return [(BucketKey(*key), indices) for key, indices in groups.items()]


def take(items, indices):
    """``items`` at ``indices`` (None stays None)."""
    return None if items is None else [items[i] for i in indices]


def _dense(tensors, sharded, written_back):
    """``tensors`` (local shards where ``sharded``) with contiguous copies in place of non-contiguous
    ones; each copy of a tensor the op writes is recorded in ``written_back`` as (original, copy)."""
    if tensors is None:
        return None
    dense = []
    for t in tensors:
        if sharded:
            t = local_tensor(t)
        if t is None or t.is_contiguous():
            dense.append(t)
            continue
        copy = t.contiguous()
        if written_back is not None:
            written_back.append((t, copy))
        dense.append(copy)
    return dense


class Launch(NamedTuple):
    """One bucket's op call, planned before any bucket runs."""
    module: object
    op: OpSpec
    args: tuple  # the op's positional arguments, contract order
    kwargs: dict
    indices: list
    copies: list  # (original, contiguous copy) of the non-contiguous tensors the op writes
    importance_after: dict  # importance_update_'s arguments where the backend does not fuse it, else None
    stats: object  # the bucket's zeroed float64 [n, 3] statistics rows, or None


def plan(op: OpSpec, module, key: BucketKey, indices, lists: dict, *, arguments=(), stats=None, importance=None,
         rules=None, **keywords) -> Launch:
    """The call of ``op`` by backend ``module`` on one bucket. ``lists``: the whole lists of ``op``'s
    ``tensor_lists`` by name (a missing or None one is passed as None); ``arguments``: its other
    positional arguments for this bucket (statistics excluded); ``stats``: the caller's statistics
    rows (or None: only ops that take ``stats`` get a bucket's rows); ``importance``: None or
    (sensitivities, uncertainties, kind, betas), whole lists: KIF's EMAs, in the step where the
    backend fuses them, else after it; ``rules``: None or (fishers, anchors, ewc_lambda, agem_coefficient),
    whole lists: issue 22's terms (:data:`~cnl_ext.ops.contract.RULE_KEYWORDS`; EWC's lists for a
    bucket whose key says ``ewc``)."""
    copies = []
    tensor_lists = {name: _dense(take(lists.get(name), indices), key.sharded, copies if name in op.written else None)
                    for name in op.tensor_lists}
    bucket_stats = None
    if stats is not None and key.has_reference:
        bucket_stats = torch.zeros(len(indices), 3, dtype=torch.float64, device=key.device)
    if "stats" in op.arguments:
        arguments = (*arguments, bucket_stats)
    if rules is not None:
        fishers, anchors, ewc_lambda, agem_coefficient = rules
        ewc = None
        if key.ewc and ewc_lambda != 0:
            ewc = tuple(_dense(take(lst, indices), key.sharded, None) for lst in (fishers, anchors))
        keywords.update(ewc=ewc, ewc_lambda=ewc_lambda, agem_coefficient=agem_coefficient)
    importance_after = None
    if importance is not None:
        sensitivities, uncertainties = (_dense(take(ema, indices), key.sharded, copies) for ema in importance[:2])
        kind, betas = importance[2:]
        if module.capabilities(key.device).importance:
            keywords.update(importance=(sensitivities, uncertainties), importance_kind=kind, importance_betas=betas)
        else:  # one more pass over the bucket after the step
            importance_after = dict(params_after=tensor_lists["params"], grads=tensor_lists["grads"],
                                    sensitivities=sensitivities, uncertainties=uncertainties, kind=kind, betas=betas)
    return Launch(module, op, (*tensor_lists.values(), *arguments), keywords, indices, copies, importance_after,
                  bucket_stats)


def execute(launches, stats=None, step_counts=None) -> None:
    """Prepare every launch (a backend compiles what it will launch: compile errors surface before
    the first bucket writes), then run them in order, adding each bucket's statistics into the
    caller's rows ``stats``. ``step_counts``: the whole list of Adam step counts, each bucket's counted
    just before its launch and uncounted if the launch raises (a launch that fails has written nothing)."""
    for launch in launches:
        prepare = getattr(launch.module, "prepare", None)
        if prepare is not None:
            prepare(launch.op.name, *launch.args, **launch.kwargs)
    for launch in launches:
        op = getattr(launch.module, launch.op.name)
        if step_counts is None:
            op(*launch.args, **launch.kwargs)
        else:
            counted(take(step_counts, launch.indices), lambda: op(*launch.args, **launch.kwargs))
        _finish(launch, stats)


def _finish(launch: Launch, stats) -> None:
    """After a bucket's op: the importance pass it did not fuse, the copies back, its statistics."""
    if launch.importance_after is not None:
        importance_update_(**launch.importance_after)
    for original, copy in launch.copies:
        original.copy_(copy)
    bucket_stats = launch.stats
    if bucket_stats is None:
        return
    if len(launch.indices) == stats.shape[0]:  # one bucket: no index tensor to copy to the device
        stats += bucket_stats.to(stats.device)
    else:
        stats.index_add_(0, torch.tensor(launch.indices, device=stats.device), bucket_stats.to(stats.device))


def check_lists(params, named_lists, *, dtypes, what: str, note: str = "", float32=()) -> None:
    """A ValueError unless every list of ``named_lists`` has one tensor per param, of its shape and on
    its device, and every tensor's dtype is one of ``dtypes`` (``what`` names them in the message, and
    ``note`` ends it; the ``float32`` names must be float32); ``params`` on one device."""
    if not params:
        raise ValueError("no parameters to fuse")
    device = params[0].device
    for name, tensors in named_lists.items():
        if len(tensors) != len(params):
            raise ValueError(f"{len(params)} params but {len(tensors)} {name}")
        for i, (p, t) in enumerate(zip(params, tensors)):
            if t.shape != p.shape:
                raise ValueError(f"{name}[{i}] has shape {list(t.shape)}, param {i} {list(p.shape)}")
            if t.device != device:
                raise ValueError(f"{name}[{i}] is on {t.device}, the params on {device}")
            if name in float32 and t.dtype != torch.float32:
                raise ValueError(f"{name}[{i}] must be float32, got {t.dtype}")
            if t.dtype not in dtypes:
                raise ValueError(f"{name}[{i}] must be {what}, got {t.dtype}{note}")
    for i, p in enumerate(params):
        if p.device != device:
            raise ValueError(f"param {i} is on {p.device}, param 0 on {device}")
        if p.dtype not in dtypes:
            raise ValueError(f"param {i} must be {what}, got {p.dtype}{note}")
