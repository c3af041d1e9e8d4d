"""What every CNL optimizer shares: the reference gradient, its capture, and the statistics.

The update math lives in :mod:`cnl_ext.functional`; the subclasses only gather tensors.

Distributed training: with DDP the parameters are plain tensors and nothing changes. With FSDP2
(``fully_shard``) they are DTensors: the reference of a sharded parameter is stored as this rank's
local shard (sharded like the parameter), and :meth:`CNLOptimizer.cnl_stats` sums the statistics
over the ranks holding the shards.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import distribute_tensor
except ImportError:  # a torch build without torch.distributed
    distribute_tensor = None

from .. import functional
from ._amp import skip_or_unscale
from .. import reference_format as rf

__all__ = ["CNLOptimizer", "CNLStats", "ParameterStats", "ReferenceCapture", "REFERENCE_KEY"]

# The key under which state_dict() holds the reference when asked to; torch.optim ignores it on load.
REFERENCE_KEY = "cnl_reference"


is_dtensor = functional.is_dtensor
local_tensor = functional.local_tensor


def _shard_groups(p):
    """Process groups of the mesh dimensions along which the DTensor ``p`` is sharded."""
    return tuple(p.device_mesh.get_group(dim) for dim, placement in enumerate(p.placements) if placement.is_shard())


@dataclass(frozen=True)
class ParameterStats:
    """CNL statistics of one parameter for one step (``s = r·u`` per element)."""

    index: int  # position in the optimizer's parameters, across param groups
    numel: int
    collaborative: int
    sum_s_collaborative: float
    sum_s_conflicting: float

    @property
    def collaborative_share(self) -> float:
        return self.collaborative / self.numel if self.numel else 1.0


@dataclass(frozen=True)
class CNLStats:
    """CNL statistics of the last ``step()``, over every parameter that had a reference."""

    collaborative: int
    total: int
    sum_s_collaborative: float
    sum_s_conflicting: float
    per_parameter: list = field(default_factory=list)

    @property
    def conflicting(self) -> int:
        return self.total - self.collaborative

    @property
    def collaborative_share(self) -> float:
        return self.collaborative / self.total if self.total else 1.0


class ReferenceCapture:
    """Handed out by :meth:`CNLOptimizer.capture_reference`; counts the ``backward`` calls."""

    def __init__(self):
        self.calls = 0
        self.total_weight = 0.0

    def backward(self, loss: torch.Tensor, *, weight: float = 1.0, **kwargs) -> None:
        """``(weight·loss).backward(**kwargs)``, accumulating into the reference, which is divided
        by the sum of the weights at the end: the mean over calls by default; with ``weight`` = the
        batch size, the mean over samples when batches differ in size. A loss scale for fp16
        (constant over the capture) goes into ``weight`` too: it cancels in the mean."""
        if not weight > 0:
            raise ValueError(f"ref.backward: weight must be positive, got {weight}")
        (loss * weight if weight != 1.0 else loss).backward(**kwargs)
        self.calls += 1
        self.total_weight += weight


class CNLOptimizer(torch.optim.Optimizer):
    """Base class: a ``torch.optim.Optimizer`` that masks its update against a reference gradient.

    Subclasses implement :meth:`_step_group` with :mod:`cnl_ext.functional`, passing
    :meth:`_references_for` and the statistics buffer that :meth:`step` hands them.

    ``state_dict()`` leaves the reference out (it is recomputed from the mastered data); set
    ``save_reference = True`` on the optimizer, or call ``state_dict(include_reference=True)``, to
    save it under :data:`REFERENCE_KEY`, which ``load_state_dict`` restores.
    """

    save_reference = False

    def __init__(self, params, defaults, *, backend: str, reference_dtype, track_stats: bool):
        if backend not in functional.BACKENDS:
            raise ValueError(f"backend must be one of {functional.BACKENDS}, got {backend!r}")
        self.reference_format = rf.canonical_format(reference_dtype)
        super().__init__(params, defaults)
        self.backend = backend
        self.track_stats = bool(track_stats)
        self._references: dict = {}  # parameter -> stored reference (format: self.reference_format)
        self._last_stats = None  # per group: ([(index, numel) or None per param], float64 [n, 3] device tensor)
        name = type(self).__name__
        for i, p in enumerate(self._parameters()):
            if p.is_complex():
                raise ValueError(f"{name} does not support complex parameters (parameter {i})")
            if p.dtype not in functional.SUPPORTED_PARAM_DTYPES:
                raise TypeError(f"{name} supports float32, bfloat16 and float16 parameters; parameter {i} is {p.dtype}")

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_references", {})
        self.__dict__.setdefault("_last_stats", None)

    # ------------------------------------------------------------------ parameters and state

    def _parameters(self):
        """All parameters, in order across param groups (the order ``set_reference`` uses)."""
        return [p for group in self.param_groups for p in group["params"]]

    _step_supports_amp_scaling = True  # reads GradScaler's grad_scale / found_inf (see _amp.py)

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step over every parameter with a gradient; see :meth:`_step_group`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        gathered = self._gradients()
        if skip_or_unscale(self, [g for _, _, grads in gathered for g in grads]):
            return loss
        per_group = []
        for group, params, grads in gathered:
            if params:
                stats = self._new_stats(params)
                self._step_group(group, params, grads, stats)
                per_group.append((params, stats))
        self._record_stats(per_group)
        return loss

    def _step_group(self, group, params, grads, stats):
        """Update ``params`` of ``group`` (all have gradients ``grads``) with cnl_ext.functional."""
        raise NotImplementedError

    def _gradients(self):
        """(group, params with a gradient, their gradients) per group; checked before any write."""
        gathered = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            functional.check_gradients(params, grads, type(self).__name__)
            gathered.append((group, params, grads))
        return gathered

    def load_state_dict(self, state_dict):
        # torch casts every floating state to the parameter's dtype on load; the CNL optimizers keep
        # their states in float32 whatever the parameter dtype (taken from the saved tensors, so a
        # float32 state of a bf16 parameter survives exactly), and the step count on the host
        # (on the device with capturable=True).
        param_of_id = {
            saved_id: (p, group.get("capturable", False))
            for saved_group, group in zip(state_dict["param_groups"], self.param_groups)
            for saved_id, p in zip(saved_group["params"], group["params"])
        }
        super().load_state_dict(state_dict)
        self._load_reference(state_dict.get(REFERENCE_KEY))
        for saved_id, saved_state in state_dict["state"].items():
            if saved_id not in param_of_id:
                continue
            p, capturable = param_of_id[saved_id]
            for key, value in saved_state.items():
                if not isinstance(value, torch.Tensor):
                    continue
                if key == "step":
                    self.state[p][key] = value.detach().to(p.device if capturable else "cpu", torch.float32, copy=True)
                elif value.is_floating_point():
                    self.state[p][key] = value.detach().to(p.device, torch.float32, copy=True)

    def state_dict(self, *, include_reference: bool | None = None):
        """``torch.optim.Optimizer.state_dict()``, plus the reference when ``include_reference``
        (default: the ``save_reference`` attribute) and one is set."""
        return self._add_reference(super().state_dict(), include_reference)

    def _add_reference(self, state_dict, include_reference):
        if include_reference is None:
            include_reference = self.save_reference
        if include_reference and self._references:
            index = {p: i for i, p in enumerate(self._parameters())}
            state_dict[REFERENCE_KEY] = {
                "format": self.reference_format,
                "tensors": {index[p]: stored for p, stored in self._references.items()},
            }
        return state_dict

    def _load_reference(self, saved) -> None:
        """Restore a reference saved by :meth:`state_dict` (kept as is when ``saved`` is None)."""
        if saved is None:
            return
        params = self._parameters()
        references = {}
        for i, stored in saved["tensors"].items():
            if not 0 <= i < len(params):
                raise ValueError(f"the saved reference names parameter {i}, but the optimizer has {len(params)}")
            p = params[i]
            shape = local_tensor(p).shape  # a sharded parameter's reference is its local shard
            expected = rf.storage_numel(shape.numel(), saved["format"])
            if stored.numel() != expected:
                raise ValueError(f"the saved reference of parameter {i} has {stored.numel()} elements in format "
                                 f"{saved['format']!r}, but that parameter needs {expected}")
            stored = stored.to(p.device)
            if saved["format"] != self.reference_format:
                stored = rf.encode(rf.decode(stored, saved["format"], shape), self.reference_format)
            references[p] = stored.reshape(shape) if self.reference_format != "sign2" else stored
        self._references = references

    # ------------------------------------------------------------------ the reference

    @property
    def has_reference(self) -> bool:
        return bool(self._references)

    def clear_reference(self) -> None:
        """Forget the reference: ``step`` is the plain optimizer again."""
        self._references = {}

    def _references_for(self, params):
        """Stored references aligned with ``params`` (``None`` where a parameter has none)."""
        if not self._references:
            return None
        return [self._references.get(p) for p in params]

    def set_reference(self, tensors) -> None:
        """Set the reference gradient from tensors given by the user (copied, never written).

        ``tensors``: a sequence in the order of the optimizer's parameters across param groups
        (``None`` entries leave a parameter unmasked), or a mapping from parameter to tensor.
        Everything is checked before anything is written.
        """
        params = self._parameters()
        if isinstance(tensors, Mapping):
            index = {id(p): i for i, p in enumerate(params)}  # by identity: Tensor.__eq__ is elementwise
            pairs = []
            for p, t in tensors.items():
                if not isinstance(p, torch.Tensor) or id(p) not in index:
                    raise ValueError("set_reference got a tensor for a parameter this optimizer does not hold")
                pairs.append((index[id(p)], p, t))
        else:
            tensors = list(tensors)
            if len(tensors) != len(params):
                raise ValueError(
                    f"set_reference expects {len(params)} tensors (one per parameter, in param-group order), "
                    f"got {len(tensors)}"
                )
            pairs = [(i, p, t) for i, (p, t) in enumerate(zip(params, tensors)) if t is not None]
        for i, p, t in pairs:
            self._check_reference(i, p, t)
        self._references = {p: rf.encode(self._local_reference(p, t.detach()), self.reference_format)
                            for _, p, t in pairs}

    @staticmethod
    def _local_reference(p, t):
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

    def _check_reference(self, i, p, t):
        where = f"set_reference: reference {i}"
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where} is a {type(t).__name__}, not a tensor")
        if t.layout != torch.strided:
            raise ValueError(f"{where} is sparse ({t.layout}); pass a dense tensor")
        if t.is_complex() or not t.is_floating_point():
            raise TypeError(f"{where} has dtype {t.dtype}; a real floating-point tensor is needed")
        if t.shape != p.shape:
            raise ValueError(f"{where} has shape {tuple(t.shape)}, but its parameter has shape {tuple(p.shape)}")
        if t.device != p.device:
            raise ValueError(f"{where} is on {t.device}, but its parameter is on {p.device}")

    @contextlib.contextmanager
    def capture_reference(self):
        """Capture the mean mastered-set gradient as the reference.

        Inside the block, call ``ref.backward(loss)`` once per mastered batch: autograd accumulates
        straight into buffers that become the reference (for float32 parameters with a float32
        reference, the buffer *is* the reference: no copy). On exit the sum is divided by the
        sum of the calls' weights (their number by default), stored in ``reference_dtype``, and
        every ``.grad`` is back as it was.
        Do not call ``zero_grad`` inside the block. If the block raises, the previous reference
        is kept and the gradients are restored.
        """
        params = [p for p in self._parameters() if p.requires_grad]
        saved_grads = [p.grad for p in params]
        capture = ReferenceCapture()
        try:
            for p in params:
                p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
            yield capture
            if capture.calls == 0:
                raise RuntimeError("capture_reference() ended without any ref.backward(loss) call")
            if any(p.grad is None for p in params):  # e.g. set to None by zero_grad inside the block
                raise RuntimeError("a gradient was cleared inside capture_reference(); do not call zero_grad there")
            accumulated = [local_tensor(p.grad) for p in params]  # FSDP2: this rank's shard, like the parameter's
            self._mean_or_raise_if_not_finite(accumulated, capture.total_weight, sharded=any(map(is_dtensor, params)))
            references = {}
            for p, mean in zip(params, accumulated):
                keep_as_is = self.reference_format == "float32" and mean.dtype == torch.float32
                references[p] = mean if keep_as_is else rf.encode(mean, self.reference_format)
            self._references = references
        finally:
            for p, g in zip(params, saved_grads):
                p.grad = g

    @staticmethod
    def _mean_or_raise_if_not_finite(sums, total_weight, sharded):
        """Divide ``sums`` by ``total_weight`` in place; raise if any element is inf or NaN.

        One fused pass per device and dtype (GradScaler's unscale-and-check kernel) and one host
        sync per capture. An inf/NaN reference would mask elements arbitrarily: typically a
        loss-scaled (fp16) backward overflowed. Sharded (FSDP2) ranks agree through an all-reduce.
        """
        grouped = torch.utils._foreach_utils._group_tensors_by_device_and_dtype([sums])
        found = {}
        for (device, _), ([tensors], _) in grouped.items():
            flag = found.setdefault(device, torch.zeros((), dtype=torch.float32, device=device))
            inverse = torch.full((), 1.0 / total_weight, dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, flag, inverse)
        flag = sum(f.cpu() for f in found.values()) if found else torch.zeros(())
        if sharded and dist.is_initialized():
            flag = flag.to(sums[0].device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() != 0:
            raise FloatingPointError(
                "capture_reference(): the reference gradient has inf or NaN elements (an fp16 loss-scaled "
                "backward that overflowed? capture with a smaller scale); the previous reference is kept")

    # ------------------------------------------------------------------ statistics

    def _new_stats(self, params):
        """A zeroed float64 ``[len(params), 3]`` buffer when statistics are tracked, else None."""
        if not (self.track_stats and self._references and params):
            return None
        return torch.zeros(len(params), 3, dtype=torch.float64, device=params[0].device)

    def _record_stats(self, per_group):
        """Keep this step's device buffers; reading them (a host sync) waits for cnl_stats()."""
        if not self.track_stats:
            return
        index = {id(p): i for i, p in enumerate(self._parameters())}
        self._last_stats = [
            ([(index[id(p)], p.numel()) if p in self._references else None for p in params], stats)
            for params, stats in per_group if stats is not None
        ]

    def cnl_stats(self):
        """:class:`CNLStats` of the last step (needs ``track_stats=True`` and a reference), else None.

        With sharded (FSDP2) parameters the counts and sums are all-reduced over the ranks holding
        the shards: a collective, so every rank must call ``cnl_stats()``.
        """
        if not self._last_stats:
            return None
        per_parameter = []
        for rows, stats in self._last_stats:
            stats = self._sum_over_shards(rows, stats)
            for row, (count, s_collab, s_conflict) in zip(rows, stats.tolist()):
                if row is not None:  # parameters without a reference are not counted
                    per_parameter.append(ParameterStats(row[0], row[1], int(count), s_collab, s_conflict))
        return CNLStats(
            collaborative=sum(s.collaborative for s in per_parameter),
            total=sum(s.numel for s in per_parameter),
            sum_s_collaborative=sum(s.sum_s_collaborative for s in per_parameter),
            sum_s_conflicting=sum(s.sum_s_conflicting for s in per_parameter),
            per_parameter=per_parameter,
        )

    def _sum_over_shards(self, rows, stats):
        """``stats`` with the rows of sharded parameters summed over their shards' ranks (a copy)."""
        params = self._parameters()
        by_groups = {}  # the process groups to reduce over -> row positions
        for position, row in enumerate(rows):
            if row is not None and is_dtensor(params[row[0]]):
                groups = _shard_groups(params[row[0]])
                if groups:
                    by_groups.setdefault(groups, []).append(position)
        if not by_groups:
            return stats
        stats = stats.clone()  # the recorded buffers stay local, so cnl_stats() can be called again
        for groups, positions in by_groups.items():
            sharded = stats[positions]
            for group in groups:
                dist.all_reduce(sharded, op=dist.ReduceOp.SUM, group=group)
            stats[positions] = sharded
        return stats
