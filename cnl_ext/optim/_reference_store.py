"""The reference gradient of a CNL optimizer: its storage, its capture, and its checkpoint form.

One stored tensor per parameter that has a reference, in the optimizer's ``reference_format``
(:mod:`cnl_ext.reference_format`), contiguous, on the parameter's device (for an FSDP2 DTensor
parameter: this rank's local shard). Every public call validates everything first and then
replaces the whole mapping at once, so a call that raises leaves the previous reference in place.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import distribute_tensor
except ImportError:  # a torch build without torch.distributed
    distribute_tensor = None

from .. import reference_format as rf
from ..functional import is_dtensor, local_tensor

__all__ = ["REFERENCE_KEY", "ReferenceCapture", "ReferenceStore"]

# The key under which state_dict() holds the reference when asked to; torch.optim ignores it on load.
REFERENCE_KEY = "cnl_reference"


class ReferenceCapture:
    """Handed out by :meth:`ReferenceStore.capture`; counts the ``backward`` calls."""

    def __init__(self, after_backward=None):
        self.calls = 0
        self.total_weight = 0.0
        self._after_backward = after_backward

    def backward(self, loss: torch.Tensor, *, weight: float = 1.0, **kwargs) -> None:
        """``(weight·loss).backward(**kwargs)``, accumulating into the reference, which is divided
        by the sum of the weights at the end: the mean over calls by default; with ``weight`` = the
        batch size, the mean over samples when batches differ in size. A loss scale for fp16
        (constant over the capture) goes into ``weight`` too: it cancels in the mean."""
        if not weight > 0:
            raise ValueError(f"ref.backward: weight must be positive, got {weight}")
        (loss * weight if weight != 1.0 else loss).backward(**kwargs)
        if self._after_backward is not None:
            self._after_backward()
        self.calls += 1
        self.total_weight += weight


def _raise_if_not_finite(tensors, what: str, sharded: bool = False, scale: float = 1.0) -> None:
    """Multiply ``tensors`` by ``scale`` in place (1: unchanged) and raise if any element is inf/NaN.

    One fused pass per device and dtype (GradScaler's unscale-and-check kernel) and one host sync.
    Sharded (FSDP2) ranks agree through an all-reduce.
    """
    grouped = torch.utils._foreach_utils._group_tensors_by_device_and_dtype([list(tensors)])
    found = {}
    for (device, _), ([group], _) in grouped.items():
        flag = found.setdefault(device, torch.zeros((), dtype=torch.float32, device=device))
        factor = torch.full((), scale, dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, flag, factor)
    flag = sum(f.cpu() for f in found.values()) if found else torch.zeros(())
    if sharded and dist.is_initialized():
        flag = flag.to(next(iter(found)) if found else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() != 0:
        raise FloatingPointError(f"{what} has inf or NaN elements; the previous reference is kept")


def _all_finite(tensors):
    """Per tensor, whether every element is finite; one host sync per device, nothing written."""
    flags = [torch.isfinite(t).all() for t in tensors]
    by_device = {}
    for position, flag in enumerate(flags):
        by_device.setdefault(flag.device, []).append(position)
    result = [True] * len(flags)
    for positions in by_device.values():
        for position, ok in zip(positions, torch.stack([flags[k] for k in positions]).tolist()):
            result[position] = ok
    return result


class ReferenceStore:
    """The stored reference of one optimizer, keyed by parameter (identity)."""

    def __init__(self, reference_format):
        self.format = rf.canonical_format(reference_format)
        self.tensors: dict = {}  # parameter -> stored reference

    def __bool__(self) -> bool:
        return bool(self.tensors)

    def __contains__(self, p) -> bool:
        return p in self.tensors

    def clear(self) -> None:
        self.tensors = {}

    def squared_norms(self) -> dict:
        """parameter -> ``r·r`` of its stored reference (a 0-d float64 tensor on its device; decoded
        values, so ±1 for the sign formats), computed once per reference: each call that sets, captures
        or loads a reference replaces :attr:`tensors` whole, and the cache is keyed by that mapping."""
        cache = self.__dict__.get("_norms")
        if cache is None or cache[0] is not self.tensors:
            norms = {}
            for p, stored in self.tensors.items():
                # the padding codes of a sign2 byte decode to 0
                values = rf.decode(stored, self.format, (stored.numel() * (4 if self.format == "sign2" else 1),))
                norms[p] = values.to(torch.float64).square().sum()
            cache = self._norms = (self.tensors, norms)
        return cache[1]

    def aligned_with(self, params):
        """Stored references aligned with ``params`` (``None`` where a parameter has none), or
        ``None`` when no parameter has one."""
        if not self.tensors:
            return None
        return [self.tensors.get(p) for p in params]

    def _encode(self, p, gradient):
        """``gradient`` (this rank's part, float) stored in this store's format, contiguous; a complex
        one as its view_as_real pairs (the mask of a complex parameter is taken pair element by pair
        element, as the kernels step it)."""
        if gradient.is_complex():
            gradient = torch.view_as_real(gradient)
        return rf.encode(gradient, self.format)

    # ------------------------------------------------------------------ set_reference

    def set(self, params, tensors) -> None:
        """See :meth:`cnl_ext.CNLOptimizer.set_reference`."""
        if isinstance(tensors, Mapping):
            index = {id(p): i for i, p in enumerate(params)}  # by identity: Tensor.__eq__ is elementwise
            triples = []
            for p, t in tensors.items():
                if not isinstance(p, torch.Tensor) or id(p) not in index:
                    raise ValueError("set_reference got a tensor for a parameter this optimizer does not hold")
                triples.append((index[id(p)], p, t))
        else:
            tensors = list(tensors)
            if len(tensors) != len(params):
                raise ValueError(
                    f"set_reference expects {len(params)} tensors (one per parameter, in param-group order), "
                    f"got {len(tensors)}"
                )
            triples = [(i, p, t) for i, (p, t) in enumerate(zip(params, tensors)) if t is not None]
        for i, p, t in triples:
            _check_reference(i, p, t)
        local = [self._local(p, t.detach()) for _, p, t in triples]
        for (i, _, _), finite in zip(triples, _all_finite(local)):
            if not finite:
                raise ValueError(f"set_reference: reference {i} has inf or NaN elements (every element would "
                                 "count as collaborative); the previous reference is kept")
        self.tensors = {p: self._encode(p, t) for (_, p, _), t in zip(triples, local)}

    @staticmethod
    def _local(p, t):
        """The part of reference ``t`` that this rank's shard of ``p`` needs (all of it unless sharded).

        For a DTensor parameter, ``t`` may be a DTensor (redistributed like ``p`` if placed otherwise:
        a collective) or a full plain tensor, the same on every rank (sliced locally, no communication).
        """
        if not is_dtensor(p):
            if is_dtensor(t):
                raise ValueError("set_reference got a DTensor for a parameter that is not a DTensor")
            return t
        if is_dtensor(t):
            if t.device_mesh != p.device_mesh or tuple(t.placements) != tuple(p.placements):
                t = t.redistribute(p.device_mesh, p.placements)
            return t.to_local()
        return distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None).to_local()

    # ------------------------------------------------------------------ capture_reference

    @contextlib.contextmanager
    def capture(self, params):
        """See :meth:`cnl_ext.CNLOptimizer.capture_reference`.

        float32 parameters accumulate in the ``.grad`` buffers set here (with a float32 reference the
        buffer becomes the reference: no copy). bf16/fp16 parameters accumulate in float32: after each
        ``ref.backward`` returns (under DDP, once its all-reduce is done) their ``.grad`` is added into a
        float32 sum and zeroed. A ``.grad`` that something replaced meanwhile (DDP with
        ``gradient_as_bucket_view=True`` puts a view of its bucket there) is copied, never kept, so the
        reference cannot alias a buffer that the next backward overwrites.
        """
        params = [p for p in params if p.requires_grad]
        saved_grads = [p.grad for p in params]
        low_precision = [i for i, p in enumerate(params) if p.dtype in (torch.bfloat16, torch.float16)]
        sums = {}

        def fold_low_precision_grads():
            for i in low_precision:
                grad = local_tensor(params[i].grad)
                total = sums.get(i)
                if total is None:
                    sums[i] = grad.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
                else:
                    total.add_(grad.to(torch.float32))
                grad.zero_()

        capture = ReferenceCapture(fold_low_precision_grads if low_precision else None)
        try:
            buffers = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params]
            for p, buffer in zip(params, buffers):
                p.grad = buffer
            yield capture
            if capture.calls == 0:
                raise RuntimeError("capture_reference() ended without any ref.backward(loss) call")
            if any(p.grad is None for p in params):  # e.g. set to None by zero_grad inside the block
                raise RuntimeError("a gradient was cleared inside capture_reference(); do not call zero_grad there")
            if low_precision:
                fold_low_precision_grads()  # what a plain loss.backward() inside the block left there
            accumulated = []
            for i, (p, buffer) in enumerate(zip(params, buffers)):
                if i in sums:
                    accumulated.append(sums[i])
                elif p.grad is buffer:
                    accumulated.append(local_tensor(buffer))  # FSDP2: this rank's shard, like the parameter's
                else:
                    accumulated.append(local_tensor(p.grad).clone(memory_format=torch.contiguous_format))
            _raise_if_not_finite(
                accumulated, "capture_reference(): the reference gradient (an fp16 loss-scaled backward that "
                "overflowed? capture with a smaller scale)", sharded=any(map(is_dtensor, params)),
                scale=1.0 / capture.total_weight)
            references = {}
            for p, mean in zip(params, accumulated):
                keep_as_is = self.format == "float32" and mean.dtype == torch.float32 and mean.is_contiguous()
                references[p] = mean if keep_as_is else self._encode(p, mean)
            self.tensors = references
        finally:
            for p, g in zip(params, saved_grads):
                p.grad = g

    # ------------------------------------------------------------------ checkpoints

    def saved(self, params):
        """The checkpoint form: ``{"format": ..., "tensors": {parameter index: stored}}``."""
        index = {p: i for i, p in enumerate(params)}
        return {"format": self.format, "tensors": {index[p]: stored for p, stored in self.tensors.items()}}

    def parse_saved(self, saved, params) -> dict:
        """The mapping a saved reference restores, validated whole; nothing is stored yet."""
        if not isinstance(saved, Mapping) or "format" not in saved or "tensors" not in saved:
            raise ValueError(f"the saved reference ({REFERENCE_KEY}) must be a mapping with 'format' and 'tensors'")
        fmt = saved["format"]
        if fmt not in rf.FORMATS:
            raise ValueError(f"the saved reference has format {fmt!r}; expected one of {rf.FORMATS}")
        references = {}
        for i, stored in saved["tensors"].items():
            if not (isinstance(i, int) and 0 <= i < len(params)):
                raise ValueError(f"the saved reference names parameter {i!r}, but the optimizer has {len(params)}")
            if not isinstance(stored, torch.Tensor) or stored.dtype != rf.storage_dtype(fmt):
                raise ValueError(f"the saved reference of parameter {i} must be a {rf.storage_dtype(fmt)} tensor "
                                 f"in format {fmt!r}")
            p = params[i]
            shape = local_tensor(p).shape  # a sharded parameter's reference is its local shard
            if p.is_complex():  # stored as its view_as_real pairs
                shape = torch.Size((*shape, 2))
            expected = rf.storage_numel(shape.numel(), fmt)
            if stored.numel() != expected:
                raise ValueError(f"the saved reference of parameter {i} has {stored.numel()} elements in format "
                                 f"{fmt!r}, but that parameter needs {expected}")
            stored = stored.to(local_tensor(p).device)
            values = rf.decode(stored, fmt, shape)
            if fmt in ("float32", "bfloat16") and not torch.isfinite(values).all():
                raise ValueError(f"the saved reference of parameter {i} has inf or NaN elements")
            references[p] = self._encode(p, values)
        return references

    def load(self, references: dict) -> None:
        """Store what :meth:`parse_saved` returned."""
        self.tensors = references


def _check_reference(i, p, t):
    where = f"set_reference: reference {i}"
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where} is a {type(t).__name__}, not a tensor")
    if t.layout != torch.strided:
        raise ValueError(f"{where} is sparse ({t.layout}); pass a dense tensor")
    if p.is_complex():
        if not t.is_complex():
            raise TypeError(f"{where} has dtype {t.dtype}, but its parameter is {p.dtype}; a complex tensor is "
                            "needed (its view_as_real pairs give the mask)")
    elif t.is_complex() or not t.is_floating_point():
        raise TypeError(f"{where} has dtype {t.dtype}; a real floating-point tensor is needed")
    if t.shape != p.shape:
        raise ValueError(f"{where} has shape {tuple(t.shape)}, but its parameter has shape {tuple(p.shape)}")
    if t.device != p.device:
        raise ValueError(f"{where} is on {t.device}, but its parameter is on {p.device}")
